"""`export.py`: a saved net as a SavedModel and TFLite files, checked against the TF model.

The files and their sizes come from `codebase.export.export_net`. With `--eval` every written
format runs on the test set (the data module's test pipeline) beside the TF model as `test.py`
runs it: top-1 of each, the largest |logit difference| and the argmax agreement. With `--latency`
each TFLite file (LiteRT, `--num_threads`) and the TF graph are timed at batch 1 and
`--batch_size`. Full-integer ranges come from training images with inference preprocessing,
never from the test set. The report is printed and written to `<out_dir>/export.json`:

    {"arch", "input_shape", "kernel_zero_fraction", "sparse", "sparse_flag", "trained_param", "dataset",
     "representative_images", "int8_io",
     "formats": {format: {"path", "bytes", "gzip_bytes", ...,          # codebase.export.export_net
                          "eval": {"top1", "tf_top1", "max_abs_logit_diff", "argmax_agreement", "count"},
                          "latency_ms": {"batch_1", "batch_<N>"}}},  # TFLite formats only
     "tf": {"top1", "count", "latency_ms": {"batch_1", "batch_<N>"}},  # the TF model as test.py runs it
     "latency": {"runs", "num_threads"},                               # LiteRT's threads
     "tf_threads": {"intra_op", "inter_op"}}                           # TensorFlow's pools (0: one per core)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from codebase.config import dataset_options
from codebase.evaluate import add_net_and_data_flags, add_thread_flags, check_thread_flags
from utils.errors import ConfigError

DEFAULT_FORMATS = "saved_model,tflite_fp32,tflite_fp16,tflite_dynamic_int8,tflite_int8"
REPORT = "export.json"
SPARSE = {"auto": "auto", "on": True, "off": False}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Export a saved net as a SavedModel and TFLite files.")
    add_net_and_data_flags(p)
    p.add_argument("--trained_param", required=True, help="params pickle of the net (with its spec if it has one)")
    p.add_argument("--out_dir", required=True, help="folder of the exported files and export.json")
    p.add_argument("--formats", nargs="+", default=[DEFAULT_FORMATS],
                   help="some of saved_model, tflite_fp32, tflite_fp16, tflite_dynamic_int8, tflite_int8 (separated "
                        "by spaces or commas)")
    p.add_argument("--sparse", default="auto", help="TFLite kernels stored sparsely (EXPERIMENTAL_SPARSITY): on, "
                                                    "off, or auto = on when half the kernel weights are zero")
    p.add_argument("--int8_io", action="store_true", help="tflite_int8 with int8 input and output tensors "
                                                          "(default: float32, a drop-in for the float files)")
    p.add_argument("--representative_images", type=int, default=200,
                   help="training images tflite_int8's activation ranges are measured on")
    p.add_argument("--eval", action="store_true", help="top-1 of every format on the test set, and its logits "
                                                       "against the TF model's")
    p.add_argument("--latency", action="store_true", help="median latency of each TFLite file and the TF graph")
    p.add_argument("--batch_size", type=int, default=128, help="batch of the evaluation and of the second latency")
    p.add_argument("--latency_runs", type=int, default=20)
    p.add_argument("--num_threads", type=int, default=None, help="LiteRT threads (default: the CPU count)")
    add_thread_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    check_thread_flags(args)
    for name in ("batch_size", "latency_runs", "representative_images", "num_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image_size must be positive, got {args.image_size}")
    if args.sparse not in SPARSE:
        raise ConfigError(f"--sparse must be one of {', '.join(SPARSE)}, got {args.sparse!r}")
    dataset_options(args.dataset, args.image_size)
    if not os.path.isfile(args.trained_param):
        raise ConfigError(f"--trained_param {args.trained_param} does not exist")
    from codebase.export import check_formats, check_out_dir  # imports TensorFlow, after the cheap checks

    args.formats = check_formats([f for entry in args.formats for f in entry.split(",") if f])
    if args.int8_io and "tflite_int8" not in args.formats:
        raise ConfigError("--int8_io applies to --formats tflite_int8, which is not asked for")
    check_out_dir(args.out_dir)
    if args.num_threads is None:
        args.num_threads = os.cpu_count() or 1
    return args


def representative_arrays(data, count: int) -> np.ndarray:
    """`count` training images (a seeded random choice, in order) with inference preprocessing."""
    info = data.info
    if not data.in_memory:
        images = []
        for batch in data.train_eval(min(count, 64)):
            images.extend(batch[0].numpy()[:count - len(images)])
            if len(images) == count:
                break
        return np.stack(images).astype(np.float32)
    images, _ = data.train_arrays()
    chosen = np.sort(np.random.default_rng(0).permutation(len(images))[:count])
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    return ((images[chosen].astype(np.float32) - mean) / std).astype(np.float32)


def _predictors(report: dict, num_threads: int) -> dict:
    """`{format: fn(float32 images) -> float32 logits}` reading each written file."""
    import tensorflow as tf

    from codebase import export, tflite

    out = {}
    for fmt, entry in report["formats"].items():
        if fmt == export.SAVED_MODEL:
            serve = tf.saved_model.load(entry["path"]).signatures[export.SIGNATURE]
            out[fmt] = lambda x, serve=serve: serve(**{export.INPUT: tf.constant(x)})[export.OUTPUT].numpy()
        else:
            out[fmt] = tflite.Runner(entry["path"], num_threads=num_threads)
    return out


def compare(report: dict, net, data, batch_size: int, num_threads: int) -> None:
    """Add each format's test-set `"eval"` to `report`, and the TF model's top-1 under `"tf"`."""
    from codebase import tflite
    from codebase.export import Deployable

    reference = Deployable(net)  # the net as loaded, nothing baked: what test.py evaluates
    predictors = _predictors(report, num_threads)
    totals = {fmt: {"correct": 0, "agree": 0, "diff": 0.0} for fmt in predictors}
    count = correct = 0
    for images, labels in data.test(batch_size):
        x, y = images.numpy(), labels.numpy().reshape(-1)
        ref = reference(images).numpy()
        count += len(y)
        correct += int(np.sum(ref.argmax(1) == y))
        for fmt, predict in predictors.items():
            logits = predict(x)
            totals[fmt]["correct"] += int(np.sum(logits.argmax(1) == y))
            totals[fmt]["agree"] += int(np.sum(logits.argmax(1) == ref.argmax(1)))
            totals[fmt]["diff"] = max(totals[fmt]["diff"], float(np.max(np.abs(logits - ref))))
    report.setdefault("tf", {}).update(top1=correct / count, count=count)
    for fmt, total in totals.items():
        report["formats"][fmt]["eval"] = {
            "top1": total["correct"] / count, "tf_top1": correct / count, "max_abs_logit_diff": total["diff"],
            "argmax_agreement": total["agree"] / count, "count": count}
        if isinstance(predictors[fmt], tflite.Runner):
            report["formats"][fmt]["runtime"] = predictors[fmt].describe()


def time_formats(report: dict, net, batch_size: int, runs: int, num_threads: int) -> None:
    """Add median batch-1 and batch-`batch_size` milliseconds of each TFLite file and of the TF graph."""
    from codebase import export, tflite
    from codebase.evaluate import measure_latency

    batches = sorted({1, batch_size})
    shape = export.input_shape(net)
    report.setdefault("tf", {})["latency_ms"] = {f"batch_{b}": measure_latency(net, b, shape, runs, xla=False)
                                                 for b in batches}
    for fmt, entry in report["formats"].items():
        if fmt != export.SAVED_MODEL:
            runner = tflite.Runner(entry["path"], num_threads=num_threads)
            entry["latency_ms"] = {f"batch_{b}": runner.latency(b, runs) for b in batches}
            entry["runtime"] = runner.describe()
    report["latency"] = {"runs": runs, "num_threads": num_threads}  # LiteRT's; TF uses its own thread pools


def export(args) -> dict:
    from codebase import export as exporting
    from codebase import tflite
    from codebase.artifacts import load_net, read_spec
    from dataloader import build_dataset
    from utils.atomic import atomic_write_json
    from utils.devices import use_thread_pools

    threads = use_thread_pools(args.intra_op_threads, args.inter_op_threads)  # before the runtime starts
    data = build_dataset(args.dataset, args.data_path, **dataset_options(args.dataset, args.image_size))
    info = data.info
    arch = args.arch or (None if read_spec(args.trained_param) else "ResNet-56")
    net = load_net(arch, args.trained_param, num_classes=info.num_classes, input_size=info.image_shape[0],
                   data_stats=(info.mean, info.std))
    representative, count = None, 0
    if "tflite_int8" in args.formats:
        images = representative_arrays(data, min(args.representative_images, info.num_train))
        representative, count = tflite.representative_images(images), len(images)
    report = exporting.export_net(net, args.out_dir, args.formats, representative, sparse=SPARSE[args.sparse],
                                  int8_io=args.int8_io, num_threads=args.num_threads)
    report.update(trained_param=args.trained_param, dataset=info.name, sparse_flag=args.sparse,
                  representative_images=count, int8_io=args.int8_io, tf_threads=threads)
    if args.eval:
        compare(report, net, data, args.batch_size, args.num_threads)
    if args.latency:
        time_formats(report, net, args.batch_size, args.latency_runs, args.num_threads)
    path = os.path.join(os.path.abspath(args.out_dir), REPORT)
    atomic_write_json(path, report)
    if args.json:
        print(json.dumps(report))
    else:
        print(describe(report) + f"\nreport: {path}")
    return report


def describe(report: dict) -> str:
    """The report in a few lines: one per format."""
    lines = [f"{report['arch']} {report['trained_param']}: {report['kernel_zero_fraction']:.1%} of the kernel "
             f"weights zero, sparse TFLite kernels {'on' if report['sparse'] else 'off'}"]
    if "tf" in report and "top1" in report["tf"]:
        lines.append(f"TF model: top-1 {report['tf']['top1']:.4f} on {report['tf']['count']} test images")
    for fmt, entry in report["formats"].items():
        line = f"{fmt}: {entry['path']} {entry['bytes']:,} B (gzip {entry['gzip_bytes']:,} B)"
        if "eval" in entry:
            e = entry["eval"]
            line += (f"; top-1 {e['top1']:.4f}, max |logit diff| {e['max_abs_logit_diff']:.3g}, "
                     f"argmax agreement {e['argmax_agreement']:.3f}")
        if "latency_ms" in entry:
            line += "; " + ", ".join(f"{ms:.2f} ms at {b.replace('_', ' ')}" for b, ms in entry["latency_ms"].items())
        if entry.get("runtime", {}).get("fallback"):
            line += f" (without XNNPack: {entry['runtime']['fallback']})"
        lines.append(line)
    if "latency_ms" in report.get("tf", {}):
        lines.append("TF graph: " + ", ".join(f"{ms:.2f} ms at {b.replace('_', ' ')}"
                                              for b, ms in report["tf"]["latency_ms"].items()))
    return "\n".join(lines)
