"""The policy search and its methods: resuming after a roll-out equals an uninterrupted search, the
roll-outs never retrace, the learner takes the policy found, the uniform baseline, per-layer bit
files, and one-line refusals of bad options and of a corrupt search state."""

import json

import numpy as np
import pytest
import tensorflow as tf

import nets
import train_cifar
from codebase import channel_stats
from codebase.config import parse_config
from codebase.ddpg import DDPGConfig
from codebase.methods.quantization import layer_bits
from codebase.policy_envs import ChannelEnv
from codebase.policy_search import STATE, PolicySearch, RolloutScorer
from op_utils import loop
from op_utils.task import Classify
from op_utils.trainer import Trainer
from op_utils.optim import Adam
from tests.support.data import write_cifar10
from tests.support.nets import randomise
from utils.errors import ConfigError

SCRIPT = dict(arch="ResNet-8", dataset="cifar10", train_path="runs/x")
CONFIG = DDPGConfig(hidden=16, batch_size=4, buffer_size=8, rollouts=6, warmup=2)


def search_parts(tune=False):
    strategy = tf.distribute.get_strategy()
    net = nets.build("ResNet-8", masked=True, input_size=8)
    randomise(net, seed=4)
    groups = [p.group for p in channel_stats.problems(net, streams=True)]
    env = ChannelEnv(net, groups, 0.6, 0.25)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=24).astype(np.int32)
    val = tf.data.Dataset.from_tensor_slices((images[:16], labels[:16])).batch(6)
    calib = tf.data.Dataset.from_tensor_slices((images[16:], labels[16:])).batch(8)
    tuner = None
    if tune:
        trainer = Trainer(strategy, Classify(net), Adam(1e-3), global_batch_size=4)
        tuner = loop.Tuner(trainer, lambda epoch, ctx: tf.data.Dataset.from_tensor_slices(
            (images[16:], labels[16:])).shuffle(8, seed=epoch).batch(4, drop_remainder=True))
    scorer = RolloutScorer(strategy, net, val, calib, tuner=tuner, tune_steps=3 if tune else 0,
                           snapshot=net.get_params() if tune else None)
    return env, scorer, tuner


def test_a_search_resumed_after_a_rollout_ends_as_an_uninterrupted_one(tmp_path):
    env, scorer, _ = search_parts()
    whole = PolicySearch(env, scorer, CONFIG, 3, str(tmp_path / "whole")).run()
    first = PolicySearch(env, scorer, CONFIG, 3, str(tmp_path / "cut"))
    first.run(stop_after=3)
    second = PolicySearch(env, scorer, CONFIG, 3, str(tmp_path / "cut"))
    resumed = second.run(resume=True)
    # The loss is summed by multi-threaded kernels (not exact across processes); what the agent sees is.
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "loss")} for r in whole["rollouts"]]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "loss")} for r in resumed["rollouts"]] == strip
    assert len(strip) == 6 and resumed["best"]["policy"] == whole["best"]["policy"]
    assert len({json.dumps(r["policy"], sort_keys=True) for r in strip}) > 1  # the roll-outs explore
    again = PolicySearch(env, scorer, CONFIG, 3, str(tmp_path / "again")).run()
    assert [r["reward"] for r in again["rollouts"]] == [r["reward"] for r in whole["rollouts"]]
    assert all(np.isclose(r["flops_rate"], env.summary(r["policy"])["flops_rate"]) and r["flops_rate"] <= 0.6
               for r in whole["rollouts"])


def test_rollouts_trace_the_evaluation_the_re_estimation_and_the_tuning_once(tmp_path):
    env, scorer, tuner = search_parts(tune=True)
    search = PolicySearch(env, scorer, CONFIG, 0, str(tmp_path / "s")).run()
    assert len(search["rollouts"]) == 6
    assert scorer.trace_counts() == {"evaluate": 1, "recalibrate": 1}
    assert tuner.trainer._train_fn.experimental_get_tracing_count() == 1
    assert all(np.isfinite(r["tune_loss"]) for r in search["rollouts"])


def test_each_rollout_tunes_from_the_trained_weights(tmp_path):
    env, scorer, _ = search_parts(tune=True)
    trained = scorer.snapshot
    policy = env.uniform()
    env.apply(policy)
    first = scorer(1)
    second = scorer(1)  # the same tuning again, from the same start
    assert first == second
    changed = scorer.net.get_params()
    assert any(not np.array_equal(changed[k], trained[k]) for k in trained)


def test_a_corrupt_search_state_gets_a_one_line_error(tmp_path):
    env, scorer, _ = search_parts()
    folder = tmp_path / "s"
    PolicySearch(env, scorer, CONFIG, 0, str(folder)).run(stop_after=2)
    (folder / STATE).write_bytes(b"not an npz")
    with pytest.raises(ConfigError, match="policy search state .* is unreadable"):
        PolicySearch(env, scorer, CONFIG, 0, str(folder)).run(resume=True)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    data = str(write_cifar10(root, per_batch=8, num_test=8).path)
    trained = root / "r8.pkl"
    from codebase.artifacts import save_net
    net = nets.build("ResNet-8")
    randomise(net, seed=5)
    save_net(net, str(trained))
    return ["--dataset", "cifar10", "--data_path", data, "--trained_param", str(trained)]


RUN = ["--arch", "ResNet-8", "--train_epoch", "1", "--steps_per_epoch", "2", "--batch_size", "8", "--val_batch_size",
       "8", "--rl_rollouts", "3", "--rl_warmup", "2", "--rl_val_images", "10", "--rl_bn_images", "8",
       "--rl_batch_size", "2"]


def test_rl_cp_with_the_uniform_baseline_prunes_to_the_target(cifar, tmp_path):
    run = tmp_path / "run"
    results = train_cifar.main(["--method", "rl_cp", "--rl_uniform", "--search_target_rate", "0.6", *cifar, *RUN,
                                "--train_path", str(run)])
    search = json.loads((run / "1-rl_cp" / "search" / "search.json").read_text())
    assert search["rollouts"] == [] and search["best"] is None
    assert results["flops_rate"] <= 0.6 and abs(results["flops_rate"] - search["uniform"]["flops_rate"]) < 1e-9


def test_per_layer_bits_files_are_checked():
    keys = ["a", "b"]
    assert layer_bits(keys, 4, None, "uq_bits_file") == {"a": 4, "b": 4}


@pytest.mark.parametrize("content,message", [({"a": 4}, "no bits for 'b'"), ({"a": 4, "b": 4, "c": 2}, "'c' is not"),
                                             ({"a": 4, "b": 2.5}, "must be an integer in"),
                                             ({"a": 4, "b": 9}, r"integer in \[1, 8\]")])
def test_a_bad_bits_file_names_its_problem(tmp_path, content, message):
    path = tmp_path / "bits.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        layer_bits(["a", "b"], 4, str(path), "nuq_bits_file", max_bits=8)


@pytest.mark.parametrize("flags,message", [
    (["--method", "rl_cp", "--rl_warmup", "200"], "--rl_warmup 200 leaves no roll-out"),
    (["--method", "rl_cp", "--cp_protocol", "uniform"], "drop --cp_protocol"),
    (["--method", "rl_ws", "--ws_protocol", "heurist"], "drop --ws_protocol"),
    (["--method", "rl_uq", "--uq_weight_bits", "9"], r"\[--rl_min_bits, --rl_max_bits\] = \[2, 8\]"),
    (["--method", "rl_nuq", "--rl_min_bits", "5", "--rl_max_bits", "4"], "1 <= min <= max <= 8"),
    (["--method", "rl_uq", "--rl_buffer_size", "3"], "--rl_buffer_size 3 is below --rl_batch_size 64"),
    (["--method", "rl_uq", "--uq_bits_file", "missing.json"], "--uq_bits_file missing.json does not exist"),
])
def test_bad_search_options_are_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(flags, SCRIPT)
