"""CPU latency of slimmed nets against the unpruned one, with and without channel padding.

Loads each params pickle (with its `.arch.json`, or widths from the kernel shapes), optionally
pads its widths to a multiple of 8 (`nets.pad_channels`: same outputs), and times a compiled
inference forward pass (moving statistics, XLA off, one replica) at each batch size. The
variants are timed in interleaved rounds in one process, and each reports the minimum and the
median over its rounds: the minimum is the least disturbed by other load on the machine.

Usage (from the repository root)::

    python benchmarks/latency.py --unpruned ../shared/data/pretrained/res56_cifar10.pkl \\
        --slimmed runs/ekg/trained_params.pkl --batch_sizes 1 128 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ResNet-56")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--input_size", type=int, default=32)
    parser.add_argument("--unpruned", required=True, help="params pickle of the unpruned net")
    parser.add_argument("--slimmed", nargs="+", required=True, help="params pickles of slimmed nets")
    parser.add_argument("--pad_to", type=int, default=8, help="also time each slimmed net padded to this multiple")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.pad_to < 2 or min(args.batch_sizes) < 1:
        parser.error("--rounds and --batch_sizes must be positive and --pad_to at least 2")
    for path in [args.unpruned, *args.slimmed]:
        if not os.path.isfile(path):
            parser.error(f"{path} does not exist")

    sys.path.insert(0, _ROOT)
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    import numpy as np
    import tensorflow as tf

    from codebase.artifacts import load_net
    from nets import pad_channels

    config = dict(num_classes=args.num_classes, input_size=args.input_size)
    variants = {"unpruned": load_net(args.arch, args.unpruned, **config)}
    for path in args.slimmed:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        variants[name] = load_net(args.arch, path, **config)
        variants[f"{name} pad{args.pad_to}"] = pad_channels(variants[name], args.pad_to)

    results = []
    for batch in args.batch_sizes:
        x = tf.constant(np.random.default_rng(0).normal(size=[batch, args.input_size, args.input_size, 3]),
                        tf.float32)
        fns = {name: tf.function(lambda t, net=net: net(t, training=False)) for name, net in variants.items()}
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn(x).numpy()  # trace and warm up
        for _ in range(args.rounds):
            for name, fn in fns.items():
                tic = time.perf_counter()
                fn(x).numpy()
                times[name].append((time.perf_counter() - tic) * 1e3)
        base = min(times["unpruned"])
        for name, net in variants.items():
            results.append({"variant": name, "batch": batch, "flops": net.cost().ekg_flops,
                            "min_ms": min(times[name]), "median_ms": statistics.median(times[name]),
                            "ratio_min": min(times[name]) / base})

    load = os.getloadavg()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, TF {tf.__version__}, load {load[0]:.2f}, "
          f"{args.rounds} interleaved rounds")
    print("| variant | batch | FLOPs (EKG) | min (ms) | median (ms) | min / unpruned min |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['batch']} | {r['flops'] / 1e6:.1f} M | {r['min_ms']:.1f} "
              f"| {r['median_ms']:.1f} | {r['ratio_min']:.2f} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
