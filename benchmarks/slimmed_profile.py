"""Why the slimmed ResNet-56 keeps more of the unpruned latency than its FLOPs: a per-layer profile.

EKG's ResNet-56 at 45% of the FLOPs (the widths of section 6, seed 0; `cpu_speed.EKG45`) runs at
0.63-0.67 of the unpruned net's batch-128 latency on the CPU, in TensorFlow and TFLite alike
(docs/benchmarks.md, section 13). This script measures both nets' compiled inference forward pass
(random weights at seed 0: latency is a function of the widths) whole, with TensorFlow's profiler's
op time by type, and then every distinct convolution of each net alone at the same batch (conv +
bias + ReLU, the fused oneDNN kernel the BN-folded graph runs; the profiler's fused ops carry no
layer names, so the layers are timed one by one). Each row sets the time ratio (slimmed / unpruned)
beside the ratios of multiply-adds and of activation elements read and written: a layer whose time
follows its activations rather than its multiply-adds is memory- or overhead-bound, and narrowing it
cuts arithmetic quadratically but memory traffic only linearly.

    python benchmarks/slimmed_profile.py --batch 128 --json runs/slimmed_profile.json
    python benchmarks/slimmed_profile.py --patterns --json runs/width_patterns.json   # other width patterns
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

import numpy as np

from common import ROOT, host, write_json
from cpu_profile import tf_op_times
from cpu_speed import EKG45, timed

_CONV = re.compile(r"BasicBlock(\d+)\.(\d+)/(conv\d)/")  # a block's kernel: stage, block, conv


def _row(name: str) -> str:
    """The row of a conv kernel: `stem`, or `stage S convN` (conv1 into a block's interior, conv2 back
    to the residual stream, conv3 the projection shortcut)."""
    match = _CONV.match(name)
    return f"stage {match.group(1)} {match.group(3)}" if match else "stem"


def conv_layers(net, image: int = 32) -> list:
    """`(row, kernel shape, stride, input size)` of every convolution of a CIFAR ResNet."""
    layers = []
    for name, value in net.get_params().items():
        if not name.endswith("kernel:0") or value.ndim != 4:
            continue
        match = _CONV.match(name)
        stage, first = (int(match.group(1)), match.group(2) == "0") if match else (0, False)
        stride = 2 if first and stage > 0 and match.group(3) in ("conv1", "conv3") else 1
        layers.append((_row(name), tuple(value.shape), stride, (image >> stage) * stride))
    return layers


def time_convs(layers: list, batch: int, calls: int) -> dict:
    """Median milliseconds of each distinct convolution (+ bias + ReLU, the fused kernel the BN-folded
    inference graph runs) at `batch`, timed alone."""
    import tensorflow as tf

    times = {}
    for _, shape, stride, size in layers:
        key = (shape, stride, size)
        if key in times:
            continue
        x = tf.random.normal([batch, size, size, shape[2]], seed=2)
        w = tf.random.normal(shape, seed=3)
        b = tf.zeros([shape[3]])
        conv = tf.function(lambda x, w=w, b=b, s=stride: tf.nn.relu(tf.nn.conv2d(x, w, s, "SAME") + b))
        times[key] = timed(lambda: conv(x).numpy(), calls)["median_ms"]
    return times


def conv_rows(layers: list, times: dict) -> dict:
    """Per row: milliseconds (sum of its convolutions timed alone), multiply-adds and activation
    elements (input + output) of one image."""
    rows = collections.defaultdict(lambda: np.zeros(3))
    for row, (k, _, cin, cout), stride, size in layers:
        out = size // stride
        rows[row] += (times[((k, k, cin, cout), stride, size)], k * k * cin * cout * out * out,
                      cin * size * size + cout * out * out)
    return {row: [float(v) for v in values] for row, values in rows.items()}


def whole_net(net, batch: int, calls: int) -> dict:
    """Wall milliseconds of the net's compiled forward pass, and its op time by op type (profiler)."""
    import tensorflow as tf

    forward = tf.function(lambda images: net(images, training=False))
    x = tf.random.normal([batch, 32, 32, 3], seed=1)
    wall = timed(lambda: forward(x).numpy(), calls)["median_ms"]
    trace = tempfile.mkdtemp()
    tf.profiler.experimental.start(trace)
    for _ in range(calls):
        forward(x).numpy()
    tf.profiler.experimental.stop()
    return {"wall_ms": wall, "op_types_ms": dict(tf_op_times(trace, calls).most_common())}


def table(result: dict) -> str:
    full, slim = result["rows"]["unpruned"], result["rows"]["slimmed"]
    lines = ["| convolutions | unpruned ms | slimmed ms | time ratio | multiply-add ratio | activation ratio | "
             "slimmed GMAC/s (unpruned) |", "|---|---:|---:|---:|---:|---:|---:|"]
    batch = result["batch"]
    for key in sorted(full, key=lambda k: (k != "stem", k)):
        a, b = full[key], slim[key]
        rate = lambda r: r[1] * batch / r[0] / 1e6  # noqa: E731 (GMAC/s)
        lines.append(f"| {key} | {a[0]:.1f} | {b[0]:.1f} | {b[0] / a[0]:.2f} | {b[1] / a[1]:.2f} | "
                     f"{b[2] / a[2]:.2f} | {rate(b):.0f} ({rate(a):.0f}) |")
    sums = [np.sum([r[i] for r in rows.values()]) for rows in (full, slim) for i in range(3)]
    lines.append(f"| **all, timed alone** | {sums[0]:.1f} | {sums[3]:.1f} | {sums[3] / sums[0]:.2f} | "
                 f"{sums[4] / sums[1]:.2f} | {sums[5] / sums[2]:.2f} | |")
    nets_ = result["whole"]
    lines.append(f"| **whole net, compiled** | {nets_['unpruned']['wall_ms']:.1f} | {nets_['slimmed']['wall_ms']:.1f} | "
                 f"{nets_['slimmed']['wall_ms'] / nets_['unpruned']['wall_ms']:.2f} | "
                 f"{result['macs'][1] / result['macs'][0]:.2f} | | |")
    return "\n".join(lines)


# Other ways to spend the same cut (`--patterns`): every block interior at one 16-channel vector (the
# streams whole: 59% of the multiply-adds), and the streams halved with the interiors whole (50%).
PATTERNS = {"ekg45": EKG45,
            "interiors16": {"stem": 16, "stage1": 32, "stage2": 64,
                            **{f"BasicBlock{s}.{b}/conv1": 16 for s in range(3) for b in range(9)}},
            "streams_half": {"stem": 8, "stage1": 16, "stage2": 32,
                             **{f"BasicBlock{s}.{b}/conv1": 16 << s for s in range(3) for b in range(9)}}}


def patterns(batch: int, calls: int, rounds: int) -> dict:
    """Median over interleaved rounds of each width pattern's latency, relative to the unpruned net's."""
    import tensorflow as tf

    import nets

    built = {"unpruned": nets.build("ResNet-56", masked=False),
             **{name: nets.build("ResNet-56", widths=widths, masked=False) for name, widths in PATTERNS.items()}}
    forwards = {name: tf.function(lambda images, net=net: net(images, training=False)) for name, net in built.items()}
    out = {}
    for size in (1, batch):
        x = tf.random.normal([size, 32, 32, 3], seed=1)
        runs = collections.defaultdict(list)
        for r in range(rounds):
            for name in (list(built) if r % 2 == 0 else list(built)[::-1]):
                runs[name].append(timed(lambda: forwards[name](x).numpy(), calls * (4 if size == 1 else 1))["median_ms"])
        for name in built:
            out.setdefault(name, {"macs_ratio": built[name].cost().macs / built["unpruned"].cost().macs})
            out[name][f"b{size}_ms"] = float(np.median(runs[name]))
            out[name][f"b{size}_ratio"] = out[name][f"b{size}_ms"] / float(np.median(runs["unpruned"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--calls", type=int, default=10, help="profiled forward passes of each net")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--patterns", action="store_true",
                   help="instead: the whole-net latency of other width patterns at similar FLOPs (PATTERNS)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of --patterns")
    args = p.parse_args(argv)
    if args.batch < 1 or args.calls < 1:
        p.error("--batch and --calls must be positive")
    sys.path.insert(0, ROOT)
    from op_utils.strategy import make_strategy

    make_strategy(None, 1)
    import tensorflow as tf

    import nets

    tf.random.set_seed(0)
    if args.patterns:
        result = {"host": host(), "load_before": os.getloadavg()[0], "batch": args.batch,
                  "patterns": patterns(args.batch, args.calls, args.rounds), "load_after": os.getloadavg()[0]}
        print(f"ResNet-56 width patterns; {result['host']}; load {result['load_before']:.2f} -> "
              f"{result['load_after']:.2f}\n| widths | multiply-adds | batch 1 | batch {args.batch} |\n|---|---:|---:|---:|")
        for name, row in result["patterns"].items():
            print(f"| {name} | {row['macs_ratio']:.2f} | {row['b1_ratio']:.2f} | {row[f'b{args.batch}_ratio']:.2f} |")
        if args.json:
            write_json(args.json, result)
        return 0
    built = {"unpruned": nets.build("ResNet-56", masked=False),
             "slimmed": nets.build("ResNet-56", widths=EKG45, masked=False)}
    result = {"host": host(), "load_before": os.getloadavg()[0], "batch": args.batch,
              "macs": [built[k].cost().macs for k in ("unpruned", "slimmed")], "whole": {}, "rows": {}}
    for name in ("unpruned", "slimmed", "slimmed", "unpruned"):  # interleaved; the second of each is kept
        result["whole"][name] = whole_net(built[name], args.batch, args.calls)
    for name, net in built.items():
        layers = conv_layers(net)
        result["rows"][name] = conv_rows(layers, time_convs(layers, args.batch, args.calls))
    result["load_after"] = os.getloadavg()[0]
    print(f"ResNet-56 unpruned against EKG 45% at batch {args.batch}; {result['host']}; "
          f"load {result['load_before']:.2f} -> {result['load_after']:.2f}")
    print(table(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
