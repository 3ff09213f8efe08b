"""`dfkd` through `train_cifar.py` on tiny MNIST: the stages and their files, the student is
`--student_arch`, a reconstruction resumed in the middle of a shard ends with the images of an
uninterrupted one, shipped statistics and an earlier reconstruction are reused, and bad input is
one line naming the file or flag."""

import json

import numpy as np
import pytest

import nets
import train_cifar
from codebase.artifacts import save_net
from codebase.dfkd_data import load_shard
from tests.support.data import write_mnist
from tests.support.nets import randomise
from tests.support.runs import Crash, assert_same_params, error_lines, resnet8_start, training_steps


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfkd")
    data = write_mnist(root / "mnist", num_train=60, num_test=10, seed=1, balanced=True).path
    teacher = nets.build("hinton-800", masked=False)
    randomise(teacher)
    save_net(teacher, str(root / "teacher.pkl"))
    return root, ["--method", "dfkd", "--arch", "hinton-800", "--dataset", "mnist", "--data_path", str(data),
                  "--trained_param", str(root / "teacher.pkl"), "--student_arch", "LeNet-5", "--train_epoch", "1",
                  "--steps_per_epoch", "2", "--batch_size", "8", "--val_batch_size", "16", "--dfkd_steps", "3",
                  "--dfkd_batch_size", "2", "--dfkd_batches_per_class", "2", "--dfkd_shard_batches", "1",
                  "--ckpt_every_steps", "1"]


@pytest.fixture(scope="module")
def whole(start):
    root, flags = start
    with training_steps() as steps:
        results = train_cifar.main([*flags, "--train_path", str(root / "whole")])
    return root / "whole", results, steps


def test_the_stages_write_the_metadata_the_shards_and_a_student_of_student_arch(whole):
    run, results, steps = whole
    step = run / "1-dfkd"
    assert json.loads((run / "stages.json").read_text()) == [
        "1-dfkd/stats", "1-dfkd/reconstruct", "1-dfkd/distill", "1-dfkd/test"]
    assert (step / "teacher_stats.npz").exists()
    assert steps == [1, 2, 3, 1, 2, 3, 1, 2]  # two shards of 3 Adam steps, then 2 distillation steps
    for shard in range(2):
        images, labels = load_shard(str(step / "data" / f"shard_{shard:03d}.npz"))
        assert images.shape == (20, 28, 28, 1) and labels.tolist() == [i % 10 for i in range(20)]
    report = json.loads((step / "reconstruct.json").read_text())
    assert [s["shard"] for s in report["shards"]] == [0, 1] and report["images_per_second"] > 0
    assert results["arch"] == "LeNet-5"  # the student, not the teacher's architecture
    assert 0 <= results["top1"] <= 1 and results["count"] == 10


def test_a_reconstruction_resumed_in_the_middle_of_a_shard_ends_with_the_same_images(start, whole):
    root, flags = start
    run = root / "resumed"
    with pytest.raises(Crash), training_steps(crash_at=3):  # the first shard's last step
        train_cifar.main([*flags, "--train_path", str(run)])
    assert not (run / "1-dfkd" / "data" / "shard_000.npz").exists()
    with training_steps() as steps:
        train_cifar.main([*flags, "--train_path", str(run), "--resume"])
    assert steps == [3, 1, 2, 3, 1, 2]  # only what was left
    for shard in range(2):
        got = load_shard(str(run / "1-dfkd" / "data" / f"shard_{shard:03d}.npz"))[0]
        want = load_shard(str(whole[0] / "1-dfkd" / "data" / f"shard_{shard:03d}.npz"))[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert_same_params(run / "trained_params.pkl", whole[0] / "trained_params.pkl")


def test_shipped_statistics_and_an_earlier_reconstruction_are_reused(start, whole):
    root, flags = start
    step = whole[0] / "1-dfkd"
    with training_steps() as steps:
        train_cifar.main([*flags, "--train_path", str(root / "shipped"), "--dfkd_stats",
                          str(step / "teacher_stats.npz")])
    assert steps == [1, 2, 3, 1, 2, 3, 1, 2] and not (root / "shipped" / "1-dfkd" / "teacher_stats.npz").exists()
    for shard in range(2):  # same seed, same statistics: the same reconstruction
        np.testing.assert_allclose(load_shard(str(root / "shipped" / "1-dfkd" / "data" / f"shard_{shard:03d}.npz"))[0],
                                   load_shard(str(step / "data" / f"shard_{shard:03d}.npz"))[0], rtol=1e-6, atol=1e-6)
    with training_steps() as steps:
        train_cifar.main([*flags, "--train_path", str(root / "reused"), "--dfkd_data", str(step / "data")])
    assert steps == [1, 2]  # distillation only


@pytest.mark.parametrize("case", ["student input", "no student", "stats of another net", "partial data",
                                  "dropout objective without dropout"])
def test_bad_input_is_one_line_naming_the_problem(start, whole, tmp_path, capsys, case):
    root, flags = start
    step = whole[0] / "1-dfkd"
    extra, message = {
        "student input": (["--student_arch", "ResNet-8"], "--student_arch ResNet-8 cannot take the teacher's 28x28x1 input"),
        "no student": (["--student_arch", "nope"], "unknown --arch 'nope'"),
        "stats of another net": (["--arch", "MLP", "--trained_param", str(tmp_path / "mlp.pkl"), "--dfkd_stats",
                                  str(step / "teacher_stats.npz")], "teacher_stats.npz"),
        "partial data": (["--dfkd_data", str(tmp_path / "partial")], "shard_000.npz is missing"),
        "dropout objective without dropout": (["--dfkd_objective", "all_layers_dropout"], "drops nothing in training"),
    }[case]
    if case == "stats of another net":
        save_net(nets.build("MLP", masked=False), str(tmp_path / "mlp.pkl"))
    if case == "partial data":
        (tmp_path / "partial").mkdir()
        (tmp_path / "partial" / "shard_001.npz").write_bytes((step / "data" / "shard_001.npz").read_bytes())
    with pytest.raises(SystemExit):
        train_cifar.main([*flags, "--train_path", str(tmp_path / "run"), *extra])
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines


def test_bn_stats_needs_no_statistics_and_distils_a_cifar_resnet(tmp_path):
    flags = resnet8_start(tmp_path, "dfkd")[:-2]  # without --search_batch_size
    with training_steps() as steps:
        results = train_cifar.main([*flags, "--train_path", str(tmp_path / "run"), "--student_arch", "ResNet-8",
                                    "--dfkd_objective", "bn_stats", "--dfkd_steps", "2", "--dfkd_batch_size", "4",
                                    "--dfkd_batches_per_class", "1", "--dfkd_jitter", "2", "--dfkd_init_mean", "0.45",
                                    "--dfkd_init_std", "0.25"])
    step = tmp_path / "run" / "1-dfkd"
    assert not (step / "teacher_stats.npz").exists() and steps == [1, 2, 1]
    images, labels = load_shard(str(step / "data" / "shard_000.npz"))
    assert images.shape == (40, 32, 32, 3) and np.isfinite(images).all() and labels[:10].tolist() == list(range(10))
    assert results["arch"] == "ResNet-8"
    with pytest.raises(SystemExit):  # the spectral graph of a net with shortcuts is not a chain
        train_cifar.main([*flags, "--train_path", str(tmp_path / "spectral"), "--student_arch", "ResNet-8",
                          "--dfkd_objective", "spectral_layer_pairs"])
    with pytest.raises(SystemExit):  # a batch of 4 does not fit a micro-batch of 40 / (2 x 4) = 5 images
        train_cifar.main([*flags, "--train_path", str(tmp_path / "bad"), "--student_arch", "ResNet-8",
                          "--dfkd_objective", "bn_stats", "--dfkd_batch_size", "4", "--dfkd_batches_per_class", "1",
                          "--accum", "4", "--num_replicas", "2"])
