"""Stages shared by the channel-pruning methods (EKG, L1, random).

A pruning run starts from a trained net (`--trained_param`, or a baseline trained here for
`--baseline_epoch` epochs), chooses masks, slims the net physically, re-estimates BatchNorm
statistics on training images (slimming leaves the moving statistics of the full net; test
images are never used), fine-tunes and tests.
"""

from __future__ import annotations

import json
import time

import numpy as np

from codebase.context import finite, save_net
from codebase.methods.base import Method
from nets import slim
from nets.layers import BatchNorm
from utils.atomic import atomic_write_json
from utils.logs import get_logger

log = get_logger(__name__)

BASE, SLIMMED, TRAINED = "base_params.pkl", "slimmed_params.pkl", "trained_params.pkl"


def recalibrate_bn(net, batches, max_batches: int = 20) -> None:
    """Set every BN's moving statistics to the mean of its batch statistics over `batches`.

    Runs eagerly with the BN momentum set per batch so the moving average becomes a
    cumulative mean (momentum i/(i+1) at batch i), then restores the momentum.
    """
    bns = [layer for layer in net.layers.values() if isinstance(layer, BatchNorm)]
    saved = [bn.momentum for bn in bns]
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            for bn in bns:
                bn.momentum = i / (i + 1)
            net(batch[0], training=True)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


def inference_arrays(ctx, indices=None):
    """Training images (optionally a subset) with inference preprocessing, as numpy."""
    images, labels = ctx.data.train_arrays()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    mean, std = np.asarray(ctx.info.mean, np.float32), np.asarray(ctx.info.std, np.float32)
    return ((images.astype(np.float32) - mean) / std).astype(np.float32), labels.astype(np.int32)


class PruningMethod(Method):
    """Baseline -> choose masks -> slim -> fine-tune -> test; subclasses choose the masks."""

    def base_net(self, masked=False, local=False):
        """The trained starting point."""
        ctx = self.ctx
        path = self.cfg.trained_param or ctx.path(BASE)
        net = ctx.load_net(path, masked=masked)
        return ctx.copy_net(net, masked=masked, local=True) if local else net

    def baseline(self):
        if self.cfg.trained_param:
            log.info("starting from %s", self.cfg.trained_param)
            return
        net = self.ctx.build_net()
        self.ctx.train(net, self.cfg.baseline_epoch, stage="baseline", learning_rate=0.05)
        save_net(net, self.ctx.path(BASE))

    def save_slimmed(self, masked_net, info: dict) -> None:
        """Slim, re-estimate BN statistics on training images, evaluate and save."""
        ctx = self.ctx
        small = slim(masked_net)
        recalibrate_bn(small, ctx.data.train_eval(ctx.cfg.search_batch_size))
        small = ctx.copy_net(small)
        before = ctx.evaluate(small)
        cost, full = small.cost(), masked_net.cost({k: g.size for k, g in masked_net.prunable_groups().items()})
        info = {**info, "before_finetune_top1": float(before["top1"]), "flops_rate": cost.ekg_flops / full.ekg_flops,
                **{f"slimmed_{k}": v for k, v in cost.as_dict().items()}, "widths": small.widths()}
        atomic_write_json(ctx.path("prune_results.json"), info)
        save_net(small, ctx.path(SLIMMED))
        log.info("slimmed: top1 %.4f before fine-tuning (BN re-estimated on training images) | %s",
                 before["top1"], cost.describe())

    def finetune_loss(self):
        """(loss_fn, train_data_fn) of the fine-tuning; plain cross-entropy by default."""
        return None, None

    def finetune(self):
        ctx = self.ctx
        net = ctx.load_net(ctx.path(SLIMMED))
        loss_fn, data_fn = self.finetune_loss()
        kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
        ctx.train(net, self.cfg.train_epoch, stage="finetune", train_data_fn=data_fn, **kwargs)
        save_net(net, ctx.path(TRAINED))

    def test(self):
        ctx = self.ctx
        net = ctx.load_net(ctx.path(TRAINED))
        with open(ctx.path("prune_results.json")) as f:
            pruned = json.load(f)
        full = ctx.build_net()
        results = {**pruned, **finite(ctx.evaluate(net)), **net.cost().as_dict(),
                   "full_ekg_flops": full.cost().ekg_flops, "full_macs": full.cost().macs, "time": time.time()}
        atomic_write_json(ctx.path("results.json"), results)
        log.info("test: top1 %.4f (%.4f before fine-tuning) | %s", results["top1"],
                 results["before_finetune_top1"], net.cost().describe())

