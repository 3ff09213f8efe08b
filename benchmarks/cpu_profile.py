"""Where the CPU time of one training step and one batch-1 forward pass goes: toolkit and PyTorch.

The toolkit side runs the engine's training step (`op_utils.trainer.Trainer`, batch 128) and the
compiled inference forward pass at batch 1 under TensorFlow's profiler, reads the trace
(`*.xplane.pb`, the host plane's op events) and sums the time of every op type. The PyTorch side
(`torch_nets.py`, same net, channels-last and NCHW) runs the same two calls under `torch.profiler`
and sums self CPU time per aten op. Op times are per call (step or forward) and, with two intra-op
threads, add up to more or less than the wall time: read them as shares.

    python benchmarks/cpu_profile.py                   # ResNet-56; --arch MobileNetV2, ResNet-20
    python benchmarks/cpu_profile.py --json runs/cpu_profile.json

PyTorch is optional (skipped with a message when it is not installed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

import numpy as np

from common import ROOT, host, write_json

# Trace events that are not kernels: the function call around the ops, the executor's own.
_NOT_OPS = ("Process", "Run", "Record", "StartRegion", "StopRegion", "ExecutorState")


def tf_op_times(trace_dir: str, calls: int) -> collections.Counter:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name:
                    continue
                op = name.rsplit(":", 1)[1].strip()
                if op and not op.startswith(_NOT_OPS) and "__inference" not in op:
                    times[op] += event.duration_ps / 1e9 / calls  # ms per call
    return times


def toolkit(arch: str, calls: int) -> dict:
    sys.path.insert(0, ROOT)
    from op_utils.strategy import make_strategy

    strategy = make_strategy(None, 1)
    import tensorflow as tf

    import nets
    from op_utils.optim import SGD
    from op_utils.task import Classify
    from op_utils.trainer import Trainer

    with strategy.scope():
        net = nets.build(arch, masked=False)
        optimizer = SGD(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    trainer = Trainer(strategy, Classify(net), optimizer, global_batch_size=128, xla=False)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensors((rng.standard_normal((128, 32, 32, 3), dtype=np.float32),
                                         rng.integers(0, 10, 128).astype(np.int32))).repeat()
    batches = iter(strategy.experimental_distribute_dataset(data))
    forward = tf.function(lambda images: net(images, training=False))
    one = tf.constant(rng.standard_normal((1, 32, 32, 3), dtype=np.float32))
    runs = {"train step, batch 128": lambda: float(trainer.train_step(next(batches))["loss"]),
            "forward, batch 1": lambda: forward(one).numpy()}
    out = {}
    for label, call in runs.items():
        n = calls if "train" in label else 20 * calls
        for _ in range(3):
            call()
        trace = tempfile.mkdtemp()
        tf.profiler.experimental.start(trace)
        start = time.perf_counter()
        for _ in range(n):
            call()
        wall = (time.perf_counter() - start) / n * 1e3
        tf.profiler.experimental.stop()
        out[label] = {"wall_ms": wall, "ops_ms": dict(tf_op_times(trace, n).most_common())}
    return out


def pytorch(arch: str, calls: int) -> dict:
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed (pip install torch==2.13.0)"}
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from torch_nets import build

    out = {}
    for layout, memory_format in (("channels-last", torch.channels_last), ("NCHW", torch.contiguous_format)):
        torch.manual_seed(0)
        net = build(arch).to(memory_format=memory_format)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        x = torch.randn(128, 3, 32, 32).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (128,))
        one = torch.randn(1, 3, 32, 32).contiguous(memory_format=memory_format)

        def step():
            net.train()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        def forward():
            net.eval()
            with torch.inference_mode():
                return net(one)

        for label, call in ((f"train step, batch 128, {layout}", step), (f"forward, batch 1, {layout}", forward)):
            n = calls if "train" in label else 20 * calls
            for _ in range(3):
                call()
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(n):
                    call()
            wall = (time.perf_counter() - start) / n * 1e3
            ops = {e.key: e.self_cpu_time_total / 1e3 / n for e in prof.key_averages()}
            out[label] = {"wall_ms": wall, "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
    return out


def table(label: str, entry: dict, rows: int) -> str:
    total = sum(entry["ops_ms"].values())
    lines = [f"**{label}**: {entry['wall_ms']:.1f} ms per call (under the profiler), op time {total:.1f} ms",
             "", "| op | ms per call | share |", "|---|---:|---:|"]
    for op, ms in list(entry["ops_ms"].items())[:rows]:
        lines.append(f"| {op} | {ms:.2f} | {100 * ms / total:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ResNet-56", choices=("ResNet-56", "ResNet-20", "MobileNetV2"))
    p.add_argument("--calls", type=int, default=3, help="profiled training steps (20x as many forward passes)")
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--json", help="also write every op's time here")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be positive")
    result = {"host": host(), "arch": args.arch, "load": os.getloadavg()[0],
              "toolkit": toolkit(args.arch, args.calls), "pytorch": pytorch(args.arch, args.calls)}
    print(f"{args.arch}; {result['host']}; load {result['load']:.2f}")
    for side in ("toolkit", "pytorch"):
        for label, entry in result[side].items():
            print(f"\n{side}: " + (entry if isinstance(entry, str) else table(label, entry, args.rows)))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
