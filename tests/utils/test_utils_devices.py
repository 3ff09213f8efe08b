"""Tests for utils.devices.

tests/conftest.py splits the CPU into two logical devices before TensorFlow starts; the
``started`` fixture makes sure TensorFlow has initialised, so these tests see the same
state whatever ran before them and never change the split for later tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from utils.devices import cpu_flags, has_gpu, split_cpu, use_precision, use_thread_pools, visible_gpus
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def started():
    return tf.config.list_logical_devices("CPU")


def test_split_cpu_matching_existing_split_is_a_no_op(started):
    assert len(started) == 2
    assert split_cpu(2) == ["/device:CPU:0", "/device:CPU:1"]
    assert split_cpu(1) == ["/device:CPU:0", "/device:CPU:1"]  # enough devices already
    assert len(tf.config.list_logical_devices("CPU")) == 2


def test_split_cpu_more_than_started_with_is_a_config_error(started):
    with pytest.raises(ConfigError) as info:
        split_cpu(4)
    message = str(info.value)
    assert "--num_replicas" in message and "4" in message and "2" in message
    assert "\n" not in message
    assert len(tf.config.list_logical_devices("CPU")) == 2


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_split_cpu_rejects_non_positive_counts(n):
    with pytest.raises(ConfigError, match="positive integer"):
        split_cpu(n)


def test_split_cpu_before_tensorflow_starts_creates_the_devices():
    # A fresh process, where TensorFlow has not initialised yet.
    code = "from utils.devices import split_cpu; print(split_cpu(3))"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == (
        "['/device:CPU:0', '/device:CPU:1', '/device:CPU:2']"
    )


def test_thread_pools_in_effect_are_kept_and_others_refused_once_started(started):
    threading = tf.config.threading
    now = {"intra_op": threading.get_intra_op_parallelism_threads(),
           "inter_op": threading.get_inter_op_parallelism_threads()}
    assert use_thread_pools() == now  # 0: TensorFlow's default, nothing changed
    if now["intra_op"]:
        assert use_thread_pools(now["intra_op"]) == now  # the count in effect is accepted
    with pytest.raises(ConfigError) as info:
        use_thread_pools(now["intra_op"] + 3)
    assert "--intra_op_threads" in str(info.value) and "before TensorFlow starts" in str(info.value)
    assert "\n" not in str(info.value)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="--inter_op_threads must be 0"):
            use_thread_pools(0, bad)
    assert use_thread_pools() == now


def test_has_gpu_matches_tensorflow():
    assert has_gpu() is bool(tf.config.list_physical_devices("GPU"))


def test_out_of_range_gpu_id_names_id_and_count(started):
    count = len(tf.config.list_physical_devices("GPU"))
    with pytest.raises(ConfigError) as info:
        visible_gpus(f"0,{count}" if count else "0")
    bad = count if count else 0
    assert str(info.value).startswith(
        f"--gpu_id {bad} does not exist: this machine has {count} GPU(s)"
    )


@pytest.mark.parametrize("ids", ["a", "0,x", "-1", "0,0"])
def test_malformed_gpu_ids(ids):
    with pytest.raises(ConfigError, match="--gpu_id"):
        visible_gpus(ids)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU-only check")
def test_no_gpus_on_a_cpu_machine(started):
    assert visible_gpus("") == []
    assert visible_gpus(None) == []
    assert visible_gpus(" , ") == []


_BF16 = "auto_mixed_precision_onednn_bfloat16"


@pytest.fixture
def grappler_restored():
    before = bool(tf.config.optimizer.get_experimental_options().get(_BF16, False))
    yield
    tf.config.optimizer.set_experimental_options({_BF16: before})


def test_float32_precision_changes_nothing(grappler_restored):
    before = tf.config.optimizer.get_experimental_options()
    use_precision("float32", flags=set())
    assert tf.config.optimizer.get_experimental_options() == before


@pytest.mark.parametrize("precision,flags,words", [
    ("bfloat16", {"avx2", "avx512f"}, ["--precision bfloat16", "avx512_bf16", "amx_bf16"]),
    ("float16", {"avx512_bf16"}, ["--precision", "float16"]),
])
def test_precision_refused_in_one_line(grappler_restored, precision, flags, words):
    with pytest.raises(ConfigError) as info:
        use_precision(precision, flags=flags)
    assert all(word in str(info.value) for word in words) and "\n" not in str(info.value)
    assert not tf.config.optimizer.get_experimental_options().get(_BF16, False)


def test_bfloat16_precision_turns_on_the_onednn_rewrite(grappler_restored):
    use_precision("bfloat16", flags={"amx_bf16"})
    assert tf.config.optimizer.get_experimental_options()[_BF16] is True


@pytest.mark.skipif(not cpu_flags() & {"avx512_bf16", "amx_bf16"}, reason="no native bfloat16 on this CPU")
def test_bfloat16_traced_conv_is_close_to_float32(grappler_restored):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((4, 16, 16, 8)), tf.float32)
    kernel = tf.constant(rng.standard_normal((3, 3, 8, 16)) / 8, tf.float32)
    reference = tf.nn.conv2d(x, kernel, 1, "SAME")
    use_precision("bfloat16")
    traced = tf.function(lambda a, k: tf.nn.relu(tf.nn.conv2d(a, k, 1, "SAME")))(x, kernel)
    error = float(tf.reduce_max(tf.abs(traced - tf.nn.relu(reference))))
    assert 0 < error < 0.05 * float(tf.reduce_max(tf.abs(reference)))  # rewritten, and within bfloat16's 8 bits
