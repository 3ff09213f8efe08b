"""Choosing the distribution strategy and whether to use XLA.

There is one code path for every machine: training always runs under a
``MirroredStrategy`` (or its multi-worker sibling), also with a single replica, so the
same replica/cross-replica code is exercised on a laptop, in CI and on a GPU box.
"""
import json
import os

import tensorflow as tf

from utils.devices import has_gpu, split_cpu, use_bfc_allocator, visible_gpus
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

# One strategy per device set and process (and at most one multi-worker strategy).
# TensorFlow numbers the collective operations of every new MirroredStrategy from the
# same starting keys, so a second strategy over the same devices collides with the first
# ("Shape mismatch in the collective instance 100") as soon as they all-reduce tensors of
# different sizes.
_STRATEGIES = {}


def _cluster_workers() -> int:
    """Number of worker tasks (chief included) that ``TF_CONFIG`` describes; 0 if none."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError):
        raise ConfigError(f"TF_CONFIG is not a JSON object: {raw[:80]!r}") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(gpu_id: str | None = None, num_replicas: int = 1) -> tf.distribute.Strategy:
    """Builds the strategy for this process.

    In order of precedence:

    1. ``TF_CONFIG`` lists more than one worker: ``MultiWorkerMirroredStrategy``. Each
       worker trains on its local GPUs (or its CPU) and gradients are all-reduced over
       the network. To launch, start the same command once per worker, each with a
       ``TF_CONFIG`` naming the whole cluster and its own index, e.g. for two machines::

           TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                       "task": {"type": "worker", "index": 0}}' python train.py ...
           TF_CONFIG='{... same cluster ..., "task": {"type": "worker", "index": 1}}' ...

       Worker 0 is the chief: it writes checkpoints and summaries. The other workers
       need the same data and the same train path (on a shared file system) to resume.
       This must be called before any other TensorFlow op in the process.
    2. GPUs are visible (after restricting to ``gpu_id``): ``MirroredStrategy`` over them.
    3. Otherwise ``MirroredStrategy`` over ``num_replicas`` logical CPU devices (the CPU is
       split first; see ``utils.devices.split_cpu``). On a GPU machine whose GPUs are
       hidden with ``gpu_id=""`` the runtime has already started by then, so only one
       CPU replica is possible there.

    Args:
        gpu_id: GPUs to use, e.g. ``"0,1"``; ``""`` hides all GPUs; None uses all.
        num_replicas: Number of CPU replicas when no GPU is used (ignored otherwise).

    Returns:
        The strategy. Build models and optimizers inside ``strategy.scope()``. Within a
        process, repeated calls for the same devices return the same object (see
        ``_STRATEGIES``): do not build a second ``MirroredStrategy`` yourself.

    Raises:
        ConfigError: If ``TF_CONFIG`` is malformed, ``gpu_id`` is invalid, or the CPU can no
            longer be split into ``num_replicas`` devices.
    """
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ConfigError(f"--num_replicas must be a positive integer, got {num_replicas!r}")
    use_bfc_allocator()  # before anything below starts TensorFlow's runtime
    workers = _cluster_workers()
    if workers > 1:
        if gpu_id is not None:
            visible_gpus(gpu_id)
        if "multi-worker" not in _STRATEGIES:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            log.info("MultiWorkerMirroredStrategy: %d workers, %d replicas in sync",
                     workers, strategy.num_replicas_in_sync)
            _STRATEGIES["multi-worker"] = strategy
        return _STRATEGIES["multi-worker"]
    # visible_gpus() starts TensorFlow's runtime, after which the CPU can no longer be
    # split: so on a machine without GPUs go straight to split_cpu().
    if has_gpu():
        gpus = visible_gpus(gpu_id)
        if gpus:
            return _mirrored(gpus)
    elif gpu_id:
        visible_gpus(gpu_id)  # raises a ConfigError naming the missing GPU
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) >= num_replicas:
        # Already split into enough devices (e.g. by a test harness): keep that split, as
        # asking split_cpu for fewer devices before start-up would shrink it.
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        devices = split_cpu(num_replicas)
    return _mirrored(devices[:num_replicas])


def _mirrored(devices) -> tf.distribute.MirroredStrategy:
    key = tuple(devices)
    if key not in _STRATEGIES:
        log.info("MirroredStrategy over %s", ", ".join(key))
        _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(key))
    return _STRATEGIES[key]


def resolve_xla(compile: str) -> bool:  # noqa: A002 - the flag is called --compile
    """Turns the ``--compile`` flag into a yes/no for XLA on the per-replica gradient.

    Args:
        compile: ``"auto"`` (on with a GPU, off on CPU: XLA conv training measured 2-3x
            slower than oneDNN on our CPUs), ``"on"`` or ``"off"``.

    Returns:
        Whether to compile the per-replica loss-and-gradient function with XLA.

    Raises:
        ConfigError: For any other value.
    """
    value = compile.strip().lower() if isinstance(compile, str) else compile
    if value == "auto":
        return has_gpu()
    if value == "on":
        return True
    if value == "off":
        return False
    raise ConfigError(f"--compile must be auto, on or off, got {compile!r}")
