"""`--method resrep`: ResRep (Ding et al., ICCV 2021): compactors, Res updates, conversion.

Stages: `resrep` (train `--resrep_epoch` epochs with a compactor after the BNs of every group
written by conv + BN, residual streams included unless `--no-resrep_streams`; see
`Net.add_compactors` and `nets/compactor.py`), `convert` (fold conv + BN + compactor, remove the
rows closed by the masks, save the slimmed net), `finetune` (`--train_epoch` epochs, 0 = none;
left to the next step when it trains) and `test`.

The "Res" update: compactor kernels get `m * dL/dQ + lambda * Q_row / |Q_row|` (the task's
gradient transform, after the all-reduce), momentum `--resrep_momentum` and no weight decay
(the task's optimizer overrides). Every `--resrep_interval` steps after `--resrep_before_mask`
epochs, the masks are recomputed from scratch: rows sorted globally by norm are closed from the
smallest until the FLOPs reach `--resrep_target`, keeping one row per group and, while still
above the target, closing at most `--resrep_granularity` rows more than are closed now. Masks
are variables of the net, so they are checkpointed with it and changing them never retraces.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import numpy as np

from codebase import stages
from codebase.budget import FlopsBudget
from codebase.context import finite
from codebase.importance import compactor_norms
from codebase.methods.base import Stage, register
from codebase.methods.pruning import Batched, PruneMethod
from codebase.options import fraction, option, positive
from nets import slim
from nets.compactor import fold
from nets.layers import Conv2d
from op_utils.task import Classify
from utils.atomic import atomic_write_json
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

RESREP = "resrep_params.pkl"  # the net with its compactors and masks, after the resrep stage
RESREP_LOGS = "resrep_logs.json"  # its last epoch's logs, test accuracy included
LOSSLESS_NORM = 1e-5  # the reference removes rows under this norm: removing them changes nothing


@dataclasses.dataclass(frozen=True)
class ResRepOptions(Batched):
    """ResRep's options (the reference values of Ding et al. for ResNet-56 on CIFAR-10)."""

    resrep_epoch: int = option(480, "epochs of training with compactors (the step's learning-rate schedule spans "
                                    "them); --train_epoch is the optional fine-tuning after the conversion")
    resrep_lambda: float = option(1e-4, "group-lasso strength on the compactor rows")
    resrep_interval: int = option(200, "steps between mask updates")
    resrep_before_mask: float = option(5.0, "epochs of lasso only before the first mask update")
    resrep_target: float = option(0.471, "keep this fraction of the FLOPs (EKG convention)")
    resrep_granularity: int = option(4, "rows one mask update may close beyond those already closed, while above "
                                        "the target")
    resrep_momentum: float = option(0.99, "SGD momentum of the compactors (they get no weight decay)")
    resrep_streams: bool = option(True, "also compact groups written by several convs, i.e. residual streams "
                                        "(--no-resrep_streams: only single-writer groups, the paper's internal layers)")

    def validate(self, optim=None, **context) -> None:
        super().validate(optim=optim, **context)
        positive(resrep_epoch=self.resrep_epoch, resrep_interval=self.resrep_interval,
                 resrep_granularity=self.resrep_granularity)
        if not (self.resrep_lambda >= 0 and self.resrep_before_mask >= 0):
            raise ConfigError(f"--resrep_lambda and --resrep_before_mask must be >= 0, got "
                              f"{self.resrep_lambda} and {self.resrep_before_mask}")
        fraction("resrep_target", self.resrep_target)
        fraction("resrep_momentum", self.resrep_momentum, low_open=False)
        if optim is not None and optim.optimizer != "sgd":
            raise ConfigError("--method resrep needs --optimizer sgd (the compactors have their own momentum)")


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


def select_closed(norms: dict, full: dict, current: dict, flops, target: float, granularity: int) -> dict:
    """ResRep's mask update: `{group: closed row indices}` chosen from scratch.

    Args:
        norms: `{group: row norms}` of the compacted groups (the candidates).
        full, current: widths of every prunable group: unpruned, and under the current masks.
        flops: a `FlopsBudget` (or anything with `total(widths)` and `saving(widths, key)`).
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
        self.net = net
        self.compactors = net.compactors
        self.flops = FlopsBudget(net)
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
        norms = compactor_norms(self.net)
        closed = select_closed(norms, self.full, self.widths(), self.flops, self.target, self.granularity)
        for key, compactor in self.compactors.items():
            mask = np.ones(compactor.group.size, np.float32)
            mask[closed[key]] = 0.0
            compactor.mask.assign(mask)
        self.stats = self.measure(norms)
        log.info("step %d: masks updated; %s", step, " ".join(f"{k}={v:.4g}" for k, v in self.stats.items()))

    def measure(self, norms: dict | None = None) -> dict:
        norms = norms or compactor_norms(self.net)
        open_, shut = [], []
        for key, compactor in self.compactors.items():
            mask = compactor.mask.numpy() > 0.5
            open_.append(norms[key][mask])
            shut.append(norms[key][~mask])
        open_, shut = np.concatenate(open_), np.concatenate(shut)
        return {"flops_kept": self.flops.total(self.widths()) / self.flops.total(self.full),
                "closed_channels": float(shut.size), "compactor_norm_open": float(open_.mean()),
                "compactor_norm_closed": float(shut.mean()) if shut.size else 0.0}


class ResRepTask(Classify):
    """Cross-entropy training of a net with compactors: the Res update and the compactors' momentum."""

    def __init__(self, net, strength: float, momentum: float):
        super().__init__(net, grad_transform=res_gradients(net, strength),
                         overrides=compactor_overrides(net, momentum))


@register("resrep")
class ResRep(PruneMethod):
    Options = ResRepOptions

    @classmethod
    def optim_defaults(cls, dataset):
        # The reference: cosine from 0.01 to 0 without warm-up, weight decay 1e-4, and no
        # fine-tuning (the conversion is lossless); its batch (64 on CIFAR, 256 on ImageNet) is a flag.
        return dict(learning_rate=0.01, schedule="cosine", warmup_epochs=0.0, weight_decay=1e-4, momentum=0.9,
                    train_epoch=0)

    @classmethod
    def trains_optional(cls, options):
        return True

    def stages(self):
        tail = [] if self.step.next_trains or not self.step.optim.train_epoch else [Stage("finetune", self.finetune)]
        return [Stage("resrep", self.resrep), Stage("convert", self.convert), *tail, Stage("test", self.test)]

    def resrep(self):
        step, opts = self.step, self.options
        local = step.start_net(local=True)
        if not local.add_compactors(None if opts.resrep_streams else single_writer_groups(local)):
            raise ConfigError(f"--arch {local.arch} has no conv + BatchNorm group for a compactor")
        net = self.ctx.copy_net(local)
        schedule = MaskSchedule(net, opts.resrep_target, opts.resrep_interval,
                                round(opts.resrep_before_mask * self.ctx.steps_per_epoch(step.optim)),
                                opts.resrep_granularity)
        log.info("resrep: %d compactors; %s", len(net.compactors), self.ctx.describe(net))
        # The step's schedule spans the training with compactors; --train_epoch is the fine-tuning after.
        optim = step.optim_with(train_epoch=opts.resrep_epoch)
        logs = step.train(ResRepTask(net, opts.resrep_lambda, opts.resrep_momentum), "resrep", optim,
                          on_step_end=schedule)
        atomic_write_json(step.path(RESREP_LOGS), {**finite(logs), **schedule.measure()})
        step.save(net, RESREP)

    def convert(self):
        """Fold the compactors, remove the closed rows and save the slimmed net with its accuracy."""
        step, ctx = self.step, self.ctx
        net = ctx.load_net(step.path(RESREP))
        with open(step.path(RESREP_LOGS)) as f:
            trained = json.load(f)
        info = convert_net(ctx, net, trained["eval_top1"], self.options.search_batch_size)
        small = info.pop("net")
        atomic_write_json(step.path(stages.PRUNE_RESULTS), info)
        step.save(small, stages.SLIMMED)
        if step.next_trains or not step.optim.train_epoch:
            step.save(small)

    def finetune(self):
        stages.finetune(self.step, self.step.path(stages.SLIMMED))


def convert_net(ctx, net, trained_top1: float, batch_size: int) -> dict:
    """Fold `net`'s compactors and remove the closed rows: the slimmed net (`"net"`) and what the
    conversion did. Removed rows under the reference's 1e-5 make it lossless, and the trained BN
    statistics are kept; otherwise (a short run) the BN statistics after the removed rows are
    stale, as after any pruning, and are re-estimated on training images like the other methods."""
    small = slim(fold(net))
    evaluated = ctx.copy_net(small)
    folded = ctx.evaluate(evaluated)
    removed = np.concatenate([c.row_norms()[c.mask.numpy() < 0.5] for c in net.compactors.values()])
    largest = float(removed.max(initial=0.0))
    reestimate = largest > LOSSLESS_NORM
    before = folded
    if reestimate:
        stages.recalibrate_bn(small, ctx.data.train_eval(batch_size))
        evaluated = ctx.copy_net(small)
        before = ctx.evaluate(evaluated)
    cost, full = evaluated.cost(), stages.full_cost(net)
    info = {"method": "resrep", "resrep_top1": trained_top1, "folded_top1": float(folded["top1"]),
            "bn_reestimated": reestimate, "before_finetune_top1": float(before["top1"]),
            "flops_rate": cost.ekg_flops / full.ekg_flops, "closed_channels": int(removed.size),
            "closed_norm_max": largest,
            **{f"slimmed_{k}": v for k, v in cost.as_dict().items()}, "widths": evaluated.widths()}
    log.info("converted: top1 %.4f with compactors, %.4f folded with %d closed rows removed (largest norm "
             "%.3g)%s | %s", trained_top1, info["folded_top1"], removed.size, largest,
             f", {info['before_finetune_top1']:.4f} with BN statistics re-estimated" if reestimate else "",
             cost.describe())
    return {**info, "net": evaluated}
