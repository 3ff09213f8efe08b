"""TFLite files of a deployable net: conversion in four modes, and running them with LiteRT.

`convert(module, mode, ...)` turns `codebase.export.Deployable` (a `tf.Module` tracking the
net, so the converter freezes its variables) into `.tflite` bytes:

| mode | weights | activations | interface |
|---|---|---|---|
| `fp32` | float32 | float32 | float32 |
| `fp16` | float16 (dequantised to float32 when loaded) | float32 | float32 |
| `dynamic_int8` | int8 (`Optimize.DEFAULT` without a dataset) | float32, int8 inside conv/dense | float32 |
| `int8` | int8 | int8 (ranges from the caller's representative images) | float32, or int8 with `int8_io` |

`int8` is full integer: only `TFLITE_BUILTINS_INT8` ops, every op between the input's QUANTIZE
and the output's DEQUANTIZE computes in int8. The converter keeps an op without an int8 kernel
in float (DEQUANTIZE, op, QUANTIZE) and says nothing, so the converted model is checked and such
an op is an error. The default interface stays float32, so an int8 file is a drop-in replacement
for the float ones; `int8_io=True` makes the input and output int8 tensors too (`Runner`
quantises and dequantises them). `sparse=True` adds `Optimize.EXPERIMENTAL_SPARSITY`: kernels with
many exact zeros are stored sparsely (DENSIFY ops at load: a smaller file, no faster compute).

`Runner` runs a file with `ai_edge_litert` at any batch (the input is resized). Its default op
resolver applies the XNNPack delegate, which cannot prepare sparse int8 kernels (weight-only and
full int8 alike); a file it fails on is opened again without default delegates, and `describe()`
records that.
"""

from __future__ import annotations

import re
import time

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tensorflow.lite.python.convert_phase import ConverterError  # not exported as tf.lite.ConverterError in 2.21

from utils.errors import ConfigError

MODES = ("fp32", "fp16", "dynamic_int8", "int8")
# Exceptions `TFLiteConverter.convert()` raises for a model it cannot convert: ConverterError
# (an op TFLite lacks), and from the quantizer RuntimeError / ValueError, or AttributeError
# (measured: int8 input and output around an op that stays float).
CONVERSION_ERRORS = (ConverterError, RuntimeError, ValueError, AttributeError)
CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")


def representative_images(images: np.ndarray):
    """A converter's `representative_dataset`: each of `images` (float32 NHWC, inference
    preprocessing) as its own batch of one."""
    images = np.asarray(images, np.float32)

    def generate():
        for image in images:
            yield [image[np.newaxis]]

    return generate


def _first_error(err: Exception) -> str:
    """The line of a converter message that names the problem: its first `error: ...`, or its first line."""
    text = str(err).strip()
    found = re.search(r"error: ([^\n]+)", text)
    line = found.group(1) if found else (text.splitlines() or [type(err).__name__])[0]
    return line.strip()


def convert(module, mode: str, representative=None, sparse: bool = False, int8_io: bool = False) -> bytes:
    """The `.tflite` bytes of `module.serve` in `mode` (see the module docstring).

    Args:
        module: a `codebase.export.Deployable`.
        mode: one of `MODES`.
        representative: for `int8`, a function yielding `[float32 batch]` lists of training images.
        sparse: store kernels with `Optimize.EXPERIMENTAL_SPARSITY`.
        int8_io: for `int8`, int8 input and output tensors.

    Raises:
        ConfigError: the mode cannot express the net (named with the mode and the converter's
            message, or the op that would stay float), or a missing representative dataset.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown TFLite mode {mode!r}; known modes: {', '.join(MODES)}")
    if mode == "int8" and representative is None:
        raise ConfigError("tflite_int8 needs representative images (full-integer ranges)")
    if int8_io and mode != "int8":
        raise ConfigError(f"int8 input and output apply to tflite_int8 only, not tflite_{mode}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    optimizations = [] if mode == "fp32" else [tf.lite.Optimize.DEFAULT]
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = converter.inference_output_type = tf.int8
    try:
        content = converter.convert()
    except CONVERSION_ERRORS as err:
        if int8_io:  # int8 input and output fail obscurely around an op left in float: name that op
            convert(module, mode, representative, sparse)
        raise ConfigError(f"tflite_{mode}: conversion failed: {_first_error(err)}") from None
    if mode == "int8":
        floating = float_ops(content)
        if floating:
            raise ConfigError(f"tflite_{mode}: op {floating[0]} has no int8 kernel (the converter left it in "
                              f"float32; full-integer int8 cannot express it)")
    return content


def float_ops(content: bytes) -> list:
    """The ops of a model that compute on float32 tensors, in order, each named once; QUANTIZE and
    DEQUANTIZE (the float interface, or the converter's way around an op without an int8 kernel)
    are not counted, the op they surround is."""
    interpreter = Interpreter(model_content=content)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    found = []
    for op in interpreter._get_ops_details():  # noqa: SLF001 - LiteRT's only listing of a model's ops
        tensors = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
        if op["op_name"] in CONVERSION_OPS or not any(dtypes.get(i) == np.float32 for i in tensors):
            continue
        if op["op_name"] not in found:
            found.append(op["op_name"])
    return found


class Runner:
    """A `.tflite` model in the LiteRT interpreter: float32 logits of float32 images, any batch.

    Args:
        path: the `.tflite` file (or `content`: its bytes).
        num_threads: the interpreter's threads (None: LiteRT's default).

    Raises:
        ConfigError: LiteRT cannot run the model even without delegates.
    """

    def __init__(self, path: str | None = None, content: bytes | None = None, num_threads: int | None = None):
        self.what = path or "the converted model"
        self._source = dict(model_path=path) if path is not None else dict(model_content=content)
        self.num_threads = num_threads
        self.resolver = OpResolverType.AUTO
        self.fallback = None  # why the default delegates were turned off, if they were
        self._open()
        self.input_shape = tuple(int(d) for d in self._input["shape_signature"][1:])
        self(np.zeros([1, *self.input_shape], np.float32))  # prepares every op (and the delegates) once

    def _open(self) -> None:
        try:
            self._interpreter = Interpreter(**self._source, num_threads=self.num_threads,
                                            experimental_op_resolver_type=self.resolver)
        except ValueError as err:  # a missing or corrupt file
            raise ConfigError(f"{self.what}: not a readable TFLite model ({_first_error(err)})") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = None

    def _prepare(self, batch: int) -> None:
        """Resize the input to `batch` and allocate; off the default delegates if they fail to prepare."""
        if batch == self._batch:
            return
        try:
            self._interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
            self._interpreter.allocate_tensors()
        except RuntimeError as err:
            if self.resolver != OpResolverType.AUTO:
                raise ConfigError(f"{self.what}: LiteRT cannot run it ({_first_error(err)})") from None
            self.fallback = _first_error(err)
            self.resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            self._open()
            return self._prepare(batch)
        self._batch = batch

    def __call__(self, images) -> np.ndarray:
        """Float32 logits of a float32 `[batch, H, W, C]` array (int8 interfaces are (de)quantised here)."""
        images = np.asarray(images, np.float32)
        self._prepare(len(images))
        self._interpreter.set_tensor(self._input["index"], _quantize(images, self._input))
        self._interpreter.invoke()
        return _dequantize(self._interpreter.get_tensor(self._output["index"]), self._output)

    def predict(self, images, batch_size: int = 128) -> np.ndarray:
        """Logits of every image of an array, in batches of `batch_size` (the last one smaller)."""
        return np.concatenate([self(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    def latency(self, batch_size: int, runs: int = 20) -> float:
        """Median milliseconds of one call at `batch_size` (random normal images, after a warm-up call)."""
        x = np.random.default_rng(0).normal(size=(batch_size, *self.input_shape)).astype(np.float32)
        self(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self(x)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)

    def describe(self) -> dict:
        """How the model runs: op resolver, whether the default delegates were dropped and why, threads,
        and the interface dtypes."""
        return {"op_resolver": self.resolver.name, "fallback": self.fallback, "num_threads": self.num_threads,
                "input_dtype": np.dtype(self._input["dtype"]).name,
                "output_dtype": np.dtype(self._output["dtype"]).name}


def _quantize(images: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return images
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]) == np.float32:
        return values.copy()
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose largest logit is the label's."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels).reshape(-1)))
