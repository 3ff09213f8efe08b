"""`test.py`: accuracy, loss, complexity and latency of a saved (possibly slimmed) net."""

from __future__ import annotations

import argparse
import json
import os
import time

from codebase.config import PRECISIONS, dataset_options
from codebase.options import thread_counts
from utils.errors import ConfigError


def add_net_and_data_flags(p: argparse.ArgumentParser) -> None:
    """The flags that name a saved net's architecture and its data (test.py, export.py)."""
    p.add_argument("--arch", default=None, help="architecture (default: from the .arch.json beside the pickle, "
                                                "else ResNet-56)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data_path", default=None)
    p.add_argument("--image_size", type=int, default=None,
                   help="input height and width, as the run was trained: ImageNet crops to it (default 224), MNIST "
                        "is resized to it (LeNet-5-32: 32)")


def add_thread_flags(p: argparse.ArgumentParser) -> None:
    """TensorFlow's thread pools (test.py, export.py), sized before its runtime starts."""
    p.add_argument("--intra_op_threads", type=int, default=0,
                   help="threads inside one op; 0 = one per core. 1 is faster for batch-1 latency on a small CPU "
                        "(docs/benchmarks.md section 13) and slower for large batches")
    p.add_argument("--inter_op_threads", type=int, default=0, help="threads running independent ops; 0 = one per core")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Evaluate a saved net (params pickle, with its spec if it has one).")
    add_net_and_data_flags(p)
    p.add_argument("--trained_param", required=True, help="params pickle ({'scope/var:0': ndarray}); any step's "
                                                          "<train_path>/<step>/trained_params.pkl; or a .npz of "
                                                          "foreign weights for an --arch that imports them")
    p.add_argument("--val_batch_size", type=int, default=250)
    p.add_argument("--batch_size", type=int, default=1, help="batch size of the latency measurement")
    p.add_argument("--latency_runs", type=int, default=20)
    p.add_argument("--pad_to", type=int, default=1,
                   help="evaluate the net with every prunable width padded up to a multiple of this with inert "
                        "channels (same outputs; faster CPU kernels for odd widths); 1 = as saved")
    p.add_argument("--gpu_id", default=None)
    p.add_argument("--num_replicas", type=int, default=1)
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="float32, or bfloat16 (grappler's oneDNN rewrite; needs a CPU with AVX512-BF16 or AMX)")
    add_thread_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    check_thread_flags(args)
    for name in ("val_batch_size", "batch_size", "latency_runs", "num_replicas", "pad_to"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image_size must be positive, got {args.image_size}")
    dataset_options(args.dataset, args.image_size)
    if not os.path.isfile(args.trained_param):
        raise ConfigError(f"--trained_param {args.trained_param} does not exist")
    return args


def check_thread_flags(args) -> None:
    thread_counts(intra_op_threads=args.intra_op_threads, inter_op_threads=args.inter_op_threads)


def measure_latency(net, batch_size: int, input_shape, runs: int, xla: bool) -> float:
    """Median milliseconds of a compiled inference forward pass at `batch_size`."""
    import numpy as np
    import tensorflow as tf

    from op_utils.traced import fresh_function

    x = tf.random.normal([batch_size, *input_shape])
    forward = fresh_function(lambda images: net(images, training=False), jit_compile=xla)
    forward(x).numpy()  # trace and warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def evaluate(args) -> dict:
    from codebase.artifacts import load_net, read_spec
    from dataloader import build_dataset
    from op_utils.evaluate import Evaluator
    from op_utils.strategy import make_strategy, resolve_xla
    from utils.devices import describe_devices, use_precision, use_thread_pools

    threads = use_thread_pools(args.intra_op_threads, args.inter_op_threads)  # before the runtime starts
    strategy = make_strategy(args.gpu_id, args.num_replicas)
    xla = resolve_xla(args.compile)
    use_precision(args.precision)
    data = build_dataset(args.dataset, args.data_path, **dataset_options(args.dataset, args.image_size))
    info = data.info
    arch = args.arch or (None if read_spec(args.trained_param) else "ResNet-56")
    with strategy.scope():
        net = load_net(arch, args.trained_param, num_classes=info.num_classes, input_size=info.image_shape[0],
                       data_stats=(info.mean, info.std))
        if args.pad_to > 1:
            from nets import pad_channels

            net = pad_channels(net, args.pad_to)
    metrics = Evaluator(strategy, net, xla).evaluate(data.test(args.val_batch_size))
    cost = net.cost()
    devices = describe_devices(strategy)
    result = {
        "arch": net.arch, "trained_param": args.trained_param,
        "top1": float(metrics["top1"]), "top5": float(metrics["top5"]), "loss": float(metrics["loss"]),
        "count": int(metrics["count"]),
        "params": cost.params, "macs": cost.macs, "flops": cost.ekg_flops, "ekg_params": cost.ekg_params,
        "flops_convention": "EKG (conv+FC MACs + BN)", "macs_convention": "conv+dense MACs",
        "widths": net.widths(), "pad_to": args.pad_to,
        "latency_ms": measure_latency(net, args.batch_size, info.image_shape, args.latency_runs, xla),
        "batch_size": args.batch_size, "device": "GPU" if "GPU" in strategy.extended.worker_devices[0] else "CPU",
        "devices": devices, "threads": threads,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{net.arch} {args.trained_param}: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}, "
              f"loss {result['loss']:.4f} on {result['count']} test images")
        print(cost.describe())
        print(f"latency {result['latency_ms']:.2f} ms at batch {args.batch_size} on {'; '.join(devices)}")
    return result
