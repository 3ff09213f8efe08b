"""Deployment export (codebase/export.py, codebase/tflite.py): a SavedModel and TFLite files of a tiny net.

A conversion costs a second or two, so one randomised ResNet-8 is exported in every format once per
module (`exported`), with full-integer ranges from tiny CIFAR-format training images, and the tests read
its files; its logits on the test images are the reference. Tolerances are fractions of the largest
|logit| of the reference (`assert_close_to_scale`), measured on three seeds of this net:

| format | tolerance | measured | argmax agreement (32 images) |
|---|---|---|---|
| SavedModel, TFLite fp32 | 1e-5 absolute | 7e-7, 1.2e-6 | 1.0 |
| fp16 | 2e-3 of the scale | 2-4e-4 | 1.0 |
| dynamic int8 | 5e-2 of the scale | 3.4e-3 to 1.4e-2 | 1.0 |
| int8 | 1e-1 of the scale | 1.6e-2 to 2.6e-2 | 1.0 (required: >= 0.9) |
"""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase import export, tflite
from codebase.export import FORMATS, deployable, export_net
from dataloader import build_dataset
from tests.support.data import write_cifar10
from tests.support.nets import TwoConvBN, assert_close_to_scale, randomise
from tests.support.runs import digests
from utils.errors import ConfigError

QUANTIZED = {"tflite_fp16": 2e-3, "tflite_dynamic_int8": 5e-2, "tflite_int8": 1e-1}
AGREEMENT = 0.9


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Normalised (inference preprocessing) training and test images of tiny CIFAR-10 files."""
    data = build_dataset("cifar10", write_cifar10(tmp_path_factory.mktemp("data"), per_batch=8, num_test=32).path)
    train = np.concatenate([batch[0].numpy() for batch in data.train_eval(64)])
    test = np.concatenate([batch[0].numpy() for batch in data.test(64)])
    return train, test


@pytest.fixture(scope="module")
def net():
    net = nets.build("ResNet-8", masked=False)
    randomise(net)
    return net


@pytest.fixture(scope="module")
def exported(net, cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    report = export_net(net, out, FORMATS, representative=tflite.representative_images(cifar[0]))
    return out, report, net(cifar[1], training=False).numpy()


def sparse_net(fraction=0.8, seed=3):
    """The ResNet-8 with `fraction` of every conv and dense kernel's weights set to zero."""
    net = nets.build("ResNet-8", masked=False)
    randomise(net, seed=seed)
    rng = np.random.default_rng(seed)
    params = net.get_params()
    for key, value in params.items():
        if key.endswith("kernel:0"):
            params[key] = value * (rng.random(value.shape) >= fraction)
    net.set_params(params)
    return net


class WithOp(TwoConvBN):
    """The two-conv toy with `op` applied to its logits (an op some mode cannot express)."""

    def __init__(self, op, **kwargs):
        super().__init__(masked=False, **kwargs)
        self.op = op

    def forward(self, x, training, tap=None):
        return self.op(super().forward(x, training, tap))


def test_the_deployable_module_bakes_the_net_and_traces_one_signature(net, cifar, monkeypatch):
    calls = []
    monkeypatch.setattr(export, "baked", lambda n: calls.append(n) or n)
    module = deployable(net)
    assert calls == [net] and module.net is net and module.input_shape == (32, 32, 3)
    assert module.__call__.input_signature[0].shape.as_list() == [None, 32, 32, 3]
    np.testing.assert_allclose(module(cifar[1][:5]).numpy(), net(cifar[1][:5]).numpy(), atol=1e-5)
    assert len(module.trainable_variables) == len(net.trainable_variables) > 0  # it tracks the net


def test_saved_model_reloads_with_its_signature_and_the_same_logits(exported, cifar):
    out, report, reference = exported
    entry = report["formats"]["saved_model"]
    assert entry["path"] == str(out / "saved_model") and (entry["input"], entry["output"]) == ("images", "logits")
    loaded = tf.saved_model.load(entry["path"])
    serve = loaded.signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["images"] and list(serve.structured_outputs) == ["logits"]
    np.testing.assert_allclose(serve(images=tf.constant(cifar[1]))["logits"].numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(loaded(cifar[1]).numpy(), reference, atol=1e-5)
    # Nothing staged is left beside the files.
    assert sorted(os.listdir(out)) == ["model_dynamic_int8.tflite", "model_fp16.tflite", "model_fp32.tflite",
                                       "model_int8.tflite", "saved_model"]


def test_tflite_fp32_equals_the_tf_model_at_any_batch(exported, cifar):
    path = exported[1]["formats"]["tflite_fp32"]["path"]
    runner = tflite.Runner(path, num_threads=1)
    np.testing.assert_allclose(runner(cifar[1]), exported[2], atol=1e-5)
    logits = runner.predict(cifar[1], batch_size=5)  # ends with a partial batch
    np.testing.assert_allclose(logits, exported[2], atol=1e-5)
    assert tflite.top1(logits, exported[2].argmax(1)) == 1 and tflite.top1(logits, exported[2].argmin(1)) == 0
    assert runner.describe() == {"op_resolver": "AUTO", "fallback": None, "num_threads": 1,
                                 "input_dtype": "float32", "output_dtype": "float32"}


@pytest.mark.parametrize("fmt", sorted(QUANTIZED))
def test_quantized_tflite_is_close_at_the_logit_scale_and_agrees_on_argmax(fmt, exported, cifar):
    logits = tflite.Runner(exported[1]["formats"][fmt]["path"])(cifar[1])
    assert_close_to_scale(logits, exported[2], rtol=0, floor=QUANTIZED[fmt], err_msg=fmt)
    assert np.mean(logits.argmax(1) == exported[2].argmax(1)) >= AGREEMENT


def test_int8_files_are_smaller_and_every_size_is_the_files(exported):
    formats = exported[1]["formats"]
    assert formats["tflite_int8"]["bytes"] < formats["tflite_fp16"]["bytes"] < formats["tflite_fp32"]["bytes"]
    assert formats["tflite_dynamic_int8"]["bytes"] < formats["tflite_fp16"]["bytes"]
    for fmt in FORMATS[1:]:
        data = open(formats[fmt]["path"], "rb").read()
        assert formats[fmt]["bytes"] == len(data)
        assert formats[fmt]["gzip_bytes"] == len(gzip.compress(data, mtime=0))
        assert (formats[fmt]["mode"], formats[fmt]["sparse"]) == (fmt[len("tflite_"):], False)
    saved = formats["saved_model"]
    assert "saved_model.pb" in saved["files"] and saved["bytes"] == sum(f["bytes"] for f in saved["files"].values())
    assert saved["bytes"] == sum(os.path.getsize(os.path.join(root, name))
                                 for root, _, names in os.walk(saved["path"]) for name in names)


def test_int8_input_and_output_tensors_are_quantized_by_the_runner(net, exported, cifar, tmp_path):
    report = export_net(net, tmp_path, ["tflite_int8"], tflite.representative_images(cifar[0]), int8_io=True)
    runner = tflite.Runner(report["formats"]["tflite_int8"]["path"])
    assert (runner.describe()["input_dtype"], runner.describe()["output_dtype"]) == ("int8", "int8")
    logits = runner(cifar[1])
    assert logits.dtype == np.float32
    assert_close_to_scale(logits, exported[2], rtol=0, floor=QUANTIZED["tflite_int8"])
    assert np.mean(logits.argmax(1) == exported[2].argmax(1)) >= AGREEMENT


def test_sparsity_shrinks_a_net_of_zero_kernels_and_weight_only_int8_runs_without_xnnpack(cifar, tmp_path):
    net = sparse_net(0.8)
    assert export.kernel_zero_fraction(net) == pytest.approx(0.8, abs=0.02)
    dense = export_net(net, tmp_path / "dense", ["tflite_fp32"], sparse=False)["formats"]["tflite_fp32"]
    report = export_net(net, tmp_path / "sparse", ["tflite_fp32", "tflite_dynamic_int8"], sparse="auto")
    assert report["sparse"] is True and report["kernel_zero_fraction"] >= export.SPARSE_AUTO_FRACTION
    sparse = report["formats"]["tflite_fp32"]
    assert sparse["sparse"] and sparse["bytes"] < 0.5 * dense["bytes"]
    reference = net(cifar[1], training=False).numpy()
    np.testing.assert_allclose(tflite.Runner(sparse["path"])(cifar[1]), reference, atol=1e-5)
    # XNNPack cannot prepare sparse int8 kernels: the file runs with the built-in kernels, and says so.
    runtime = report["formats"]["tflite_dynamic_int8"]["runtime"]
    assert runtime["op_resolver"] == "BUILTIN_WITHOUT_DEFAULT_DELEGATES" and "XNNPack" in runtime["fallback"]
    runner = tflite.Runner(report["formats"]["tflite_dynamic_int8"]["path"])
    assert runner.describe()["op_resolver"] == "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    assert_close_to_scale(runner(cifar[1]), reference, rtol=0, floor=QUANTIZED["tflite_dynamic_int8"])
    # Auto stays off for a dense net.
    assert export.resolve_sparse("auto", 0.0) is False and export.kernel_zero_fraction(nets.build("LeNet-5")) == 0


@pytest.mark.parametrize("op, formats, int8_io, message", [
    (tf.math.erf, ["saved_model", "tflite_fp32"], False, "tflite_fp32: conversion failed: 'tf.Erf' op is neither"),
    # The converter leaves SIN in float32 between a DEQUANTIZE and a QUANTIZE and says nothing; with int8
    # input and output it fails with an AttributeError about a 'node'.
    (tf.math.sin, ["saved_model", "tflite_fp32", "tflite_int8"], False, "tflite_int8: op SIN has no int8 kernel"),
    (tf.math.sin, ["tflite_int8"], True, "tflite_int8: op SIN has no int8 kernel"),
])
def test_a_failed_conversion_is_one_line_and_writes_nothing(op, formats, int8_io, message, tmp_path):
    net = WithOp(op)
    randomise(net)
    images = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    with pytest.raises(ConfigError) as err:
        export_net(net, tmp_path / "new", formats, tflite.representative_images(images), int8_io=int8_io)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()
    # An existing folder keeps exactly what it held.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model_fp32.tflite").write_bytes(b"previous")
    before = digests(tmp_path / "old")
    with pytest.raises(ConfigError):
        export_net(net, tmp_path / "old", formats, tflite.representative_images(images))
    assert digests(tmp_path / "old") == before and os.listdir(tmp_path / "old") == ["model_fp32.tflite"]


def test_bad_formats_and_out_dirs_are_refused_before_any_conversion(net, tmp_path):
    (tmp_path / "file").write_text("x")
    for formats, out, message in ((["onnx"], tmp_path / "a", "unknown format 'onnx'"),
                                  ("tflite_fp32,tflite_fp32", tmp_path / "a", "names a format twice"),
                                  (["tflite_fp32"], tmp_path / "file" / "a", "is a file"),
                                  (["tflite_int8"], tmp_path / "a", "tflite_int8 needs representative images")):
        with pytest.raises(ConfigError, match=message):
            export_net(net, out, formats)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_latency_is_a_median_of_positive_milliseconds(exported):
    runner = tflite.Runner(exported[1]["formats"]["tflite_fp32"]["path"], num_threads=2)
    assert 0 < runner.latency(1, runs=3) and 0 < runner.latency(4, runs=3)
    assert runner.describe()["num_threads"] == 2
