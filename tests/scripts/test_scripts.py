"""Smoke runs of the three entry scripts on tiny data in the real on-disk formats."""

import json
import pickle
import re

import numpy as np
import pytest
import tensorflow as tf

import test as test_script
import train_cifar
import train_imagenet
from tests.dataloader.fakes import imagenet_example, write_cifar10, write_imagenet, write_mnist
from utils.params_io import load_params

TINY = ["--train_epoch", "1", "--steps_per_epoch", "2", "--batch_size", "8", "--val_batch_size", "8",
        "--learning_rate", "0.01", "--do_log", "1"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data"), per_batch=8, num_test=12).path


def test_train_cifar_then_test_json(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    results = train_cifar.main(["--arch", "ResNet-20", "--data_path", str(cifar), "--train_path", str(run),
                                "--num_replicas", "2", "--accum", "2", "--recompute", *TINY])
    assert results["count"] == 12 if "count" in results else True
    assert set(json.loads((run / "config.json").read_text())) >= {"arch", "accum", "num_replicas"}
    assert json.loads((run / "stages.json").read_text()) == ["train", "test"]
    assert (run / "train" / "tensorboard").is_dir()
    params = load_params(run / "trained_params.pkl")
    assert params["conv/kernel:0"].shape == (3, 3, 3, 16)

    capsys.readouterr()
    out = test_script.main(["--arch", "ResNet-20", "--data_path", str(cifar), "--trained_param",
                            str(run / "trained_params.pkl"), "--json", "--batch_size", "2", "--latency_runs", "2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("top1", "top5", "loss", "params", "flops", "macs", "latency_ms", "batch_size"):
        assert key in printed
    assert printed["top1"] == pytest.approx(results["top1"])
    assert printed["flops"] == pytest.approx(41.21e6, rel=1e-3) and printed["batch_size"] == 2
    assert out["count"] == 12


def test_resume_finishes_a_run_and_a_new_run_never_overwrites(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--arch", "ResNet-20", "--data_path", str(cifar), "--train_path", str(run), *TINY]
    train_cifar.main(args)
    before = (run / "trained_params.pkl").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "already holds a run" in err
    assert (run / "trained_params.pkl").read_bytes() == before
    # --resume of a finished run redoes nothing; with other flags it is refused.
    assert train_cifar.main(args + ["--resume"])["top1"] >= 0
    with pytest.raises(SystemExit):
        train_cifar.main(args + ["--learning_rate", "0.02", "--resume"])
    assert "different --learning_rate" in capsys.readouterr().err


def test_stop_after_a_stage_then_resume(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--arch", "ResNet-20", "--data_path", str(cifar), "--train_path", str(run), *TINY]
    assert train_cifar.main(args + ["--stop_after", "train"]) == {}
    assert json.loads((run / "stages.json").read_text()) == ["train"]
    assert re.search(r"stage train done in [0-9.]+ s; [0-9]+ MB resident", (run / "log.txt").read_text())
    assert not (run / "results.json").exists()
    # Run control and memory knobs may differ on resume.
    assert train_cifar.main(args + ["--resume", "--recompute", "--search_cache_mb", "64"])["top1"] >= 0
    assert json.loads((run / "stages.json").read_text()) == ["train", "test"]
    assert set(json.loads((run / "timings.json").read_text())) == {"train", "test"}
    with pytest.raises(SystemExit):
        train_cifar.main(args[:5] + [str(tmp_path / "other")] + TINY + ["--stop_after", "search"])
    assert "--stop_after 'search' is not a stage of --method none (train, test)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data_path", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--decay_points", "0.5", "0.2"], "--decay_points"),
    (["--compile", "maybe"], "--compile must be one of"),
    (["--search_round_to", "0"], "--search_round_to must be positive"),
    (["--search_cache_mb", "0"], "--search_cache_mb must be positive"),
    (["--batch_size", "6", "--accum", "4"], "multiple of"),
    (["--arch", "ResNet-7"], "unknown --arch"),
    (["--method", "magic"], "unknown --method"),
    (["--trained_param", "/nonexistent.pkl"], "does not exist"),
])
def test_bad_input_is_one_clear_line(argv, message, cifar, tmp_path, capsys):
    base = ["--data_path", str(cifar), "--train_path", str(tmp_path / "run"), *TINY]
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(base + argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


def test_bad_pickles_are_named(cifar, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(pickle.dumps({"conv/kernel:0": np.zeros(3)})[:20])
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"fc/kernel:0": np.zeros((4, 10), np.float32)}))
    for path, message in [(corrupt, "corrupt.pkl"), (evil, "os.system"), (other, "do not fit ResNet-20")]:
        with pytest.raises(SystemExit):
            train_cifar.main(["--arch", "ResNet-20", "--data_path", str(cifar), "--train_path",
                              str(tmp_path / path.stem), "--trained_param", str(path), *TINY])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err


def test_lenet_on_mnist_idx_files(tmp_path):
    data = write_mnist(tmp_path / "mnist", num_train=16, num_test=8).path
    results = train_cifar.main(["--arch", "LeNet-5", "--dataset", "mnist", "--data_path", str(data),
                                "--train_path", str(tmp_path / "run"), "--optimizer", "adam",
                                "--schedule", "cosine", *TINY])
    assert results["count"] == 8 if "count" in results else 0 <= results["top1"] <= 1


def test_train_imagenet_on_tfrecord_shards(tmp_path):
    data = write_imagenet(tmp_path / "imagenet", train_shards=2, per_train_shard=4, val_shards=1,
                          per_val_shard=4).path
    results = train_imagenet.main(["--arch", "ResNet-18", "--data_path", str(data), "--train_path",
                                   str(tmp_path / "run"), "--train_epoch", "1", "--steps_per_epoch", "1",
                                   "--batch_size", "4", "--val_batch_size", "4"])
    assert 0 <= results["top5"] <= 1
    assert load_params(tmp_path / "run" / "trained_params.pkl")["fc/kernel:0"].shape == (512, 1000)


@pytest.mark.slow
def test_train_imagenet_ekg_streams_subsets_and_memory_bank(tmp_path):
    # 2 shards x 6 records of 3 classes: every class has images for both search subsets.
    data = tmp_path / "imagenet"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, shards in (("train", 2), ("validation", 1)):
        for s in range(shards):
            with tf.io.TFRecordWriter(str(data / f"{split}-{s:05d}-of-{shards:05d}")) as writer:
                for k in range(6):
                    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                    writer.write(imagenet_example(image, 1 + (6 * s + k) % 3))
    run = tmp_path / "run"
    results = train_imagenet.main(["--method", "ekg", "--arch", "ResNet-18", "--data_path", str(data),
                                   "--train_path", str(run), "--baseline_epoch", "1", "--train_epoch", "1",
                                   "--steps_per_epoch", "1", "--batch_size", "2", "--val_batch_size", "4",
                                   "--search_batch_size", "4", "--search_train_per_class", "1",
                                   "--search_val_per_class", "1", "--search_target_rate", "0.95",
                                   "--num_replicas", "2"])
    assert results["ekg_flops"] <= 0.95 * results["full_ekg_flops"] + 1
    assert json.loads((run / "stages.json").read_text())[-1] == "test"
    np.testing.assert_array_equal(np.load(run / "train_labels.npy"), np.arange(12) % 3)
    meta = json.loads((run / "knowledge.json").read_text())
    assert meta == {"shape": [12, 1000, meta["shape"][2]], "dtype": "float16"} and meta["shape"][2] >= 1
    bank = np.fromfile(run / "knowledge.f16", np.float16).reshape(meta["shape"])
    assert np.isfinite(bank).all() and np.abs(bank).max() > 0
    assert not (run / "knowledge.npy").exists()
