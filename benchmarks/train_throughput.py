"""Training throughput of ResNet-56: the toolkit's engine vs Keras 3 ``model.fit``.

Configurations (global batch 128, SGD with Nesterov momentum 0.9 and weight decay 5e-4,
sparse cross-entropy from logits, top-1 accuracy as the running metric):

* ``engine``: ``nets.build("ResNet-56", masked=False)`` trained with
  ``op_utils.trainer.Trainer.train_step`` under ``op_utils.strategy.make_strategy``
  (a ``MirroredStrategy`` also for one replica), XLA off or on;
* ``fit``: the same architecture as a Keras functional model
  (``benchmarks/keras_resnet.py``) trained with ``model.fit``, ``jit_compile`` False or
  True; one replica is plain Keras (no strategy), two replicas a
  ``tf.distribute.MirroredStrategy`` over two logical CPUs, with the model built and
  compiled in its scope.

The CPU can only be split into logical devices before TensorFlow starts, so every
configuration runs in a fresh subprocess of this script (``--one``), one after another;
each prints one JSON line that the parent collects. Data are random CIFAR-shaped batches
held in memory (no input pipeline is measured). Each child runs ``--warmup`` untimed steps
(the first one traces/compiles), then times ``--steps`` steps one by one. Both sides read
the step's results on the host after every step (the engine's loop reads the loss for
its NaN check; Keras reads its logs for the per-batch callback that does the timing).

A second table gives, per timed step, the user and system CPU time and the minor page
faults of each child: on this CPU a step under a ``tf.distribute`` strategy with
TensorFlow's default CPU allocator takes ~1M page faults and seconds of system time (see
``docs/benchmarks.md``). ``make_strategy`` now selects the BFC allocator for the engine;
``--child_env TF_CPU_ALLOCATOR_USE_BFC=true`` gives model.fit the same, ``=false`` neither.

Usage (the full list takes 10-15 minutes on 2 cores; XLA on a CPU is slow)::

    python benchmarks/train_throughput.py [--warmup 3] [--steps 8] [--repeats 1]
    python benchmarks/train_throughput.py --xla off --replicas 1,2       # a subset
    python benchmarks/train_throughput.py --child_env TF_CPU_ALLOCATOR_USE_BFC=true
    python benchmarks/train_throughput.py --one engine --xla off --replicas 2   # one child
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.abspath(__file__)
_IMPLS = ("engine", "fit")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=_IMPLS,
                        help="run one configuration in this process and print a JSON line")
    parser.add_argument("--xla", default="off,on",
                        help="off, on, or a comma list (parent); off or on (with --one)")
    parser.add_argument("--replicas", default="1,2",
                        help="replica counts, comma separated (parent); one count (--one)")
    parser.add_argument("--impls", default="engine,fit", help="parent: which implementations")
    parser.add_argument("--batch_size", type=int, default=128, help="global batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (first traces)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1,
                        help="parent: run the whole list this many times (alternating order) "
                             "and report medians")
    parser.add_argument("--fit_strategy", choices=("default", "mirrored"), default="default",
                        help="model.fit with one replica: plain Keras (default) or a "
                             "MirroredStrategy over one CPU like the engine")
    parser.add_argument("--child_env", action="append", default=[], metavar="NAME=VALUE",
                        help="parent: set this environment variable in every child (repeatable), "
                             "e.g. TF_CPU_ALLOCATOR_USE_BFC=true")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="parent: seconds allowed per configuration")
    parser.add_argument("--arch_depth", type=int, default=56)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step traces)")
    return args


def _synthetic(tf, batch_size: int, batches: int = 4, seed: int = 0):
    """A repeated dataset of ``batches`` random CIFAR-shaped global batches held in memory."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batches * batch_size, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, batches * batch_size).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.batch(batch_size, drop_remainder=True).cache().repeat().prefetch(2)


def _usage_since(before) -> dict:
    """User and system CPU seconds and minor page faults of this process since ``before``."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": now.ru_utime - before.ru_utime, "sys_s": now.ru_stime - before.ru_stime,
            "minor_faults": now.ru_minflt - before.ru_minflt}


# === Children ==================================================================================

def _engine(args, replicas: int, xla: bool) -> dict:
    sys.path.insert(0, _ROOT)
    from op_utils.strategy import make_strategy

    strategy = make_strategy(None, replicas)  # splits the CPU: before any other TF op

    import tensorflow as tf

    import nets
    from op_utils.optim import SGD
    from op_utils.task import Classify
    from op_utils.trainer import Trainer

    tf.random.set_seed(0)
    with strategy.scope():
        net = nets.build(f"ResNet-{args.arch_depth}", masked=False)
        optimizer = SGD(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    trainer = Trainer(strategy, Classify(net), optimizer, global_batch_size=args.batch_size, xla=xla)
    data = iter(strategy.experimental_distribute_dataset(_synthetic(tf, args.batch_size)))

    def step() -> float:
        return float(trainer.train_step(next(data))["loss"])

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times, usage = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "step_s": times, "usage": _usage_since(usage), "loss": loss,
            "devices": list(strategy.extended.worker_devices), "tf": tf.__version__}


def _fit(args, replicas: int, xla: bool) -> dict:
    import tensorflow as tf

    if replicas > 1 or args.fit_strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.get_strategy()  # the default: plain Keras

    import keras

    sys.path.insert(0, os.path.dirname(_HERE))
    from keras_resnet import cifar_resnet

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = cifar_resnet(args.arch_depth)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"], jit_compile=xla,
        )
    ds = _synthetic(tf, args.batch_size)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.loss, self._start = [], float("nan"), 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)
            self.loss = float(logs["loss"])

    warm = StepTimer()
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False, callbacks=[warm])
    first = time.perf_counter() - start
    if args.warmup > 1:
        model.fit(ds, epochs=1, steps_per_epoch=args.warmup - 1, verbose=0, shuffle=False,
                  callbacks=[warm])
    timer, usage = StepTimer(), resource.getrusage(resource.RUSAGE_SELF)
    model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0, shuffle=False, callbacks=[timer])
    usage = _usage_since(usage)  # includes fit's set-up and tear-down
    devices = list(strategy.extended.worker_devices) if replicas > 1 \
        or args.fit_strategy == "mirrored" else ["default strategy"]
    return {"first_step_s": first, "step_s": timer.times, "usage": usage, "loss": timer.loss,
            "devices": devices, "tf": tf.__version__, "keras": keras.__version__}


def _child(args) -> int:
    xla = {"off": False, "on": True}.get(args.xla)
    if xla is None or not args.replicas.isdigit() or int(args.replicas) < 1:
        raise SystemExit("--one needs --xla off|on and one positive --replicas count")
    replicas = int(args.replicas)
    if args.batch_size % replicas:
        raise SystemExit(f"--batch_size {args.batch_size} does not split into {replicas} replicas")
    load_before = os.getloadavg()
    result = (_engine if args.one == "engine" else _fit)(args, replicas, xla)
    times = result.pop("step_s")
    total = sum(times)
    usage = result.pop("usage")
    result.update({f"{key}_per_step": value / len(times) for key, value in usage.items()})
    result.update(
        impl=args.one, xla=args.xla, replicas=replicas, batch_size=args.batch_size,
        warmup=args.warmup, steps=len(times), images_per_s=args.batch_size * len(times) / total,
        median_step_ms=statistics.median(times) * 1e3, min_step_ms=min(times) * 1e3,
        max_step_ms=max(times) * 1e3, load_before=load_before, load_after=os.getloadavg(),
    )
    print(json.dumps(result), flush=True)
    return 0


# === Parent ====================================================================================

def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _error_reason(stderr: str) -> str:
    """The informative line of a child's traceback (TF puts the cause after the type)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Trying to access resource"):
            return line.split(" (defined @")[0] + " " + line.split(")", 1)[-1].strip()
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors or lines or ["(no stderr)"])[-1][:300]


def _launch(args, impl: str, xla: str, replicas: str) -> dict:
    cmd = [sys.executable, _HERE, "--one", impl, "--xla", xla, "--replicas", replicas,
           "--batch_size", str(args.batch_size), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--fit_strategy", args.fit_strategy,
           "--arch_depth", str(args.arch_depth)]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(item.split("=", 1) for item in args.child_env)
    print(f"# running: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=_ROOT,
                              timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "xla": xla, "replicas": int(replicas),
                "error": f"timeout {args.timeout}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        reason = _error_reason(proc.stderr)
        print(f"#   FAILED (exit {proc.returncode}): {reason}", file=sys.stderr, flush=True)
        return {"impl": impl, "xla": xla, "replicas": int(replicas), "error": reason}
    result = json.loads(lines[-1])
    print(f"#   {result['images_per_s']:.1f} images/s, median step "
          f"{result['median_step_ms']:.0f} ms, first step {result['first_step_s']:.1f} s, "
          f"wall {time.perf_counter() - start:.0f} s, load "
          f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}",
          file=sys.stderr, flush=True)
    return result


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _parent(args) -> int:
    xlas, replicas, impls = _split(args.xla), _split(args.replicas), _split(args.impls)
    if any("=" not in item for item in args.child_env):
        raise SystemExit("--child_env takes NAME=VALUE")
    if not set(xlas) <= {"off", "on"} or not all(r.isdigit() and int(r) > 0 for r in replicas) \
            or not impls or not set(impls) <= set(_IMPLS):
        raise SystemExit("bad --xla/--replicas/--impls")
    order = [(x, r, i) for x in xlas for r in replicas for i in impls]
    runs = {key: [] for key in order}
    errors = {}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for key in (order if repeat % 2 == 0 else order[::-1]):
            result = _launch(args, key[2], key[0], key[1])
            if "error" in result:
                errors[key] = result["error"]
            else:
                runs[key].append(result)
    load_after = os.getloadavg()

    def median(key, field):
        values = [r[field] for r in runs.get(key, [])]
        return statistics.median(values) if values else None

    loads = [r["load_before"][0] for rs in runs.values() for r in rs] + \
            [r["load_after"][0] for rs in runs.values() for r in rs]
    print(f"ResNet-{args.arch_depth}, global batch {args.batch_size}, SGD Nesterov 0.9 + "
          f"wd 5e-4; {args.warmup} warm-up steps then {args.steps} timed steps per "
          f"configuration, each in its own process; {args.repeats} repeat(s)"
          + (" (medians shown)" if args.repeats > 1 else "") + ".")
    one = "plain Keras, no strategy" if args.fit_strategy == "default" \
        else "MirroredStrategy over 1 CPU"
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs; model.fit with one "
          f"replica: {one}; "
          f"1-min load average {min(loads, default=float('nan')):.2f}-"
          f"{max(loads, default=float('nan')):.2f} during the runs "
          f"(1/5/15 min before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.2f}' for x in load_after)})."
          + (f" Child environment: {' '.join(args.child_env)}." if args.child_env else ""))
    print()
    print("| XLA | replicas | engine images/s | model.fit images/s | engine / fit "
          "| engine median step (ms) | fit median step (ms) | engine first step (s) "
          "| fit first step (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for x in xlas:
        for r in replicas:
            e, f = (x, r, "engine"), (x, r, "fit")
            e_ips, f_ips = median(e, "images_per_s"), median(f, "images_per_s")
            ratio = e_ips / f_ips if e_ips and f_ips else None
            if ratio is not None:
                verdicts.append(((x, r), ratio))
            cells = [
                _fmt(e_ips, ".1f") if e not in errors else f"failed: {errors[e]}",
                _fmt(f_ips, ".1f") if f not in errors else f"failed: {errors[f]}",
                _fmt(ratio, ".2f"),
                _fmt(median(e, "median_step_ms"), ".0f"), _fmt(median(f, "median_step_ms"), ".0f"),
                _fmt(median(e, "first_step_s"), ".1f"), _fmt(median(f, "first_step_s"), ".1f"),
            ]
            print(f"| {x} | {r} | " + " | ".join(cells) + " |")
    print()
    if verdicts:
        slower = [f"XLA {x}, {r} replica(s): {ratio:.2f}"
                  for (x, r), ratio in verdicts if ratio < 1.0]
        print("Requirement (engine at least as fast as model.fit): "
              + ("PASS" if not slower else "FAIL for " + "; ".join(slower)))
    print()
    print("Per timed step (medians over repeats; for model.fit including its set-up): CPU time "
          "of all threads split into user and system, and minor page faults.")
    print()
    print("| XLA | replicas | implementation | user CPU (ms) | system CPU (ms) "
          "| minor page faults |")
    print("|---|---:|---|---:|---:|---:|")
    for key in order:
        if runs[key]:
            print(f"| {key[0]} | {key[1]} | {'engine' if key[2] == 'engine' else 'model.fit'} | "
                  f"{median(key, 'user_s_per_step') * 1e3:.0f} | "
                  f"{median(key, 'sys_s_per_step') * 1e3:.0f} | "
                  f"{median(key, 'minor_faults_per_step'):,.0f} |")
    return 1 if errors else 0


def main(argv=None) -> int:
    args = _parse(argv)
    return _child(args) if args.one else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
