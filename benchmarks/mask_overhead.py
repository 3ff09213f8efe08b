"""Cost of the channel masks in a training step: masked vs ordinary ResNet-56.

A masked net multiplies its masks into the parameters (kernels, biases, BN gamma/beta)
and still runs the full-size convolutions, so with any masks its step should cost about
what the ordinary (``masked=False``) net's step costs. The requirement: at most 15% more.

Configurations, each its own net, optimizer and Trainer (SGD, XLA off, one replica):

* ``unmasked``: ``nets.build("ResNet-56", masked=False)``;
* ``masked, all ones``: ``masked=True`` with every mask 1;
* ``masked, ~50% kept``: random masks keeping about half of every prunable group;
* ``masked, ~50% kept, renorm``: the same masks with ``net.options.set(renorm=True)``.

Every configuration is first traced and warmed up; then rounds of ``--steps`` steps run
interleaved (A, B, C, D, A, B, C, D, ...) so that a change of machine load hits every
configuration alike. A round's time is its mean step time; the table reports the median
over rounds and the overhead of each median against the unmasked one (wall time, which
the requirement is about), and beside it the process CPU time per step (all threads),
which a busy machine disturbs less than wall time. The data are
in-memory random CIFAR-shaped batches (32x32x3 floats, 10 classes), so no input pipeline
is measured.

Usage (about 5 minutes on 2 cores with the defaults)::

    python benchmarks/mask_overhead.py [--steps 2] [--rounds 5] [--batch_size 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIMIT = 15.0  # % overhead allowed for the masked step


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per configuration after tracing")
    parser.add_argument("--arch", default="ResNet-56")
    parser.add_argument("--keep", type=float, default=0.5,
                        help="fraction of channels the random masks keep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not 0.0 < args.keep <= 1.0:
        parser.error("--keep must be in (0, 1]")
    return args


def _random_masks(net, keep: float, seed: int) -> float:
    """Masks keeping about ``keep`` of every prunable group; returns the kept fraction.

    The same ``seed`` gives the same masks on nets of the same architecture.
    """
    rng = np.random.default_rng(seed)
    kept = total = 0
    for group in net.prunable_groups().values():
        mask = (rng.random(group.size) < keep).astype(np.float32)
        if not mask.any():
            mask[rng.integers(group.size)] = 1.0
        group.set_mask(mask)
        kept += int(mask.sum())
        total += group.size
    return kept / total


def _synthetic(tf, batch_size: int, batches: int, seed: int):
    """A repeated dataset of ``batches`` random CIFAR-shaped batches held in memory."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batches * batch_size, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, batches * batch_size).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.batch(batch_size, drop_remainder=True).cache().repeat().prefetch(2)


def main(argv=None) -> int:
    args = _parse(argv)
    sys.path.insert(0, _ROOT)
    from op_utils.strategy import make_strategy

    strategy = make_strategy(None, 1)  # before any other TensorFlow op

    import tensorflow as tf

    import nets
    from op_utils.optim import SGD
    from op_utils.task import Classify
    from op_utils.trainer import Trainer

    tf.random.set_seed(args.seed)
    configs = []  # (name, trainer, note)
    for name, masked, random_masks, renorm in (
        ("unmasked", False, False, False),
        ("masked, all ones", True, False, False),
        (f"masked, ~{args.keep:.0%} kept", True, True, False),
        (f"masked, ~{args.keep:.0%} kept, renorm", True, True, True),
    ):
        with strategy.scope():
            net = nets.build(args.arch, masked=masked)
            optimizer = SGD(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        note = ""
        if random_masks:
            note = f"{_random_masks(net, args.keep, args.seed):.0%} of prunable channels kept"
        if masked:
            net.options.set(renorm=renorm)
        trainer = Trainer(strategy, Classify(net), optimizer, global_batch_size=args.batch_size,
                          accum=1, xla=False)
        configs.append((name, trainer, note))

    data = iter(strategy.experimental_distribute_dataset(
        _synthetic(tf, args.batch_size, 4, args.seed)))

    def run(trainer, steps: int) -> tuple[float, float]:
        """Mean wall time and mean process CPU time (all threads) of ``steps`` steps."""
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            out = trainer.train_step(next(data))
            loss = float(out["loss"])  # the loop's per-step NaN check reads it too
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if not np.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss}: timings would be meaningless")
        return elapsed / steps, cpu / steps

    load_before = os.getloadavg()
    for name, trainer, _ in configs:  # trace, then warm up
        start = time.perf_counter()
        run(trainer, 1)
        trace_s = time.perf_counter() - start
        if args.warmup:
            run(trainer, args.warmup)
        print(f"# warmed up {name}: first step (trace) {trace_s:.1f} s", file=sys.stderr)

    times = {name: [] for name, _, _ in configs}
    cpu_times = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        for name, trainer, _ in configs:
            wall, cpu = run(trainer, args.steps)
            times[name].append(wall)
            cpu_times[name].append(cpu)
        print(f"# round {r + 1}/{args.rounds}: "
              + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()), file=sys.stderr)
    load_after = os.getloadavg()

    base = statistics.median(times["unmasked"])
    cpu_base = statistics.median(cpu_times["unmasked"])
    print(f"{args.arch}, batch {args.batch_size}, SGD (Nesterov, wd 5e-4), XLA off, "
          f"1 replica (MirroredStrategy on CPU); {args.rounds} interleaved rounds x "
          f"{args.steps} steps per configuration after {args.warmup} warm-up steps.")
    print(f"TensorFlow {tf.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.2f}' for x in load_after)}")
    print()
    print("| configuration | median step (ms) | fastest round (ms) | slowest round (ms) "
          "| images/s (median) | overhead vs unmasked | CPU time per step (ms) "
          "| CPU-time overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for name, _, note in configs:
        median = statistics.median(times[name])
        overhead = (median / base - 1.0) * 100.0
        cpu = statistics.median(cpu_times[name])
        cpu_overhead = (cpu / cpu_base - 1.0) * 100.0
        label = f"{name} ({note})" if note else name
        print(f"| {label} | {median * 1e3:.0f} | {min(times[name]) * 1e3:.0f} | "
              f"{max(times[name]) * 1e3:.0f} | {args.batch_size / median:.1f} | "
              f"{'-' if name == 'unmasked' else f'{overhead:+.1f}%'} | {cpu * 1e3:.0f} | "
              f"{'-' if name == 'unmasked' else f'{cpu_overhead:+.1f}%'} |")
        if name != "unmasked":
            verdicts.append((name, overhead))
    print()
    worst = max(overhead for _, overhead in verdicts)
    ok = worst <= _LIMIT
    print(f"Requirement (masked step <= {_LIMIT:.0f}% over unmasked): "
          f"{'PASS' if ok else 'FAIL'} (worst {worst:+.1f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
