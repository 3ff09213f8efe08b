"""Stages and tools every method reuses: fine-tuning, testing, BN re-estimation, pruned-net saving.

* `finetune(step, source, make_task, data_fn)`: train the net saved at `source` (plain
  cross-entropy, or the task `make_task(net)` returns) with the step's optimisation; writes the
  step's output.
* `test(step)`: the step's output on the test set with moving statistics, its params and FLOPs
  in both conventions beside the full architecture's, widths; writes `<step>/results.json`
  (with the step's `prune_results.json` merged in, when it has one).
* `save_pruned(step, masked_net, info)`: slim a masked net, re-estimate its BN statistics on
  training images (never test images), evaluate it and save it with `prune_results.json`.
* `recalibrate_bn(net, batches)`: BN moving statistics set to the mean of the batch statistics,
  in one compiled function.
* `export(step, formats)`: the step's output exported (`codebase.export`) into `<step>/export`,
  each file's top-1 on the test set beside the TF net's, in `<step>/export/export.json`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import tensorflow as tf

from codebase.context import finite
from nets import slim
from nets.layers import BatchNorm
from op_utils.task import Classify
from op_utils.traced import fresh_function
from utils.atomic import atomic_write_json
from utils.logs import get_logger

log = get_logger(__name__)

SLIMMED = "slimmed_params.pkl"
PRUNE_RESULTS = "prune_results.json"
RESULTS = "results.json"


def recalibrate_bn(net, batches, max_batches: int = 20) -> int:
    """Set every BN's moving statistics to the mean of its batch statistics over `batches`.

    The net runs in training mode on each of the first `max_batches` batches with its BNs'
    update rate set to `1 / (i + 1)` at batch `i` (a float32 variable, so one traced function
    serves every batch): the moving averages become cumulative means. Returns the number of
    batches used; afterwards the BNs update with their momentum again.
    """
    bns = [layer for layer in net.layers.values() if isinstance(layer, BatchNorm)]
    if not bns:
        return 0
    rate = tf.Variable(1.0, trainable=False, name="bn_update_rate")
    for bn in bns:
        bn.update_rate = rate
    count = 0
    try:
        step = None
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            images = tf.convert_to_tensor(batch[0])
            if step is None:
                shape = [None, *images.shape[1:]]
                step = fresh_function(lambda x: net(x, training=True),
                                      input_signature=[tf.TensorSpec(shape, images.dtype)])
            rate.assign(1.0 - i / (i + 1))  # the fraction the eager, momentum-based version moved by
            step(images)
            count += 1
    finally:
        for bn in bns:
            bn.update_rate = None
    return count


def inference_arrays(ctx, indices=None):
    """Training images (optionally a subset) with inference preprocessing, as numpy."""
    images, labels = ctx.data.train_arrays()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    mean, std = np.asarray(ctx.info.mean, np.float32), np.asarray(ctx.info.std, np.float32)
    return ((images.astype(np.float32) - mean) / std).astype(np.float32), labels.astype(np.int32)


def full_cost(net):
    """The cost of `net`'s architecture at full width."""
    return net.cost({k: net.full_sizes[k] for k in net.prunable_groups()})


def save_pruned(step, masked_net, info: dict, batch_size: int, name: str = SLIMMED) -> str:
    """Slim `masked_net`, re-estimate its BN statistics on training images, evaluate and save it
    to `<step>/<name>` (and, when the next step does the fine-tuning, as the step's output);
    writes `prune_results.json`. Returns the saved path."""
    ctx = step.ctx
    small = slim(masked_net)
    batches = recalibrate_bn(small, ctx.data.train_eval(batch_size))
    small = ctx.copy_net(small)
    before = ctx.evaluate(small)
    cost, full = small.cost(), full_cost(masked_net)
    info = {**info, "before_finetune_top1": float(before["top1"]), "flops_rate": cost.ekg_flops / full.ekg_flops,
            **{f"slimmed_{k}": v for k, v in cost.as_dict().items()}, "widths": small.widths(),
            "bn_batches": batches}
    atomic_write_json(step.path(PRUNE_RESULTS), info)
    path = step.save(small, name)
    if step.next_trains:
        step.save(small)
    how = f"BN re-estimated on {batches} batches of training images" if batches else "no BatchNorm to re-estimate"
    log.info("slimmed: top1 %.4f before fine-tuning (%s) | %s", before["top1"], how, cost.describe())
    return path


def finetune(step, source: str, make_task=None, data_fn=None, stage: str = "finetune") -> None:
    """Train the net saved at `source` with the step's optimisation (plain cross-entropy, or the
    task `make_task(net)` returns, on `data_fn`'s batches); save it as the step's output."""
    net = step.ctx.load_net(source)
    step.train(Classify(net) if make_task is None else make_task(net), stage, data_fn=data_fn)
    step.save(net)


def test(step, arch: str | None = None) -> dict:
    """Evaluate the step's output (an `arch`, default `--arch`); write and return `<step>/results.json`."""
    ctx = step.ctx
    net = ctx.load_net(step.output, arch=arch)
    pruned = {}
    if os.path.exists(step.path(PRUNE_RESULTS)):
        with open(step.path(PRUNE_RESULTS)) as f:
            pruned = json.load(f)
    cost, full = net.cost(), full_cost(net)
    results = {"step": step.step.name, "method": step.step.method, "arch": net.arch, **pruned,
               **finite(ctx.evaluate(net)), **cost.as_dict(), "full_ekg_flops": full.ekg_flops,
               "full_macs": full.macs, "full_params": full.params, "widths": net.widths(), "time": time.time()}
    atomic_write_json(step.path(RESULTS), results)
    log.info("%s test: top1 %.4f top5 %.4f loss %.4f | %s", step.step.name, results["top1"], results["top5"],
             results["loss"], cost.describe())
    return results


def export(step, formats) -> dict:
    """Export the step's output in `formats` into `<step>/export` (see `export.py`); the int8 file's
    representative images are 200 training images, never test images."""
    from codebase import export as exporting
    from codebase import tflite
    from codebase.export_cli import REPORT, compare, representative_arrays

    ctx = step.ctx
    net = ctx.load_net(step.output)
    representative = None
    if "tflite_int8" in formats:
        representative = tflite.representative_images(representative_arrays(ctx.data, min(200, ctx.info.num_train)))
    folder = step.path("export")
    report = exporting.export_net(net, folder, formats, representative, sparse="auto")
    compare(report, net, ctx.data, step.run.val_batch_size, num_threads=None)
    atomic_write_json(os.path.join(folder, REPORT), report)
    for fmt, entry in report["formats"].items():
        log.info("export %s: %s, %d bytes (gzip %d), top1 %.4f (TF net %.4f, argmax agreement %.4f)", fmt,
                 entry["path"], entry["bytes"], entry["gzip_bytes"], entry["eval"]["top1"], entry["eval"]["tf_top1"],
                 entry["eval"]["argmax_agreement"])
    return report
