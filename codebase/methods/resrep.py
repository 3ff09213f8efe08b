"""`--method resrep`: ResRep (Ding et al., ICCV 2021): compactors, Res updates, conversion.

Stages: `baseline` (as the other pruning methods), `resrep` (train `--resrep_epoch` epochs
with a compactor after the BNs of every group written by conv + BN, residual streams included
unless `--no-resrep_streams`; see `Net.add_compactors` and `nets/compactor.py`), `convert`
(fold conv + BN + compactor, remove the rows closed by the masks, save the slimmed net),
`finetune` (`--train_epoch` epochs, 0 = none) and `test`.

The "Res" update: compactor kernels get `m * dL/dQ + lambda * Q_row / |Q_row|` (a gradient
transform after the all-reduce), momentum `--resrep_momentum` and no weight decay (optimizer
overrides). Every `--resrep_interval` steps after `--resrep_before_mask` epochs, the masks are
recomputed from scratch: rows sorted globally by norm are closed from the smallest until the
FLOPs reach `--resrep_target`, keeping one row per group and, while still above the target,
closing at most `--resrep_granularity` rows more than are closed now. Masks are variables of
the net, so they are checkpointed with it and changing them never retraces.
"""

from __future__ import annotations

import collections
import json
import math

import numpy as np

from codebase.context import finite, save_net
from codebase.methods.base import Stage, register
from codebase.methods.pruning import SLIMMED, TRAINED, PruningMethod, recalibrate_bn
from nets import slim
from nets.compactor import fold
from nets.complexity import width_fn_from
from nets.layers import Conv2d
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

RESREP = "resrep_params.pkl"  # the net with its compactors and masks, after the resrep stage
RESREP_LOGS = "resrep_logs.json"  # its last epoch's logs, test accuracy included
LOSSLESS_NORM = 1e-5  # the reference removes rows under this norm: removing them changes nothing


def single_writer_groups(net) -> list:
    """Groups written by exactly one conv: without residual streams (the paper's internal layers)."""
    writers = collections.Counter(layer.out_group.key for layer in net.layers.values() if isinstance(layer, Conv2d))
    return [key for key, count in writers.items() if count == 1]


def res_gradients(net, strength: float):
    """The Trainer's `grad_transform`: ResRep's update direction for the compactor kernels."""
    compactors = {c.kernel.ref(): c for c in net.compactors.values()}

    def transform(grads, variables):
        return [grad if var.ref() not in compactors else compactors[var.ref()].res_gradient(grad, strength)
                for grad, var in zip(grads, variables, strict=True)]

    return transform


def compactor_overrides(net, momentum: float):
    """Optimizer overrides: the compactor kernels' own momentum and no weight decay."""
    kernels = {c.kernel.ref() for c in net.compactors.values()}
    return lambda var: {"momentum": momentum, "weight_decay": 0.0} if var.ref() in kernels else None


class GroupFlops:
    """EKG FLOPs of a net as a function of its group widths, also one channel at a time."""

    def __init__(self, net):
        self.net = net
        self.touching = {key: [layer for layer in net.layers.values() if group in layer.groups()]
                         for key, group in net.prunable_groups().items()}

    def total(self, widths: dict) -> int:
        return self.net.cost(widths).ekg_flops

    def saving(self, widths: dict, key: str) -> int:
        """FLOPs saved by removing one channel of group `key` at `widths`."""
        now, fewer = width_fn_from(widths), width_fn_from({**widths, key: widths[key] - 1})
        return sum(layer.cost(now).ekg_flops - layer.cost(fewer).ekg_flops for layer in self.touching[key])


def select_closed(norms: dict, full: dict, current: dict, flops, target: float, granularity: int) -> dict:
    """ResRep's mask update: `{group: closed row indices}` chosen from scratch.

    Args:
        norms: `{group: row norms}` of the compacted groups (the candidates).
        full, current: widths of every prunable group: unpruned, and under the current masks.
        flops: a `GroupFlops` (or anything with `total(widths)` and `saving(widths, key)`).
        target: kept fraction of the full FLOPs to reach.
        granularity: while the current FLOPs are above the target, close at most this many rows
            more than are closed now (only rows actually closed count; skipped ones do not).
    """
    budget = target * flops.total(full)
    limit = math.inf
    if flops.total(current) > budget:
        limit = sum(full[k] - current[k] for k in norms) + granularity
    order = sorted((float(n), i, key, row) for i, key in enumerate(norms) for row, n in enumerate(norms[key]))
    widths, closed, cost = dict(full), {key: [] for key in norms}, flops.total(full)
    count = 0
    for _, _, key, row in order:
        if cost <= budget or count >= limit:
            break
        if widths[key] <= 1:
            continue  # a layer keeps at least one channel
        cost -= flops.saving(widths, key)
        widths[key] -= 1
        closed[key].append(row)
        count += 1
    return closed


class MaskSchedule:
    """The `on_step_end` hook of the resrep stage: mask updates and TensorBoard scalars.

    After global step `s` it recomputes the masks when `s > before` and `s - before` is a
    multiple of `interval`; its scalars (FLOPs kept, closed rows, mean compactor row norms of
    open and closed rows) are refreshed then and every `interval` steps.
    """

    def __init__(self, net, target: float, interval: int, before: int, granularity: int):
        self.compactors = net.compactors
        self.flops = GroupFlops(net)
        self.full = {key: group.size for key, group in net.prunable_groups().items()}
        self.target, self.interval, self.before, self.granularity = target, interval, before, granularity
        self.stats = None

    def widths(self) -> dict:
        return {**self.full, **{k: int(c.mask.numpy().sum()) for k, c in self.compactors.items()}}

    def __call__(self, step: int) -> dict:
        if step > self.before and (step - self.before) % self.interval == 0:
            self.update(step)
        elif self.stats is None or step % self.interval == 0:
            self.stats = self.measure()
        return self.stats

    def update(self, step: int) -> None:
        norms = {key: c.row_norms() for key, c in self.compactors.items()}
        closed = select_closed(norms, self.full, self.widths(), self.flops, self.target, self.granularity)
        for key, compactor in self.compactors.items():
            mask = np.ones(compactor.group.size, np.float32)
            mask[closed[key]] = 0.0
            compactor.mask.assign(mask)
        self.stats = self.measure(norms)
        log.info("step %d: masks updated; %s", step, " ".join(f"{k}={v:.4g}" for k, v in self.stats.items()))

    def measure(self, norms: dict | None = None) -> dict:
        norms = norms or {key: c.row_norms() for key, c in self.compactors.items()}
        open_, shut = [], []
        for key, compactor in self.compactors.items():
            mask = compactor.mask.numpy() > 0.5
            open_.append(norms[key][mask])
            shut.append(norms[key][~mask])
        open_, shut = np.concatenate(open_), np.concatenate(shut)
        return {"flops_kept": self.flops.total(self.widths()) / self.flops.total(self.full),
                "closed_channels": float(shut.size), "compactor_norm_open": float(open_.mean()),
                "compactor_norm_closed": float(shut.mean()) if shut.size else 0.0}


@register("resrep")
class ResRep(PruningMethod):
    def stages(self):
        return [Stage("baseline", self.baseline), Stage("resrep", self.resrep), Stage("convert", self.convert),
                Stage("finetune", self.finetune), Stage("test", self.test)]

    def resrep(self):
        ctx, cfg = self.ctx, self.cfg
        local = self.base_net(local=True)
        if not local.add_compactors(None if cfg.resrep_streams else single_writer_groups(local)):
            raise ConfigError(f"--arch {cfg.arch} has no conv + BatchNorm group for a compactor")
        net = ctx.copy_net(local)
        schedule = MaskSchedule(net, cfg.resrep_target, cfg.resrep_interval,
                                round(cfg.resrep_before_mask * ctx.steps_per_epoch()), cfg.resrep_granularity)
        log.info("resrep: %d compactors; %s", len(net.compactors), ctx.describe(net))
        logs = ctx.train(net, cfg.resrep_epoch, stage="resrep", grad_transform=res_gradients(net, cfg.resrep_lambda),
                         optimizer_overrides=compactor_overrides(net, cfg.resrep_momentum), on_step_end=schedule)
        atomic_write_json(ctx.path(RESREP_LOGS), {**finite(logs), **schedule.measure()})
        save_net(net, ctx.path(RESREP))

    def convert(self):
        """Fold the compactors, remove the closed rows and save the slimmed net with its accuracy."""
        ctx = self.ctx
        net = ctx.load_net(ctx.path(RESREP))
        with open(ctx.path(RESREP_LOGS)) as f:
            trained = json.load(f)
        small = slim(fold(net))
        evaluated = ctx.copy_net(small)
        folded = ctx.evaluate(evaluated)
        removed = np.concatenate([c.row_norms()[c.mask.numpy() < 0.5] for c in net.compactors.values()])
        largest = float(removed.max(initial=0.0))
        # Rows that had not decayed (a short run) leave the BN statistics after them stale, as any
        # pruning does: re-estimate them on training images like the other methods. A lossless
        # conversion (every removed row under the reference's 1e-5) keeps the trained statistics.
        reestimate = largest > LOSSLESS_NORM
        before = folded
        if reestimate:
            recalibrate_bn(small, ctx.data.train_eval(self.cfg.search_batch_size))
            evaluated = ctx.copy_net(small)
            before = ctx.evaluate(evaluated)
        cost, full = evaluated.cost(), net.cost()
        info = {"method": "resrep", "resrep_top1": trained["eval_top1"], "folded_top1": float(folded["top1"]),
                "bn_reestimated": reestimate, "before_finetune_top1": float(before["top1"]),
                "flops_rate": cost.ekg_flops / full.ekg_flops, "closed_channels": int(removed.size),
                "closed_norm_max": largest,
                **{f"slimmed_{k}": v for k, v in cost.as_dict().items()}, "widths": evaluated.widths()}
        atomic_write_json(ctx.path("prune_results.json"), info)
        save_net(evaluated, ctx.path(SLIMMED))
        log.info("converted: top1 %.4f with compactors, %.4f folded with %d closed rows removed (largest norm "
                 "%.3g)%s | %s", info["resrep_top1"], info["folded_top1"], removed.size, largest,
                 f", {info['before_finetune_top1']:.4f} with BN statistics re-estimated" if reestimate else "",
                 cost.describe())

    def finetune(self):
        if self.cfg.train_epoch:
            return super().finetune()
        save_net(self.ctx.load_net(self.ctx.path(SLIMMED)), self.ctx.path(TRAINED))
