"""The methods' smoke runs, shared by tests/codebase/test_methods.py and test_methods_pruning.py.

Every registered method runs end to end through `train_cifar.py`, once, on tiny data with
accumulation; the methods in `REPLICATED` (one of each kind of stage: EKG's search and memory bank,
the shunt and data-free procedures, a policy search) and the chains run on two replicas, the rest
on one (a second replica doubles a run's tracing, and the engine's own tests cover replicas). A new
method registers its tiny options in `SMOKE` (a test fails until it does); the pruning methods' runs
are collected in their own test file (`PRUNING`), so that the two halves of the slowest tests run on
two test workers side by side.
"""

import collections
import json

import numpy as np
import pytest
import tensorflow as tf

import nets
import test as test_script
import train_cifar
from codebase.artifacts import load_net, save_net
from tests.support.data import write_cifar10, write_mnist
from utils.params_io import load_params

ENGINE = ["--train_epoch", "1", "--steps_per_epoch", "2", "--batch_size", "8", "--val_batch_size", "8",
          "--do_log", "1", "--baseline_epoch", "1", "--accum", "2"]
REPLICATED = ("ekg", "shunt", "dfkd", "rl_uq")
RL = ["--rl_rollouts", "3", "--rl_warmup", "2", "--rl_val_images", "8", "--rl_bn_images", "8", "--rl_batch_size", "2"]
# Per method: the net and data of its smoke run and tiny options (big_vision's runlocal configs).
# LeNet-5 on MNIST traces fastest; methods that need BatchNorm run ResNet-8 on CIFAR-10.
SMOKE = {
    "none": ("LeNet-5", []),
    "l1": ("LeNet-5", ["--search_target_rate", "0.6", "--search_batch_size", "8"]),
    "random": ("LeNet-5", ["--search_target_rate", "0.6", "--search_batch_size", "8"]),
    "kd": ("LeNet-5", ["--kd_temperature", "2", "--kd_weight", "0.5"]),
    "ekg": ("ResNet-8", ["--search_target_rate", "0.9", "--search_batch_size", "16", "--search_train_per_class", "2",
                          "--search_val_per_class", "2", "--num_teacher", "2"]),
    "resrep": ("ResNet-8", ["--resrep_epoch", "1", "--resrep_interval", "1", "--resrep_before_mask", "0.3",
                             "--resrep_target", "0.9", "--search_batch_size", "16"]),
    "cp": ("ResNet-8", ["--search_target_rate", "0.7", "--search_batch_size", "16", "--cp_batches", "1",
                         "--cp_points_per_image", "4"]),
    "cpr": ("ResNet-8", ["--cp_protocol", "uniform", "--cp_preserve_ratio", "0.5", "--search_batch_size", "16",
                          "--cp_batches", "1", "--cp_points_per_image", "4", "--cp_list_group", "3",
                          "--cp_tune_steps", "1"]),
    "dcp": ("ResNet-8", ["--cp_protocol", "uniform", "--cp_preserve_ratio", "0.25", "--search_batch_size", "16",
                          "--dcp_stages", "1", "--dcp_block_steps", "0", "--dcp_layer_steps", "1", "--dcp_chunk", "16"]),
    "dfkd": ("hinton-800", ["--student_arch", "LeNet-5", "--dfkd_objective", "spectral_layer_pairs",
                            "--dfkd_steps", "2", "--dfkd_batch_size", "2", "--dfkd_batches_per_class", "2",
                            "--dfkd_shard_batches", "1", "--dfkd_spectral_fraction", "0.05"]),
    "shunt": ("ResNet-8", ["--shunt_blocks", "BasicBlock0.0:BasicBlock1.0", "--shunt_expand", "8",
                           "--shunt_bottleneck", "4", "--shunt_epochs", "1", "--shunt_batch_size", "8",
                           "--shunt_latency_batch", "2", "--shunt_latency_runs", "1", "--shunt_kd_weight", "4"]),
    "ws": ("LeNet-5", ["--ws_sparsity", "0.5", "--ws_update_every", "1", "--ws_protocol", "heurist"]),
    "uq": ("LeNet-5", ["--uq_weight_bits", "4", "--uq_activation_bits", "8", "--uq_buckets", "channel",
                       "--export", "tflite_fp32", "saved_model"]),
    "nuq": ("LeNet-5", ["--nuq_weight_bits", "2", "--nuq_activation_bits", "4", "--nuq_buckets", "split",
                        "--nuq_bucket_size", "64", "--nuq_opt", "both"]),
    # The policy searches: 3 roll-outs (2 of warm-up), the learner with the policy found.
    "rl_cp": ("LeNet-5", [*RL, "--search_target_rate", "0.7", "--search_batch_size", "8", "--rl_pruner", "cp",
                          "--cp_batches", "1", "--cp_points_per_image", "4", "--rl_tune_steps", "1"]),
    "rl_ws": ("LeNet-5", [*RL, "--ws_sparsity", "0.5", "--ws_update_every", "1"]),
    "rl_uq": ("LeNet-5", [*RL, "--uq_weight_bits", "3", "--rl_max_bits", "4", "--rl_reward", "loss"]),
    "rl_nuq": ("LeNet-5", [*RL, "--nuq_weight_bits", "3", "--rl_max_bits", "4", "--nuq_activation_bits", "8"]),
}


PRUNING = ("l1", "random", "ekg", "resrep", "cp", "cpr", "dcp", "rl_cp")  # run by test_methods_pruning.py


def make_data(tmp_path_factory):
    """Each net's data flags, and `--trained_param` of a saved (untrained) net of each arch."""
    root = tmp_path_factory.mktemp("data")
    saved = {}
    for arch in ("LeNet-5", "ResNet-8", "hinton-800"):
        saved[arch] = root / f"{arch}.pkl"
        save_net(nets.build(arch, masked=False), str(saved[arch]))
    mnist = ["--dataset", "mnist", "--data_path", str(write_mnist(root / "mnist", num_train=24, num_test=8).path)]
    # Data-free distillation's statistics need every class in the training set.
    balanced = write_mnist(root / "mnist_balanced", num_train=20, num_test=8, balanced=True).path
    return {"LeNet-5": mnist, "hinton-800": ["--dataset", "mnist", "--data_path", str(balanced)],
            "ResNet-8": ["--dataset", "cifar10", "--data_path", str(write_cifar10(root / "cifar", per_batch=8,
                                                                                   num_test=8).path)],
            "trained": {arch: ["--trained_param", str(path)] for arch, path in saved.items()}}


def args_of(method, data, run, *extra):
    arch, options = SMOKE[method.split(",")[-1]]
    replicas = "2" if "," in method or method in REPLICATED else "1"
    return ["--method", method, "--arch", arch, *data[arch], "--train_path", str(run), *ENGINE,
            "--num_replicas", replicas, *options, *extra]


def run_method(method, data, tmp_path_factory):
    """Every method but `none` starts from a saved net (`--trained_param`: no baseline to train first; a
    distillation's teacher is that net); `none` trains from scratch. The chains train a baseline."""
    run = tmp_path_factory.mktemp(method) / "run"
    start = [] if method == "none" else data["trained"][SMOKE[method][0]]
    return method, run, train_cifar.main(args_of(method, data, run, *start))


def check_end_to_end(method_run, data, capsys):
    """What every method's smoke run must show; then the method's own checks (`CHECKS`)."""
    method, run, results = method_run
    stages = json.loads((run / "stages.json").read_text())
    steps = list(results["steps"])
    assert steps == [s for s in dict.fromkeys(name.split("/")[0] for name in stages)]
    assert steps[-1] == f"{len(steps) - (steps[0] == '0-baseline')}-{method}" and stages[-1].endswith(
        "/export" if "--export" in SMOKE[method][1] else "/test")
    for name in steps:  # every step wrote its net and its results
        assert (run / name / "trained_params.pkl").exists() and (run / name / "results.json").exists()
    assert results == json.loads((run / "results.json").read_text()) and results["count"] == 8
    # The log holds every line once (no handler twice) and no tf.function retracing warning from any
    # stage (TensorFlow's warnings reach the run's log).
    lines = (run / "log.txt").read_text().splitlines()
    assert lines and not [line for line, n in collections.Counter(lines).items() if n > 1]
    assert not [line for line in lines if "retracing" in line]
    assert results["ekg_flops"] <= results["full_ekg_flops"]
    if method in ("l1", "random", "ekg", "resrep", "cp", "cpr", "dcp", "rl_cp"):
        assert results["ekg_flops"] < results["full_ekg_flops"] and results["before_finetune_top1"] >= 0
    # The final net is the last step's; test.py reads it (its spec gives the architecture) and agrees.
    assert (run / "trained_params.pkl").read_bytes() == (run / steps[-1] / "trained_params.pkl").read_bytes()
    capsys.readouterr()
    arch = SMOKE[method][0]
    out = test_script.main([*data[arch], "--trained_param", str(run / "trained_params.pkl"), "--json",
                            "--latency_runs", "1"])
    student = dict(zip(SMOKE[method][1], SMOKE[method][1][1:])).get("--student_arch")  # a new net (dfkd)
    assert out["arch"] == (student or arch) and out["top1"] == pytest.approx(results["top1"]) and out["widths"] == results["widths"]
    if method in CHECKS:
        CHECKS[method](run, results, data, capsys)


def check_kd(run, results, data, capsys):
    log = (run / "log.txt").read_text()
    assert " ce=" in log and " kd=" in log  # the loop's epoch line; TensorBoard gets train/ce, train/kd
    teacher = json.loads((run / "1-kd" / "teacher.json").read_text())
    assert teacher["arch"] == "LeNet-5" and 0 <= teacher["top1"] <= 1 and teacher["params"] > 0


def check_ekg(run, results, data, capsys):
    bank = np.load(run / "1-ekg" / "knowledge.npy")
    assert bank.shape == (40, 10, 2) and np.isfinite(bank).all()  # every training image, 2 teachers
    state = json.loads((run / "1-ekg" / "search_state.json").read_text())
    assert state["done"] and state["step"] == results["search_steps"] >= 1


def check_resrep(run, results, data, capsys):
    # No --train_epoch fine-tuning after a (lossless) conversion: here it runs, as ENGINE asks for one.
    step = run / "1-resrep"
    assert json.loads((run / "stages.json").read_text()) == [
        "1-resrep/resrep", "1-resrep/convert", "1-resrep/finetune", "1-resrep/test"]
    pruned = json.loads((step / "prune_results.json").read_text())
    # One mask update (after step 2, the lasso-only step 1 before it) closes at most 4 rows more than the 0
    # closed; one step cannot decay them, so the conversion is lossy and BN statistics are re-estimated.
    assert pruned["closed_channels"] == 4 and pruned["flops_rate"] < 1.0
    assert pruned["closed_norm_max"] > 0.5 and pruned["bn_reestimated"] is True
    trained = load_net("ResNet-8", str(step / "resrep_params.pkl"), input_size=32, num_classes=10)
    assert not any("compactor" in key for key in load_params(step / "resrep_params.pkl"))  # EKG params only
    closed = {k: c.group.size - int(c.mask.numpy().sum()) for k, c in trained.compactors.items()}
    assert sum(closed.values()) == 4
    assert pruned["widths"] == {k: w - closed.get(k, 0) for k, w in trained.widths().items()}
    # The masks are variables of the net: the stage's last checkpoint holds them.
    reader = tf.train.load_checkpoint(str(step / "resrep" / "ckpt"))
    [key] = [k for k in reader.get_variable_to_shape_map() if k.startswith("model/_transforms/0/mask")]
    np.testing.assert_array_equal(reader.get_tensor(key), trained.compactors["stem"].mask.numpy())
    # --pad_to: the same accuracy from every width rounded up to a multiple of 8 (at most the full 16/32/64).
    capsys.readouterr()
    padded = test_script.main([*data["ResNet-8"][:4], "--trained_param", str(run / "trained_params.pkl"), "--json",
                               "--latency_runs", "1", "--pad_to", "8"])
    assert padded["top1"] == pytest.approx(results["top1"]) and padded["pad_to"] == 8
    assert padded["widths"] == {k: min(-(-w // 8) * 8, trained.full_sizes[k]) for k, w in results["widths"].items()}


def check_policy(run, results, data, capsys):
    """The search's report and the learner's use of the policy found (no retrace across roll-outs)."""
    method = next(p.name for p in run.iterdir() if p.name.startswith("1-"))
    step = run / method
    policy = json.loads((step / "policy.json").read_text())
    search = json.loads((step / "search" / "search.json").read_text())
    assert len(search["rollouts"]) == 3 and search["rollouts_per_hour"] > 0
    assert set(search["trace_counts"].values()) == {1}
    assert search["best"]["reward"] == max([search["uniform"]["reward"]] + [r["reward"] for r in search["rollouts"]])
    if method.endswith("uq"):
        quantized = json.loads((step / "quantized.json").read_text())
        assert quantized["bits"] == policy and set(policy.values()) <= {2, 3, 4}
        assert quantized["equivalent_bits"] <= 3 + 1e-9
    elif method.endswith("ws"):
        assert abs(results["sparsity"] - 0.5) < 0.01
    else:
        assert results["flops_rate"] <= 0.7
        assert "channel statistics of" in (run / "log.txt").read_text()  # --rl_pruner cp: LASSO's choice


CHECKS = {"kd": check_kd, "ekg": check_ekg, "resrep": check_resrep, **{m: check_policy for m in (
    "rl_cp", "rl_ws", "rl_uq", "rl_nuq")}}
