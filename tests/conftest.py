"""Test-wide set-up.

The CPU is split into two logical devices before TensorFlow initialises so that
multi-replica code (MirroredStrategy) runs on a CPU-only machine, and each pytest-xdist worker
gets its share of the cores.
"""
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# What op_utils.strategy.make_strategy sets in real runs (utils.devices.use_bfc_allocator);
# it must be set before the split below starts TensorFlow's devices.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import tensorflow as tf  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest.ini runs the suite in one worker process per core (pytest-xdist): each worker's ops
    # then use its share of the cores. TensorFlow's default (every core per process) makes the
    # workers' thread pools spin against each other: 27% slower on 2 cores, measured.
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    tf.config.threading.set_intra_op_parallelism_threads(max(1, (os.cpu_count() or 1) // _workers))

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _global_seed():
    # Runs through codebase.pipeline turn op determinism on for the rest of the process, and
    # determinism refuses unseeded random ops; a fixed global seed per test keeps tests
    # independent of the order they run in.
    tf.random.set_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _frozen_modules():
    # What every script's run does (codebase.cli, utils.memory.frozen_heap): the objects alive once
    # the tests are collected (TensorFlow's modules, the toolkit's, the tests') are left out of every
    # garbage collection after; what the tests make is collected as usual. (The scripts' own
    # frozen_heap is then a no-op: freezing at each run would also freeze earlier tests' garbage.)
    gc.freeze()
    yield
