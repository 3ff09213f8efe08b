"""Device set-up: logical CPU replicas and GPU selection.

TensorFlow fixes its device list the first time it initialises its runtime (the first op,
or the first ``list_logical_devices`` call). Both functions here change that list, so they
belong at the very start of an entry script, before any model or dataset is built.
"""
import os
from typing import List, Optional

import tensorflow as tf

from utils.errors import ConfigError


def use_bfc_allocator() -> None:
    """Makes the CPU device allocate through TensorFlow's caching BFC allocator.

    Under any ``tf.distribute`` strategy, TensorFlow's default CPU allocator hands freed
    memory back to the OS and maps it again every step: about 1M page faults and seconds
    of system time per ResNet-56 training step on a 2-core CPU, which made a step twice
    as slow as Keras ``model.fit`` without a strategy (docs/benchmarks.md, section 3).
    The variable is read when TensorFlow creates its devices, so this must run before
    the first op; ``setdefault`` leaves a user's ``TF_CPU_ALLOCATOR_USE_BFC=false`` alone.
    """
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


_PRECISIONS = ("float32", "bfloat16")  # the choices of --precision (codebase.config)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the CPUs with native bfloat16 arithmetic


def _cpuinfo(field: str) -> Optional[str]:
    """The value of the first `field` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def use_precision(precision: str, flags: Optional[set] = None) -> None:
    """Sets the arithmetic of every function traced afterwards: ``float32`` (TensorFlow's own, no
    change) or ``bfloat16``, grappler's oneDNN rewrite of convolutions, matmuls and their gradients
    to bfloat16 with float32 variables. It changes numerics (8 mantissa bits), so it is an option,
    never a default; on this project's AVX-512-BF16 CPU it trained ResNets 1.5-1.7x faster and ran
    them at batch 128 about 2x faster (docs/benchmarks.md, section 13). A process-wide setting, made
    once at start-up like the thread pools.

    Raises:
        ConfigError: an unknown precision, or bfloat16 on a GPU or on a CPU without native bfloat16
            arithmetic (AVX512-BF16 or AMX), where the rewrite is emulated and slower.
    """
    if precision not in _PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return
    if has_gpu():
        raise ConfigError("--precision bfloat16 is the CPU's oneDNN rewrite; this machine runs on its GPU")
    flags = cpu_flags() if flags is None else flags
    if not flags & set(_BF16_FLAGS):
        raise ConfigError(f"--precision bfloat16 needs a CPU with native bfloat16 arithmetic ({' or '.join(_BF16_FLAGS)} "
                          f"in /proc/cpuinfo); {cpu_model()} has neither")
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})


def use_thread_pools(intra_op: int = 0, inter_op: int = 0) -> dict:
    """Sizes TensorFlow's thread pools: ``intra_op`` threads inside one op (a convolution's tiles),
    ``inter_op`` threads running independent ops; 0 keeps TensorFlow's default (one per core). The
    pools are fixed when the runtime starts, so this belongs at the start of an entry script, before
    ``make_strategy``. One intra-op thread is what pays for single-image latency on a small CPU: on
    this project's 2-core host the batch-1 graph of ResNet-20/56 and MobileNetV2 ran 11-38% faster
    with one thread than with two (docs/benchmarks.md, section 13), while training and large
    batches need every core, so neither is a default.

    Returns:
        ``{"intra_op": n, "inter_op": m}``, the pools in effect (0: TensorFlow's default).

    Raises:
        ConfigError: a negative count, or a count other than the one in effect once the runtime
            has started.
    """
    threading = tf.config.threading
    for flag, value, setter, getter in (
            ("--intra_op_threads", intra_op, threading.set_intra_op_parallelism_threads,
             threading.get_intra_op_parallelism_threads),
            ("--inter_op_threads", inter_op, threading.set_inter_op_parallelism_threads,
             threading.get_inter_op_parallelism_threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{flag} must be 0 (one per core) or a count of threads, got {value!r}")
        if value:
            try:
                setter(value)
            except RuntimeError:
                raise ConfigError(f"{flag} {value} must be set before TensorFlow starts its runtime, which has "
                                  f"started with {getter() or 'one per core'}") from None
    return {"intra_op": threading.get_intra_op_parallelism_threads(),
            "inter_op": threading.get_inter_op_parallelism_threads()}


def split_cpu(n: int) -> List[str]:
    """Splits the first physical CPU into ``n`` logical devices.

    This lets multi-replica code (MirroredStrategy with ``--num_replicas``) run on a
    machine without GPUs.

    Args:
        n: The number of logical CPU devices wanted (>= 1).

    Returns:
        The names of all logical CPU devices, e.g. ``["/device:CPU:0", "/device:CPU:1"]``.

    Raises:
        ConfigError: If ``n`` < 1, or TensorFlow has already initialised its devices with
            fewer than ``n`` logical CPUs (the split cannot be changed any more).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--num_replicas must be a positive integer, got {n!r}")
    use_bfc_allocator()
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu) or []
    if len(existing) >= n:
        # A larger split made earlier (say by a test harness) serves n replicas as it is.
        return [f"/device:CPU:{i}" for i in range(len(existing))]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        # Already initialised: fine as long as there are enough devices to run on.
        have = tf.config.list_logical_devices("CPU")
        if len(have) < n:
            raise ConfigError(
                f"cannot split the CPU into {n} devices: TensorFlow has already started "
                f"with {len(have)}; --num_replicas must be set before TensorFlow "
                "initialises its devices"
            ) from None
        return [device.name for device in have]
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def _parse_gpu_ids(gpu_ids: str) -> List[int]:
    ids: List[int] = []
    for part in gpu_ids.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            gpu = int(part)
        except ValueError:
            raise ConfigError(
                f"--gpu_id must be comma-separated GPU numbers like '0' or '0,1', got {gpu_ids!r}"
            ) from None
        if gpu in ids:
            raise ConfigError(f"--gpu_id lists GPU {gpu} twice: {gpu_ids!r}")
        ids.append(gpu)
    return ids


def visible_gpus(gpu_ids: Optional[str]) -> List[str]:
    """Restricts TensorFlow to the GPUs given by a ``--gpu_id`` string.

    Args:
        gpu_ids: ``"0"``, ``"0,1"``, ... selects those GPUs; ``""`` hides all GPUs (like
            ``CUDA_VISIBLE_DEVICES=""``); None leaves every GPU visible.

    Returns:
        The names of the visible logical GPU devices (empty on a CPU-only run).

    Raises:
        ConfigError: If an id is malformed, repeated or out of range, or if TensorFlow has
            already initialised with a different set of GPUs.
    """
    physical = tf.config.list_physical_devices("GPU")
    if gpu_ids is not None:
        wanted = []
        for gpu in _parse_gpu_ids(gpu_ids):
            if not 0 <= gpu < len(physical):
                hint = f" (ids 0 to {len(physical) - 1})" if physical else ""
                if not physical and not tf.test.is_built_with_cuda():
                    hint = (" and this TensorFlow is a CPU-only build (tensorflow-cpu); for GPUs install "
                            "requirements-gpu.txt (README: GPU set-up)")
                raise ConfigError(f"--gpu_id {gpu} does not exist: this machine has {len(physical)} GPU(s){hint}")
            wanted.append(physical[gpu])
        try:
            tf.config.set_visible_devices(wanted, "GPU")
        except RuntimeError:
            if tf.config.get_visible_devices("GPU") != wanted:
                raise ConfigError(
                    f"cannot select GPUs {gpu_ids!r}: TensorFlow has already started; "
                    "--gpu_id must be set before TensorFlow initialises its devices"
                ) from None
    return [device.name for device in tf.config.list_logical_devices("GPU")]


def has_gpu() -> bool:
    """Returns True if TensorFlow can see at least one physical GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's processor string."""
    model = _cpuinfo("model name")
    if model:
        return model
    import platform

    return platform.processor() or platform.machine()


def describe_devices(strategy) -> list:
    """One line per device the strategy's replicas run on: its name and model
    (`"/job:localhost/replica:0/task:0/device:GPU:0 (NVIDIA A100-SXM4-40GB)"`)."""
    gpus = {}
    for index, device in enumerate(tf.config.list_physical_devices("GPU")):
        try:
            gpus[f"GPU:{index}"] = tf.config.experimental.get_device_details(device).get("device_name", "GPU")
        except (ValueError, RuntimeError):
            gpus[f"GPU:{index}"] = "GPU"
    out = []
    for name in strategy.extended.worker_devices:
        short = name.split("device:")[-1]
        model = gpus.get(short) if short.startswith("GPU") else f"{cpu_model()}, {os.cpu_count()} cores"
        out.append(f"{name} ({model})")
    return out
