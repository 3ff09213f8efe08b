"""Strategy selection and the --compile flag (the multi-worker branch is in test_multiworker)."""
import re

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
import tensorflow as tf
from op_utils.strategy import make_strategy
make_strategy(None, 2)
x = tf.random.normal([64, 64])  # 16 KiB, alive while the statistics are read
try:
    print("bytes in use", tf.config.experimental.get_memory_info("CPU:0")["current"])
except ValueError:  # an allocator without statistics
    print("bytes in use unknown")
"""


@pytest.fixture(scope="module")
def allocator_probes(tmp_path_factory):
    """`{TF_CPU_ALLOCATOR_USE_BFC value: the probe's CompletedProcess}`: one fresh process per
    value (None: unset), both started at once, as each spends its time starting TensorFlow."""
    import subprocess
    import sys

    from tests.support.procs import REPO, kill, toy_env

    folder = tmp_path_factory.mktemp("probes")
    running = {}
    try:
        for value in (None, "false"):
            env = toy_env()
            env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
            if value is not None:
                env["TF_CPU_ALLOCATOR_USE_BFC"] = value
            env.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="process_state=2")
            out, err = (open(folder / f"{value}.{kind}", "w+", encoding="utf-8") for kind in ("out", "err"))
            proc = subprocess.Popen([sys.executable, "-c", _ALLOCATOR_PROBE], cwd=REPO, env=env, stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL, text=True)
            running[value] = (proc, out, err)
        results = {}
        for value, (proc, out, err) in running.items():
            proc.wait(timeout=120)
            out.seek(0)
            err.seek(0)
            results[value] = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    finally:
        for proc, out, err in running.values():
            kill(proc)
            out.close()
            err.close()
    return results


@pytest.mark.parametrize("env_value", [None, "false"])
def test_make_strategy_makes_the_cpu_devices_allocate_through_bfc(env_value, allocator_probes):
    # Without BFC every step under a strategy re-maps its memory (docs/benchmarks.md, sec. 3),
    # and the variable only counts if it is set before TensorFlow creates its devices. What
    # the probe observes, in a fresh process:
    # * TensorFlow's own log line (process_state.cc, VLOG 2) when it builds the CPU devices'
    #   allocator as a BFC allocator; it names the allocator actually in use, on any host.
    # * The BFC allocator's accounting: a live 16 KiB tensor shows up in its bytes in use.
    #   Only the positive case is host-independent: without BFC, TensorFlow's default CPU
    #   allocator keeps no statistics, but with oneDNN (AVX-512 hosts) the CPU allocator is
    #   oneDNN's, whose statistics exist and miss small tensors; so the opt-out is judged by
    #   the log line alone.
    out = allocator_probes[env_value]
    assert out.returncode == 0, out.stderr[-2000:]
    uses_bfc = re.search(r"Using BFCAllocator .* for ProcessState CPU allocator", out.stderr) is not None
    in_use = out.stdout.split()[-1]
    if env_value is None:
        assert uses_bfc, "the CPU devices do not allocate through BFC:\n" + out.stderr[-2000:]
        assert int(in_use) >= 64 * 64 * 4, out.stdout
    else:
        assert not uses_bfc, out.stderr[-2000:]  # a user's own choice is left alone
