"""The three entry scripts end to end, on tiny data in the real on-disk formats.

A pipeline run costs seconds of tracing, so each run is made once per module by a fixture and
shared by the tests that read its folder; a test that writes into a run works on a copy.
`tests.support.runs.training_steps` records the training steps a run takes and can crash one, in process.
"""

import gzip
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import export as export_script
import nets
import test as test_script
import train_cifar
import train_imagenet
from codebase.context import OUTPUT
from tests.support.data import idx_bytes, imagenet_example, write_cifar10, write_mnist
from tests.support.runs import Crash, Run, assert_same_params, changed, digests, error_lines, training_steps
from utils.params_io import load_params, save_params

TINY = ["--train_epoch", "1", "--steps_per_epoch", "2", "--batch_size", "8", "--val_batch_size", "8",
        "--learning_rate", "0.01", "--do_log", "1"]
# LeNet-5 on MNIST, the cheapest net to trace: 2 epochs of 3 steps with a mid-epoch checkpoint
# every 2 steps, so a crash can land between checkpoints; 2 replicas, accumulation and
# recomputation so that resuming is checked on the engine's full path.
ROOT = str(pathlib.Path(__file__).resolve().parents[2])
LENET = ["--arch", "LeNet-5", "--dataset", "mnist", "--train_epoch", "2", "--steps_per_epoch", "3",
         "--ckpt_every_steps", "2", "--batch_size", "8", "--val_batch_size", "8", "--learning_rate", "0.01",
         "--optimizer", "adam", "--schedule", "cosine", "--do_log", "1", "--num_replicas", "2", "--accum", "2",
         "--recompute"]


# === Shared data and runs ===
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data"), per_batch=8, num_test=12).path


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    # 24 training images: the 3 steps of 8 an epoch takes.
    return write_mnist(tmp_path_factory.mktemp("mnist"), num_train=24, num_test=8).path


def lenet_args(mnist, run):
    return [*LENET, "--data_path", str(mnist), "--train_path", str(run)]


@pytest.fixture(scope="module")
def lenet_run(mnist, tmp_path_factory):
    """LeNet-5 stopped after its train stage (`--stop_after train`), then resumed to the end.

    The train stage ran uninterrupted in the first process, so this is also the run a crashed and
    resumed one must reproduce; `stopped` holds what the first process returned and left (`result`,
    `steps`, `digests`, `timings`), `steps` the training steps of the resumed process.
    """
    path = tmp_path_factory.mktemp("lenet") / "run"
    with training_steps() as steps:
        result = train_cifar.main(lenet_args(mnist, path) + ["--stop_after", "train"])
    stopped = dict(result=result, steps=steps, digests=digests(path),
                   timings=json.loads((path / "timings.json").read_text()))
    with training_steps() as steps:
        results = train_cifar.main(lenet_args(mnist, path) + ["--resume"])
    return Run(path, results, steps, stopped)


XLA_TEST = "test_xla_training_of_a_net_that_max_pools"


@pytest.fixture(scope="module", autouse=True)
def xla_process(request, mnist, tmp_path_factory):
    """The run of `test_xla_training_of_a_net_that_max_pools`, in a process of its own: started with
    the module (when that test is selected), it starts TensorFlow and compiles while the runs in this
    process train, and the test waits for it. Yields `(process, run folder, its stderr file)`."""
    if not any(item.name == XLA_TEST and item.module is request.module for item in request.session.items):
        yield None
        return
    run = tmp_path_factory.mktemp("xla") / "run"
    # One thread per pool: the pools are sized in a fresh process before its runtime starts.
    argv = [*lenet_args(mnist, run), "--compile", "on", "--num_replicas", "1", "--accum", "1", "--train_epoch", "1",
            "--intra_op_threads", "1", "--inter_op_threads", "1"]
    with open(run.parent / "stderr.txt", "w+", encoding="utf-8") as err:
        proc = subprocess.Popen([sys.executable, "train_cifar.py", *argv], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            yield proc, run, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cifar_run(cifar, tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet8") / "run"
    results = train_cifar.main(["--arch", "ResNet-8", "--data_path", str(cifar), "--train_path", str(path), *TINY])
    return Run(path, results)


@pytest.fixture(scope="module")
def imagenet_3_classes(tmp_path_factory):
    # 2 shards x 6 records of 3 classes: every class has images for both EKG search subsets.
    data = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, shards in (("train", 2), ("validation", 1)):
        for s in range(shards):
            with tf.io.TFRecordWriter(str(data / f"{split}-{s:05d}-of-{shards:05d}")) as writer:
                for k in range(6):
                    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                    writer.write(imagenet_example(image, 1 + (6 * s + k) % 3))
    return data


@pytest.fixture(scope="module")
def imagenet_ekg_run(imagenet_3_classes, tmp_path_factory):
    """EKG on ImageNet shards at 32x32 (--image_size), one search step, from an untrained ResNet-8's params
    (the ImageNet pipeline, subsets and memory bank are what is tested; ResNet-18 tripled the cost).

    The warm-up and the fine-tuning train on the shards, so a baseline stage would only repeat that;
    one replica, as EKG on two is run on CIFAR (tests/codebase/test_ekg.py) and here it doubled the cost.
    """
    path = tmp_path_factory.mktemp("imagenet_ekg") / "run"
    start = path.parent / "resnet18.pkl"
    save_params(start, nets.build("ResNet-8", masked=False, num_classes=1000).get_params())
    results = train_imagenet.main(["--method", "ekg", "--arch", "ResNet-8", "--data_path", str(imagenet_3_classes),
                                   "--image_size", "32", "--train_path", str(path), "--trained_param", str(start),
                                   "--train_epoch", "1", "--steps_per_epoch", "1", "--batch_size", "2",
                                   "--val_batch_size", "4", "--search_batch_size", "4",
                                   "--search_train_per_class", "1", "--search_val_per_class", "1",
                                   "--search_target_rate", "0.99"])
    return Run(path, results)


# === CIFAR and test.py ===
@pytest.mark.slow
def test_train_cifar_then_test_json(cifar_run, cifar, capsys):
    run, results = cifar_run.path, cifar_run.results
    assert results["count"] == 12
    assert results == json.loads((run / "results.json").read_text())
    assert json.loads((run / "stages.json").read_text()) == ["1-none/train", "1-none/test"]
    assert json.loads((run / "config.json").read_text())["run"]["arch"] == "ResNet-8"
    assert list((run / "1-none" / "train" / "tensorboard").iterdir())
    # The final net at the top is the last step's, with its spec; results.json summarises every step.
    assert (run / "trained_params.pkl").read_bytes() == (run / "1-none" / "trained_params.pkl").read_bytes()
    assert results["steps"]["1-none"]["top1"] == results["top1"] and (run / OUTPUT).exists()
    params = load_params(run / "trained_params.pkl")
    assert params["conv/kernel:0"].shape == (3, 3, 3, 16)

    capsys.readouterr()
    out = test_script.main(["--arch", "ResNet-8", "--data_path", str(cifar), "--trained_param",
                            str(run / "trained_params.pkl"), "--json", "--batch_size", "2", "--latency_runs", "2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == out
    for key in ("top1", "top5", "loss", "params", "flops", "macs", "latency_ms", "batch_size", "devices"):
        assert key in printed
    assert printed["devices"] and all("CPU" in d for d in printed["devices"])
    assert printed["top1"] == pytest.approx(results["top1"])
    assert printed["flops"] == pytest.approx(12.67e6, rel=1e-3) and printed["batch_size"] == 2
    assert out["count"] == 12


def test_test_py_with_one_thread_per_pool_gives_the_same_results(cifar_run, cifar, capsys):
    # The pools are fixed when TensorFlow starts, so the one-thread run is a fresh process.
    argv = ["--arch", "ResNet-8", "--data_path", str(cifar), "--trained_param",
            str(cifar_run.path / "trained_params.pkl"), "--json", "--latency_runs", "1"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "test.py", *argv, "--intra_op_threads", "1", "--inter_op_threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    one = json.loads(proc.stdout.strip().splitlines()[-1])
    assert one["threads"] == {"intra_op": 1, "inter_op": 1}
    capsys.readouterr()
    default = test_script.main(argv)
    assert one["top1"] == default["top1"] and one["loss"] == pytest.approx(default["loss"], rel=1e-5)


# === LeNet-5 on MNIST: stop, resume, crash ===
def test_lenet_on_mnist_idx_files(lenet_run):
    run, results = lenet_run.path, lenet_run.results
    assert results["count"] == 8 and 0 <= results["top1"] <= 1
    assert results == json.loads((run / "results.json").read_text())
    config = json.loads((run / "config.json").read_text())["run"]
    assert (config["arch"], config["num_replicas"], config["accum"], config["recompute"]) == ("LeNet-5", 2, 2, True)
    assert json.loads((run / "stages.json").read_text()) == ["1-none/train", "1-none/test"]
    assert set(json.loads((run / "timings.json").read_text())) == {"1-none/train", "1-none/test"}
    # The last two checkpoints: the second epoch's mid-epoch one and its end.
    assert sorted(p.name for p in (run / "1-none" / "train" / "ckpt").glob("*.index")) == ["ckpt-4.index",
                                                                                        "ckpt-6.index"]
    # The run log names the devices it used.
    assert re.search(r"devices: \S+CPU:0 \(.*\); \S+CPU:1", (run / "log.txt").read_text())


def test_stop_after_a_stage_then_resume(lenet_run):
    run, stopped = lenet_run.path, lenet_run.stopped
    assert stopped["result"] == {} and stopped["steps"] == [1, 2, 3, 4, 5, 6]
    assert "results.json" not in stopped["digests"]
    assert re.search(r"stage 1-none/train done in [0-9.]+ s; [0-9]+ MB resident\n.*stopping after stage 1-none/train",
                     (run / "log.txt").read_text())
    # The resumed process ran the test stage only: the train stage's checkpoints, TensorBoard
    # events, params and timing are as the first process left them.
    assert lenet_run.steps == []
    assert re.findall(r"stage (\S+): already done", (run / "log.txt").read_text()) == ["1-none/train"]
    assert changed(stopped["digests"], digests(run)) == [
        "1-none/results.json", "config.json", "log.txt", "results.json", "stages.json", "timings.json",
        "trained_params.arch.json", "trained_params.pkl"]  # the test stage's results, the summary, the final net
    timings = json.loads((run / "timings.json").read_text())
    assert timings["1-none/train"] == stopped["timings"]["1-none/train"]
    assert set(timings) == {"1-none/train", "1-none/test"}


def test_a_new_run_never_overwrites_and_resume_refuses_other_flags(lenet_run, mnist, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lenet_run.path, run)
    before = digests(run)
    for extra, message in (([], "already holds a run"), (["--learning_rate", "0.02", "--resume"],
                                                         "different --learning_rate")):
        with training_steps() as steps, pytest.raises(SystemExit) as exit_:
            train_cifar.main(lenet_args(mnist, run) + extra)
        assert exit_.value.code == 2 and steps == []
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and message in errors[0], errors
        assert changed(before, digests(run)) == []


def test_resume_of_a_finished_run_redoes_nothing(lenet_run, mnist, tmp_path):
    run = tmp_path / "run"  # a copy elsewhere: a moved run folder resumes too
    shutil.copytree(lenet_run.path, run)
    before = digests(run)
    log_before = (run / "log.txt").read_text()
    # Run control and memory knobs may differ on resume.
    with training_steps() as steps:
        results = train_cifar.main(lenet_args(mnist, run) + ["--resume", "--no-recompute"])
    assert steps == []
    assert results == lenet_run.results
    # Checkpoints, TensorBoard events, params, stages.json, timings.json and results.json are as
    # they were (a stage run again would at least rewrite its timing and open a new event file);
    # config.json holds the new run control and the folder it is now in.
    assert changed(before, digests(run)) == ["config.json", "log.txt"]
    saved = json.loads((lenet_run.path / "config.json").read_text())
    assert json.loads((run / "config.json").read_text()) == {
        **saved, "run": {**saved["run"], "train_path": str(run), "recompute": False}}
    log = (run / "log.txt").read_text()
    assert log.startswith(log_before)
    added = log[len(log_before):]
    assert re.findall(r"stage (\S+): already done", added) == ["1-none/train", "1-none/test"]
    assert not re.search(r"stage \S+$", added, re.MULTILINE), added


def test_stop_after_names_a_stage_of_the_method(mnist, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(lenet_args(mnist, tmp_path / "run") + ["--stop_after", "search"])
    assert exit_.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --stop_after 'search' is not a stage of --method none (1-none/train, 1-none/test)"]


def test_resume_after_a_crash_inside_a_training_stage(lenet_run, mnist, tmp_path):
    run = tmp_path / "run"
    # The process dies after step 5, which had no checkpoint: the resumed run must redo it from ckpt-4.
    with training_steps(crash_at=6) as steps, pytest.raises(Crash):
        train_cifar.main(lenet_args(mnist, run))
    assert steps == [1, 2, 3, 4, 5]
    assert not (run / "stages.json").exists() and not (run / "trained_params.pkl").exists()
    assert tf.train.latest_checkpoint(str(run / "1-none" / "train" / "ckpt")).endswith("ckpt-4")

    with training_steps() as steps:
        results = train_cifar.main(lenet_args(mnist, run) + ["--resume"])
    assert steps == [5, 6]
    assert re.search(r"resumed from \S+ckpt-4 \(epoch 2, step 1 of it, global step 4\)", (run / "log.txt").read_text())
    assert json.loads((run / "stages.json").read_text()) == ["1-none/train", "1-none/test"]
    assert_same_params(run / "trained_params.pkl", lenet_run.path / "trained_params.pkl")
    assert results["loss"] == pytest.approx(lenet_run.results["loss"], rel=1e-5)
    assert results["top1"] == lenet_run.results["top1"]


def test_a_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    # Every label is 0 and the learning rate is a constant near float32's maximum: the first (Nesterov)
    # update moves the class-0 bias by 1.9 x lr x (1 - p0) > 3.4e38 (p0 is about 0.1 at initialisation),
    # so it becomes +inf, and the second step's softmax cross-entropy of a +inf logit is NaN
    # whatever the layers before the logits (and oneDNN's fused ReLU) make of the huge weights.
    fake = write_mnist(tmp_path / "mnist", num_train=24, num_test=8)
    fake.files["train-labels-idx1-ubyte"].write_bytes(gzip.compress(idx_bytes(np.zeros(24, np.uint8), 2049)))
    run = tmp_path / "run"
    with training_steps() as steps, pytest.raises(SystemExit) as exit_:
        train_cifar.main(["--arch", "LeNet-5", "--dataset", "mnist", "--data_path", str(fake.path), "--train_path",
                          str(run), "--train_epoch", "1", "--steps_per_epoch", "3", "--ckpt_every_steps", "1",
                          "--batch_size", "8", "--learning_rate", "3e38", "--decay_rate", "1", "--weight_decay", "0"])
    assert exit_.value.code == 2 and steps == [1, 2]
    errors = error_lines(capsys.readouterr().err)
    ckpt = run / "1-none" / "train" / "ckpt"
    assert errors == [f"error: loss is NaN at step 2 (epoch 1); last checkpoint kept at {ckpt / 'ckpt-1'}"]
    # The checkpoint of step 1 is complete and readable (with the +inf bias); nothing of step 2 was saved.
    assert tf.train.latest_checkpoint(str(ckpt)) == str(ckpt / "ckpt-1")
    reader = tf.train.load_checkpoint(str(ckpt / "ckpt-1"))
    assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert np.isposinf(reader.get_tensor("model/fc3/biases/.ATTRIBUTES/VARIABLE_VALUE")[0, 0])
    assert all(reader.get_tensor(name) is not None for name, _ in tf.train.list_variables(str(ckpt / "ckpt-1")))
    assert not (run / "stages.json").exists() and not (run / "trained_params.pkl").exists()


# === Configuration ===
@pytest.mark.parametrize("method_from", ["flag", "file"])
def test_config_precedence(method_from, imagenet_3_classes, tmp_path, capsys):
    # dataclass defaults < ImageNet's fine-tuning recipe (chosen by the method) < train_imagenet's own
    # defaults < --config FILE < flags. The --trained_param is an empty pickle whose spec names another
    # arch, so the run stops in its first stage with one error line naming the --arch in effect, after
    # config.json is written complete (and before a ResNet-50 is built: 25M params, twice).
    overlay = {"weight_decay": 3e-4, "val_batch_size": 16, "seed": 5, "image_size": 32}
    method = ["--method", "random"] if method_from == "flag" else []
    if method_from == "file":
        overlay["method"] = "random"
    (tmp_path / "config.json").write_text(json.dumps(overlay))
    start = tmp_path / "start.pkl"
    start.write_bytes(pickle.dumps({}))
    (tmp_path / "start.arch.json").write_text(json.dumps({"arch": "ResNet-8"}))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_imagenet.main([*method, "--config", str(tmp_path / "config.json"), "--data_path", str(imagenet_3_classes),
                             "--train_path", str(run), "--trained_param", str(start), "--seed", "7"])
    assert exit_.value.code == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {start} holds a ResNet-8 (see {tmp_path / 'start.arch.json'}), "
                                                    "not --arch ResNet-50"]
    saved = json.loads((run / "config.json").read_text())
    [step] = saved["steps"]  # a --trained_param: no baseline step
    assert (step["name"], step["method"]) == ("1-random", "random")
    assert step["options"] == {"search_target_rate": 0.45, "search_batch_size": 256}  # dataclass defaults
    assert {k: step["optim"][k] for k in ("momentum", "warmup_epochs")} == {"momentum": 0.9, "warmup_epochs": 0.0}
    assert {k: step["optim"][k] for k in ("learning_rate", "decay_points", "decay_rate", "batch_size", "train_epoch")} \
        == {"learning_rate": 0.01, "decay_points": [0.3, 0.6, 0.8], "decay_rate": 0.2, "batch_size": 256,
            "train_epoch": 90}  # ImageNet's fine-tuning recipe
    assert step["optim"]["weight_decay"] == 3e-4  # the file, over the recipe
    expected = dict(arch="ResNet-50", dataset="imagenet",  # the script's defaults
                    val_batch_size=16, image_size=32,  # the file
                    seed=7, method="random", train_path=str(run))  # the flags, over the file
    assert {key: saved["run"][key] for key in expected} == expected


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{'seed': 1}", "not valid JSON"),
    ("5", "expected a JSON object of config fields, got int"),
    ('{"seeds": 1}', "unknown field 'seeds'"),
])
def test_a_bad_config_file_is_one_clear_line(content, message, tmp_path, capsys):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(["--config", str(path), "--train_path", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {path}: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--data_path", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--intra_op_threads", "-1"], "--intra_op_threads must be 0 (one per core) or a count of threads, got -1"),
    (["--decay_points", "0.5", "0.2"], "--decay_points"),
    (["--compile", "maybe"], "--compile must be one of"),
    (["--method", "ekg", "--search_round_to", "0"], "--search_round_to must be positive"),
    (["--method", "ekg", "--search_cache_mb", "0"], "--search_cache_mb must be positive"),
    (["--search_cache_mb", "64"], "--search_cache_mb is an option of --method ekg, which this run does not use"),
    (["--method", "l1,kd", "--kd_weight", "-1"], "--kd_weight must be >= 0"),
    (["--batch_size", "6", "--accum", "4"], "multiple of"),
    (["--image_size", "32"], "--image_size applies to --dataset imagenet or mnist, not cifar10"),
    (["--arch", "ResNet-7"], "unknown --arch"),
    (["--method", "magic"], "unknown --method"),
    (["--trained_param", "/nonexistent.pkl"], "does not exist"),
])
def test_bad_input_is_one_clear_line(argv, message, cifar, tmp_path, capsys):
    base = ["--data_path", str(cifar), "--train_path", str(tmp_path / "run"), *TINY]
    with pytest.raises(SystemExit) as exit_:
        train_cifar.main(base + argv)
    assert exit_.value.code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("script", ["test", "export"])
def test_a_negative_thread_count_is_one_clear_line(script, cifar, tmp_path, capsys):
    pickle_path = tmp_path / "net.pkl"
    pickle_path.write_bytes(b"never read")
    argv = ["--data_path", str(cifar), "--trained_param", str(pickle_path), "--intra_op_threads", "-2"]
    main = test_script.main if script == "test" else export_script.main
    with pytest.raises(SystemExit) as exit_:
        main(argv + (["--out_dir", str(tmp_path / "out")] if script == "export" else []))
    assert exit_.value.code == 2
    errors = error_lines(capsys.readouterr().err)
    assert errors == ["error: --intra_op_threads must be 0 (one per core) or a count of threads, got -2"], errors


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
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and message in errors[0], errors


# === ImageNet ===
@pytest.mark.slow
def test_train_imagenet_on_tfrecord_shards_at_a_small_size(imagenet_ekg_run, imagenet_3_classes, capsys):
    run, results = imagenet_ekg_run.path, imagenet_ekg_run.results
    # The slimmed ResNet-8 was trained on the shards at --image_size.
    assert load_params(run / "trained_params.pkl")["fc/kernel:0"].shape[1] == 1000
    assert json.loads((run / "trained_params.arch.json").read_text())["config"]["input_size"] == 32
    assert 0 <= results["top5"] <= 1 and results["count"] == 6
    # test.py evaluates the slimmed result at the same size: the same accuracy and FLOPs.
    capsys.readouterr()
    out = test_script.main(["--arch", "ResNet-8", "--dataset", "imagenet", "--data_path", str(imagenet_3_classes),
                            "--image_size", "32", "--trained_param", str(run / "trained_params.pkl"), "--json",
                            "--val_batch_size", "4", "--latency_runs", "1"])
    assert out["count"] == 6 and out["top1"] == pytest.approx(results["top1"])
    assert out["flops"] == results["ekg_flops"]


@pytest.mark.slow
def test_train_imagenet_ekg_streams_subsets_and_memory_bank(imagenet_ekg_run):
    run, results = imagenet_ekg_run.path, imagenet_ekg_run.results
    assert results["ekg_flops"] <= 0.99 * results["full_ekg_flops"]
    assert json.loads((run / "stages.json").read_text())[-1] == "1-ekg/test"
    step = run / "1-ekg"
    np.testing.assert_array_equal(np.load(step / "train_labels.npy"), np.arange(12) % 3)
    meta = json.loads((step / "knowledge.json").read_text())
    assert meta == {"shape": [12, 1000, meta["shape"][2]], "dtype": "float16"} and meta["shape"][2] >= 1
    bank = np.fromfile(step / "knowledge.f16", np.float16).reshape(meta["shape"])
    assert np.isfinite(bank).all() and np.abs(bank).max() > 0
    assert not (step / "knowledge.npy").exists()


def test_xla_training_of_a_net_that_max_pools(xla_process):
    # `--compile on` (the default on a GPU) for LeNet-5 and every ImageNet ResNet: XLA has no
    # deterministic max-pool gradient, so an XLA run must not turn op determinism on. A fresh
    # process, as a user runs it: determinism cannot be turned off in this one once a test set it.
    proc, run, err = xla_process
    proc.wait(timeout=600)
    err.seek(0)
    assert proc.returncode == 0, err.read()[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["count"] == 8 and 0 <= results["top1"] <= 1
    assert json.loads((run / "config.json").read_text())["run"]["intra_op_threads"] == 1
