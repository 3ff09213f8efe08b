"""Tests for utils.devices.

tests/conftest.py splits the CPU into two logical devices before TensorFlow starts; the
``started`` fixture makes sure TensorFlow has initialised, so these tests see the same
state whatever ran before them and never change the split for later tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from utils.devices import has_gpu, split_cpu, visible_gpus
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
