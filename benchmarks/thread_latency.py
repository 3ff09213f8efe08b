"""Batch-1 latency of the toolkit's compiled forward pass with one intra-op thread against
TensorFlow's default (one per core), for nets of any size: where `--intra_op_threads 1` pays.

Each measurement is a child process (the pools are fixed when TensorFlow starts), random weights,
the TF graph at batch 1 (median of `--calls`); `--rounds` interleaved rounds, the median kept.

    python benchmarks/thread_latency.py --archs ResNet-20 ResNet-56 MobileNetV2 ResNet-50 MobileNetV2-ImageNet
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import ROOT, host, write_json
from cpu_speed import timed

IMAGE = {"ResNet-50": 224, "ResNet-18": 224, "ResNet-34": 224, "MobileNetV2-ImageNet": 224}


def child(arch: str, threads: int, calls: int) -> dict:
    sys.path.insert(0, ROOT)
    from op_utils.strategy import make_strategy
    from utils.devices import use_thread_pools

    use_thread_pools(threads)
    make_strategy(None, 1)
    import tensorflow as tf

    import nets

    net = nets.build(arch, masked=False)
    size = IMAGE.get(arch, 32)
    x = tf.random.normal([1, size, size, 3], seed=1)
    forward = tf.function(lambda images: net(images, training=False))
    return timed(lambda: forward(x).numpy(), calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["ResNet-20", "ResNet-56", "MobileNetV2", "ResNet-50",
                                                   "MobileNetV2-ImageNet"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", nargs=2, metavar=("ARCH", "THREADS"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.calls)), flush=True)
        return 0
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    runs = {(arch, t): [] for arch in args.archs for t in (1, 0)}
    for r in range(args.rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", key[0], str(key[1]),
                                  "--calls", str(args.calls)], capture_output=True, text=True, env=env, check=True)
            runs[key].append(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])
    result = {"host": host(), "load": os.getloadavg()[0],
              "ms": {f"{arch} threads={t or 'default'}": statistics.median(v) for (arch, t), v in runs.items()}}
    print(f"{result['host']}; load {result['load']:.2f}\n| net | one thread, ms | default, ms | ratio |\n|---|---:|---:|---:|")
    for arch in args.archs:
        one, default = statistics.median(runs[(arch, 1)]), statistics.median(runs[(arch, 0)])
        print(f"| {arch} | {one:.2f} | {default:.2f} | {one / default:.2f} |")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
