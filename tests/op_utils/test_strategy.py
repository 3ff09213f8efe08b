"""Strategy selection and the --compile flag (the multi-worker branch is in test_multiworker)."""
import pytest
import tensorflow as tf

from op_utils.strategy import make_strategy, resolve_xla
from utils.errors import ConfigError


@pytest.mark.parametrize("replicas", [1, 2])
def test_cpu_strategy_is_mirrored_over_logical_cpus(replicas, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = make_strategy(num_replicas=replicas)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == replicas
    assert all("CPU" in d for d in strategy.extended.worker_devices)


def test_single_worker_tf_config_stays_mirrored(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    assert isinstance(make_strategy(), tf.distribute.MirroredStrategy)


def test_bad_requests_are_config_errors(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "not json")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        make_strategy()
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(ConfigError):
        make_strategy(num_replicas=3)  # the conftest already fixed 2 logical CPUs
    with pytest.raises(ConfigError, match="num_replicas"):
        make_strategy(num_replicas=0)
    with pytest.raises(ConfigError, match="GPU"):
        make_strategy(gpu_id="3")  # no GPU on the test machine


def test_resolve_xla():
    assert resolve_xla("on") is True
    assert resolve_xla("OFF") is False
    assert resolve_xla("auto") is bool(tf.config.list_physical_devices("GPU"))
    for bad in ("yes", "", None, True):
        with pytest.raises(ConfigError, match="--compile"):
            resolve_xla(bad)


_ALLOCATOR_PROBE = """
import os
import tensorflow as tf
from op_utils.strategy import make_strategy
make_strategy(None, {replicas})
tf.random.normal([64, 64])
print(os.environ.get("TF_CPU_ALLOCATOR_USE_BFC"))
"""


@pytest.mark.parametrize("env_value, expected", [(None, "true"), ("false", "false")])
def test_make_strategy_selects_the_caching_cpu_allocator(env_value, expected):
    # Without it every step under a strategy re-maps its memory (docs/benchmarks.md, sec. 3), so
    # make_strategy asks for it before TensorFlow starts, and leaves a user's own choice alone.
    import subprocess
    import sys

    from tests.op_utils.procs import REPO, toy_env

    env = toy_env()
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if env_value is not None:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = env_value
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE.format(replicas=2)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == expected
