"""Deployment export of a net: a SavedModel and TFLite files, with their sizes, in one report.

* `deployable(net)`: the net with its parameter transforms baked in (`nets.deploy.baked`), in a
  `tf.Module` whose `__call__(images)` is a `tf.function` over `[None, H, W, C]` float32 images
  returning the logits of `net(images, training=False)`, and whose `serve` is the same as
  `{"logits": ...}`, the serving signature. The module tracks the net, so the TFLite converter
  freezes its variables (a concrete function passed with an object that does not track them
  converts to a model that outputs NaN).
* `export_net(net, out_dir, formats, ...)`: writes the requested `FORMATS` into `out_dir` and
  returns a JSON-able report. Every format is converted (TFLite bytes in memory, the SavedModel
  into a temporary folder beside its target) and every TFLite file run once by LiteRT before
  anything is put in place, so a format that fails leaves `out_dir` as it was. Files are then
  renamed into place one by one (each atomically).
* Sizes follow TF-MOT's convention: a file's bytes and its gzip-compressed bytes (what a sparse
  or quantised model saves in transfer); a SavedModel's are the sums over its files, each listed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from codebase import tflite
from nets.deploy import baked
from nets.layers import FC, Conv2d, DepthwiseConv2d
from op_utils.traced import fresh_function
from utils.atomic import atomic_write_bytes
from utils.errors import ConfigError

SAVED_MODEL = "saved_model"
FORMATS = (SAVED_MODEL, *(f"tflite_{mode}" for mode in tflite.MODES))
SPARSE_AUTO_FRACTION = 0.5  # `sparse="auto"` stores kernels sparsely from this fraction of exact zeros on
INPUT, OUTPUT, SIGNATURE = "images", "logits", "serving_default"


class Deployable(tf.Module):
    """`net` at inference as one traced function of float32 `[None, H, W, C]` images (see the module
    docstring); `input_shape` is `(H, W, C)`."""

    def __init__(self, net):
        super().__init__(name="deployable")
        self.net = net
        self.input_shape = input_shape(net)
        spec = tf.TensorSpec([None, *self.input_shape], tf.float32, name=INPUT)
        self._logits = fresh_function(lambda images: net(images, training=False), input_signature=[spec])
        self.serve = fresh_function(lambda images: {OUTPUT: self._logits(images)}, input_signature=[spec])

    @property
    def __call__(self):
        """The traced forward pass: `module(images)` calls it, and a SavedModel keeps it as `__call__`."""
        return self._logits


def input_shape(net) -> tuple:
    """`(H, W, C)` of the images `net` reads."""
    size = int(net.config["input_size"])
    return size, size, int(net.groups["input"].size)


def deployable(net) -> Deployable:
    """`net` with its transforms baked into its parameters, ready to save or convert."""
    return Deployable(baked(net))


def kernel_zero_fraction(net) -> float:
    """The fraction of conv, depthwise and dense kernel weights that are exactly zero."""
    zeros = total = 0
    for layer in net.layers.values():
        if isinstance(layer, (Conv2d, DepthwiseConv2d, FC)):
            kernel = layer.param("kernel").numpy()
            zeros += int(np.count_nonzero(kernel == 0))
            total += kernel.size
    return zeros / total if total else 0.0


def check_formats(formats) -> list:
    """`formats` (a list, or a comma-separated string) as a list, each known and named once."""
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ConfigError(f"--formats: unknown format {unknown[0] if unknown else ''!r}; "
                          f"known formats: {', '.join(FORMATS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--formats names a format twice: {','.join(names)}")
    return names


def check_out_dir(out_dir: str) -> None:
    """Refuse an `out_dir` that is a file or lies under one."""
    path = os.path.abspath(out_dir)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if path and not os.path.isdir(path):
        raise ConfigError(f"--out_dir {out_dir}: {path} is a file, not a folder")


def file_path(out_dir: str, fmt: str) -> str:
    """Where format `fmt` is written in `out_dir`: `saved_model/` or `model_<mode>.tflite`."""
    if fmt == SAVED_MODEL:
        return os.path.join(out_dir, SAVED_MODEL)
    return os.path.join(out_dir, f"model_{fmt[len('tflite_'):]}.tflite")


def gzip_size(path: str) -> int:
    """Bytes of `path` gzip-compressed (level 9, no name or time in the header)."""

    class Counter:
        count = 0

        def write(self, data):
            self.count += len(data)

        def flush(self):
            pass

    counter = Counter()
    with open(path, "rb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=counter, mtime=0) as z:
        shutil.copyfileobj(f, z, 1 << 20)
    return counter.count


def sizes(path: str) -> dict:
    """`{"bytes", "gzip_bytes"}` of a file; of a folder their sums, and each file's under `"files"`."""
    if not os.path.isdir(path):
        return {"bytes": os.path.getsize(path), "gzip_bytes": gzip_size(path)}
    files = {}
    for root, _, names in os.walk(path):
        for name in sorted(names):
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = sizes(full)
    files = dict(sorted(files.items()))
    return {"bytes": sum(f["bytes"] for f in files.values()),
            "gzip_bytes": sum(f["gzip_bytes"] for f in files.values()), "files": files}


def _stage_saved_model(module: Deployable, target: str) -> str:
    """Write the SavedModel into a new temporary folder beside `target`; returns that folder."""
    parent, name = os.path.split(target)
    staged = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    os.chmod(staged, 0o755)  # mkdtemp makes it 0700; a SavedModel is data others may read
    try:
        tf.saved_model.save(module, staged, signatures={SIGNATURE: module.serve.get_concrete_function()})
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _replace_dir(staged: str, target: str) -> None:
    """Put folder `staged` at `target`, moving an old `target` aside first and deleting it after."""
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".old")
        os.replace(target, os.path.join(old, "previous"))
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_sparse(sparse, zero_fraction: float) -> bool:
    """`sparse` as a bool: `"auto"` is on from `SPARSE_AUTO_FRACTION` of zero kernel weights."""
    if sparse == "auto":
        return zero_fraction >= SPARSE_AUTO_FRACTION
    if isinstance(sparse, bool):
        return sparse
    raise ConfigError(f"--sparse must be auto, on or off, got {sparse!r}")


def export_net(net, out_dir: str, formats, representative=None, sparse=False, int8_io: bool = False,
               num_threads: int | None = None) -> dict:
    """Write `net` into `out_dir` in each of `formats` (see the module docstring).

    Args:
        net: a net (`nets.base.Net`); its transforms are baked in first.
        out_dir: the folder (created if needed); files already there are replaced.
        formats: some of `FORMATS` (a list or a comma-separated string).
        representative: for `tflite_int8`, a function yielding `[float32 batch]` lists of training
            images with inference preprocessing (`tflite.representative_images(images)`).
        sparse: True, False or `"auto"` (`resolve_sparse`): TFLite kernels stored sparsely.
        int8_io: `tflite_int8` with int8 input and output tensors (default: float32).
        num_threads: LiteRT threads of the check run of each TFLite file.

    Returns:
        `{"arch", "input_shape", "kernel_zero_fraction", "sparse", "formats": {format: {"path",
        "bytes", "gzip_bytes", ...}}}`; a TFLite format adds `"mode"` and `"runtime"`
        (`tflite.Runner.describe()`), the SavedModel `"signature"`, `"input"`, `"output"`, `"files"`.

    Raises:
        ConfigError: an unknown format, a bad `out_dir`, or a format that cannot express the net
            (named with the mode and the converter's message); nothing is written then.
    """
    formats = check_formats(formats)
    check_out_dir(out_dir)
    out_dir = os.path.abspath(out_dir)
    module = deployable(net)
    zero_fraction = kernel_zero_fraction(module.net)
    sparse = resolve_sparse(sparse, zero_fraction)
    staged, runtime = {}, {}
    for fmt in formats:
        if fmt != SAVED_MODEL:
            mode = fmt[len("tflite_"):]
            content = tflite.convert(module, mode, representative, sparse=sparse, int8_io=int8_io and mode == "int8")
            runtime[fmt] = tflite.Runner(content=content, num_threads=num_threads).describe()
            staged[fmt] = content
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    saved_model = None
    if SAVED_MODEL in formats:
        try:
            saved_model = _stage_saved_model(module, file_path(out_dir, SAVED_MODEL))
        except BaseException:
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    for fmt, content in staged.items():
        atomic_write_bytes(file_path(out_dir, fmt), content)
    if saved_model is not None:
        _replace_dir(saved_model, file_path(out_dir, SAVED_MODEL))
    report = {}
    for fmt in formats:
        path = file_path(out_dir, fmt)
        entry = {"path": path, **sizes(path)}
        if fmt == SAVED_MODEL:
            entry.update(signature=SIGNATURE, input=INPUT, output=OUTPUT)
        else:
            entry.update(mode=fmt[len("tflite_"):], sparse=sparse, runtime=runtime[fmt])
        report[fmt] = entry
    return {"arch": net.arch, "input_shape": list(module.input_shape), "kernel_zero_fraction": zero_fraction,
            "sparse": sparse, "formats": report}
