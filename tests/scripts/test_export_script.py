"""`export.py` end to end on a saved ResNet-8 and tiny CIFAR-format data, in process.

The full export (five formats, --eval, --latency) is made once per module and shared by the tests
that read its report and folder.
"""

import contextlib
import io
import json

import numpy as np
import pytest

import export as export_script
import nets
from codebase.artifacts import load_net, save_net
from codebase.export_cli import representative_arrays
from dataloader import build_dataset
from tests.support.data import write_cifar10
from tests.support.nets import randomise
from tests.support.runs import digests, error_lines

FORMATS = ["saved_model", "tflite_fp32", "tflite_fp16", "tflite_dynamic_int8", "tflite_int8"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data"), per_batch=8, num_test=12).path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net = nets.build("ResNet-8", masked=False)
    randomise(net)
    path = tmp_path_factory.mktemp("net") / "trained_params.pkl"
    save_net(net, path)
    return path


def export_args(saved, cifar, out, *extra):
    return ["--trained_param", str(saved), "--data_path", str(cifar), "--out_dir", str(out), *extra]


@pytest.fixture(scope="module")
def full_export(saved, cifar, tmp_path_factory):
    """Every format with --eval, --latency and --json: (out_dir, returned report, printed report)."""
    out = tmp_path_factory.mktemp("export") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = export_script.main(export_args(saved, cifar, out, "--eval", "--latency", "--json", "--batch_size",
                                                "8", "--latency_runs", "2", "--representative_images", "16"))
    return out, report, json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_every_format_is_written_evaluated_and_timed(full_export, saved, cifar):
    out, report, printed = full_export
    assert printed == report == json.loads((out / "export.json").read_text())
    assert list(report["formats"]) == FORMATS and report["arch"] == "ResNet-8" and report["dataset"] == "cifar10"
    assert (report["sparse_flag"], report["sparse"], report["kernel_zero_fraction"]) == ("auto", False, 0.0)
    assert report["representative_images"] == 16 and report["int8_io"] is False
    for fmt, entry in report["formats"].items():
        assert entry["bytes"] > entry["gzip_bytes"] > 0, fmt
        assert entry["eval"]["count"] == 12 and entry["eval"]["tf_top1"] == report["tf"]["top1"]
        assert entry["eval"]["argmax_agreement"] >= 0.9, fmt
        if fmt != "saved_model":
            assert set(entry["latency_ms"]) == {"batch_1", "batch_8"} and min(entry["latency_ms"].values()) > 0
            assert entry["runtime"]["num_threads"] == report["latency"]["num_threads"]
    for fmt in ("saved_model", "tflite_fp32"):
        assert report["formats"][fmt]["eval"]["max_abs_logit_diff"] < 1e-5
        assert report["formats"][fmt]["eval"]["top1"] == report["tf"]["top1"]
    assert set(report["tf"]["latency_ms"]) == {"batch_1", "batch_8"}
    # The TF model's top-1 is the saved net's on the test images with inference preprocessing.
    data = build_dataset("cifar10", cifar)
    images, labels = data.test_arrays()
    x = (images.astype(np.float32) - np.float32(data.info.mean)) / np.float32(data.info.std)
    logits = load_net(None, str(saved))(x, training=False).numpy()
    assert report["tf"]["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model_dynamic_int8.tflite", "model_fp16.tflite",
                                                     "model_fp32.tflite", "model_int8.tflite", "saved_model"]


def test_representative_images_are_training_images_with_inference_preprocessing(cifar):
    data = build_dataset("cifar10", cifar)
    chosen = representative_arrays(data, 16)
    train = np.concatenate([batch[0].numpy() for batch in data.train_eval(40)])
    test = np.concatenate([batch[0].numpy() for batch in data.test(40)])
    matches = [np.flatnonzero(np.abs(train - image).max((1, 2, 3)) < 1e-5) for image in chosen]
    assert all(len(m) == 1 for m in matches) and len({int(m[0]) for m in matches}) == 16
    assert not any(np.abs(test - image).max((1, 2, 3)).min() < 1e-5 for image in chosen)


def test_a_sparse_export_of_one_format_prints_a_summary(saved, cifar, tmp_path, capsys):
    report = export_script.main(export_args(saved, cifar, tmp_path / "out", "--formats", "tflite_fp32",
                                            "--sparse", "on"))
    assert report["sparse"] is True and report["formats"]["tflite_fp32"]["sparse"] is True
    assert "eval" not in report["formats"]["tflite_fp32"] and "tf" not in report
    assert json.loads((tmp_path / "out" / "export.json").read_text()) == report
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ResNet-8 ") and "sparse TFLite kernels on" in lines[0]
    assert lines[1].startswith("tflite_fp32: ") and lines[-1] == f"report: {tmp_path / 'out' / 'export.json'}"


@pytest.mark.parametrize("extra, message", [
    (["--formats", "saved_model,onnx"], "error: --formats: unknown format 'onnx'"),
    (["--trained_param", "/nonexistent.pkl"], "error: --trained_param /nonexistent.pkl does not exist"),
    (["--out_dir", "FILE"], "error: --out_dir"),
    (["--sparse", "maybe"], "error: --sparse must be one of auto, on, off"),
    (["--representative_images", "0"], "error: --representative_images must be positive"),
    (["--int8_io", "--formats", "tflite_fp32"], "error: --int8_io applies to --formats tflite_int8"),
    (["--image_size", "64"], "error: --image_size applies to --dataset imagenet or mnist, not cifar10"),
])
def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(extra, message, saved, cifar, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(tmp_path / "FILE") if e == "FILE" else e for e in extra]
    before = digests(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        export_script.main(export_args(saved, cifar, tmp_path / "out", *extra))
    assert exit_.value.code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()
