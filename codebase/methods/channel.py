"""`--method cp` and `--method cpr`: PocketFlow's LASSO channel pruning and its remastered variant.

Both prune channel groups one after another in network order (`codebase.channel_stats.problems`:
the groups read only by convolutions; the classifier's input and the image stay). For each group:

1. sample its readers' input patches and outputs at `--cp_points_per_image` random positions per
   image over `--cp_batches` batches of training images (`--search_batch_size` images each);
2. choose the channels to keep: `cp` by LASSO on the channels' contributions with He et al.'s
   penalty search (doubling, then bisection, from `--cp_alpha`); `cpr` by ISTA on the Gram matrix
   with PocketFlow's search (`--cpr_gamma`, `--cpr_ista_lr`, `--cpr_ista_iters`);
3. refit every reading conv's kept input weights: `cp` by least squares (closed form), `cpr` by
   `--cpr_lstsq_iters` Adam steps from the current kernel (`--cpr_lstsq_lr`, plus the step's weight
   decay, as PocketFlow);
4. remove the channels from the group: every layer writing it loses the matching outputs.

Each group is sampled right before it is pruned, so every choice sees the groups pruned before it.
`cp` takes inputs and targets from that net, the net pruned so far; `cpr` takes its inputs from it
and its targets from the full net, so that each refit compensates the error accumulated upstream
(PocketFlow's `chn-pruned-rmt`).

How many channels each group keeps (`--cp_protocol`): `target` (default) meets `--search_target_rate`
of the FLOPs (EKG convention) with one keep fraction for every pruned group, the way L1 and random
pruning meet it; `uniform` keeps `--cp_preserve_ratio` of each pruned group; `list` reads
`--cp_ratio_file`, a JSON object `{group key: preserve ratio}` naming every pruned group (the policy
search writes it). `prune_results.json` lists the groups in order with their kept counts.

Group tuning: with `--cp_list_group N`, N groups are pruned at a time and the masked net is trained
for `--cp_tune_steps` Adam steps at `--cp_tune_lr` (PocketFlow: 1e-4) before the next N are
sampled. The state is saved after every group (`cp_state.npz`: params and masks, plain arrays), so
`--resume` continues in the middle of a layer-by-layer pruning. Then the net is slimmed, its BN
statistics re-estimated on training images, and it is fine-tuned (or distilled: `--method cp,kd`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np

from codebase import channel_stats, lasso
from codebase.artifacts import load_pruning_state, save_pruning_state
from codebase.budget import FlopsBudget
from codebase.methods.base import register
from codebase.methods.pruning import Batched, FlopsTarget, PruneMethod
from codebase.options import fraction, json_object, option, positive
from op_utils.task import Classify
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

PROTOCOLS = ("target", "uniform", "list")
STATE = "cp_state.npz"


@dataclasses.dataclass(frozen=True)
class ChannelRatios(FlopsTarget, Batched):
    """How many channels each pruned group keeps: the options shared by `cp`, `cpr` and `dcp`."""

    cp_protocol: str = option("target", "kept channels per group: target (--search_target_rate of the FLOPs), "
                                        "uniform (--cp_preserve_ratio) or list (--cp_ratio_file)", choices=PROTOCOLS)
    cp_preserve_ratio: float = option(0.5, "fraction of each pruned group's channels kept (--cp_protocol uniform)")
    cp_ratio_file: Optional[str] = option(None, "JSON {group key: preserve ratio} (--cp_protocol list)")

    def validate(self, **context) -> None:
        super().validate(**context)
        fraction("cp_preserve_ratio", self.cp_preserve_ratio, high_open=False)
        if (self.cp_protocol == "list") != (self.cp_ratio_file is not None):
            raise ConfigError("--cp_ratio_file goes with --cp_protocol list, and list needs it")
        if self.cp_ratio_file is not None and not os.path.isfile(self.cp_ratio_file):
            raise ConfigError(f"--cp_ratio_file {self.cp_ratio_file} does not exist")


@dataclasses.dataclass(frozen=True)
class CPOptions(ChannelRatios):
    """Channel pruning's options (PocketFlow's defaults where it has them)."""

    cp_streams: bool = option(True, "also prune residual streams as groups (--no-cp_streams: only the groups "
                                     "inside blocks, as PocketFlow)")
    cp_points_per_image: int = option(10, "sampled output positions per image and conv")
    cp_batches: int = option(30, "batches of training images sampled per group of layers")
    cp_alpha: float = option(1e-4, "cp: the LASSO penalty the search starts from")
    cp_list_group: int = option(1000, "groups pruned between two tuning phases (1000: all at once)")
    cp_tune_steps: int = option(0, "Adam steps of the masked net between two groups of layers")
    cp_tune_lr: float = option(1e-4, "learning rate of the tuning between groups of layers")

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(cp_points_per_image=self.cp_points_per_image, cp_batches=self.cp_batches, cp_alpha=self.cp_alpha,
                 cp_list_group=self.cp_list_group, cp_tune_lr=self.cp_tune_lr)
        if self.cp_tune_steps < 0:
            raise ConfigError(f"--cp_tune_steps must be >= 0, got {self.cp_tune_steps}")


@dataclasses.dataclass(frozen=True)
class CPROptions(CPOptions):
    """The remastered variant's options on top of `cp`'s (PocketFlow's `cpr_*` defaults)."""

    cpr_gamma: float = option(0.1, "cpr: the ISTA penalty the search starts from")
    cpr_ista_lr: float = option(1e-2, "cpr: ISTA step size")
    cpr_ista_iters: int = option(100, "cpr: ISTA iterations per solve")
    cpr_lstsq_lr: float = option(1e-3, "cpr: Adam learning rate of the refit")
    cpr_lstsq_iters: int = option(100, "cpr: Adam steps of the refit")

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(cpr_gamma=self.cpr_gamma, cpr_ista_lr=self.cpr_ista_lr, cpr_ista_iters=self.cpr_ista_iters,
                 cpr_lstsq_lr=self.cpr_lstsq_lr, cpr_lstsq_iters=self.cpr_lstsq_iters)


def kept_counts(net, problems: list, opts: ChannelRatios) -> dict:
    """`{group key: channels kept}` of every pruned group under `--cp_protocol`."""
    sizes = {p.group: net.groups[p.group].size for p in problems}
    if opts.cp_protocol == "uniform":
        ratios = dict.fromkeys(sizes, opts.cp_preserve_ratio)
    elif opts.cp_protocol == "list":
        ratios = _ratio_file(opts.cp_ratio_file, sizes)
    else:
        budget = FlopsBudget(net)
        floor = budget.rate({k: (1 if k in sizes else budget.full[k]) for k in budget.full})
        if opts.search_target_rate < floor:
            raise ConfigError(f"--search_target_rate {opts.search_target_rate} is below {floor:.4f}, the FLOPs of "
                              f"{net.arch} with one channel in every group channel pruning can prune")
        widths = budget.widths_at_rate(dict.fromkeys(sizes, 1.0), opts.search_target_rate, only=sizes)
        return {k: widths[k] for k in sizes}
    return {k: max(1, int(round(ratios[k] * n))) for k, n in sizes.items()}


def _ratio_file(path: str, sizes: dict) -> dict:
    ratios = json_object(path, "cp_ratio_file", "{group key: preserve ratio}")
    missing, unknown = [k for k in sizes if k not in ratios], sorted(set(ratios) - set(sizes))
    if missing or unknown:
        raise ConfigError(f"--cp_ratio_file {path} names {len(ratios)} groups, channel pruning prunes {len(sizes)}: "
                          + (f"no ratio for {missing[0]!r}" if missing else f"{unknown[0]!r} is not one of them"))
    for key, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigError(f"--cp_ratio_file {path}: the ratio of {key} must be in (0, 1], got {value!r}")
    return {k: float(ratios[k]) for k in sizes}


class _ChannelPruning(PruneMethod):
    Options = CPOptions
    targets_from_full = False  # cpr: targets from the unpruned net (else from the net pruned so far)

    # === The two learners' differences ===
    def sampler(self, net, full):
        """Inputs from `net`; targets from `full` (cpr) or from `net` itself."""
        return channel_stats.Sampler(net, full if self.targets_from_full else net, self.options.cp_points_per_image,
                                     self.step.run.seed)

    def select(self, stats: channel_stats.GroupStats, keep: int) -> np.ndarray:
        gram, lin = stats.lasso_terms()
        return lasso.select_by_lasso(gram, lin, keep, alpha0=self.options.cp_alpha)[0]

    def refit(self, conv, stats: channel_stats.ConvStats, rows: np.ndarray) -> np.ndarray:
        return lasso.normal_least_squares(stats.xx[np.ix_(rows, rows)], stats.xy[rows])

    # === The shared procedure ===
    def prune(self):
        step, opts = self.step, self.options
        net = step.start_net(masked=True, local=True)
        full = step.start_net(masked=False, local=True) if self.targets_from_full else None
        problems = channel_stats.problems(net, streams=opts.cp_streams)
        counts = kept_counts(net, problems, opts)
        state = step.path(STATE)
        progress = load_pruning_state(state, net)[0] if self.step.run.resume and os.path.exists(state) else {}
        done, tunes = progress.get("done", []), progress.get("tunes", 0)
        if done:
            log.info("%s: resumed after %d of %d groups", self.name, len(done), len(problems))
        images = self._batches()
        start, timings = time.time(), {}
        todo = [p for p in problems if p.group not in done]
        every = opts.cp_list_group
        while todo:
            if opts.cp_tune_steps and done and len(done) % every == 0 and len(done) // every > tunes:
                self._tune(net, tunes)  # between two groups of layers (after a resume, if it had not run)
                tunes += 1
                save_pruning_state(state, net, {"done": done, "tunes": tunes})
            chunk = todo[:every - len(done) % every]
            for problem in chunk:
                began = time.time()
                stats = self.sampler(net, full).collect([problem], images)[problem.group]
                self._prune_group(net, problem, stats, counts[problem.group])
                done.append(problem.group)
                save_pruning_state(state, net, {"done": done, "tunes": tunes})
                timings[problem.group] = time.time() - began
                log.info("%s: %s keeps %d of %d channels (%d/%d)", self.name, problem.group, counts[problem.group],
                         net.groups[problem.group].size, len(done), len(problems))
            todo = todo[len(chunk):]
        info = {"protocol": opts.cp_protocol, "groups": [{"group": p.group, "kept": counts[p.group],
                                                          "size": net.groups[p.group].size} for p in problems],
                "pruning_seconds": time.time() - start, "tuning_phases": tunes}
        self.save_pruned(net, info)

    def _batches(self) -> list:
        """The sampled training images (inference preprocessing), the same for every group."""
        batches = []
        for images, *_ in self.ctx.data.train_eval(self.options.search_batch_size):
            batches.append(images.numpy())
            if len(batches) == self.options.cp_batches:
                break
        if not batches:
            raise ConfigError("channel pruning found no training images")
        return batches

    def kept_channels(self, stats: channel_stats.GroupStats, keep: int, size: int) -> np.ndarray:
        """The sorted indices of the `keep` of `size` channels `select` chooses (all when keep >= size)."""
        return np.sort(self.select(stats, keep)) if keep < size else np.arange(size)

    def _prune_group(self, net, problem, stats, keep: int) -> None:
        group = net.groups[problem.group]
        kept = self.kept_channels(stats, keep, group.size)
        for key in problem.convs:
            conv = net.layers[key]
            kh, kw = conv.kernel_size
            c = conv.in_group.size
            rows = (np.arange(kh * kw)[:, None] * c + kept[None, :]).reshape(-1)  # (kh, kw, kept) rows
            weights = self.refit(conv, stats.convs[key], rows)
            kernel = np.zeros(conv.kernel.shape, np.float32).reshape(kh * kw * c, -1)
            kernel[rows] = weights
            conv.kernel.assign(kernel.reshape(conv.kernel.shape))
        group.keep(kept)

    def _tune(self, net, index: int) -> None:
        """Train the masked net for `--cp_tune_steps` Adam steps (in the strategy, then back)."""
        step, opts = self.step, self.options
        tuned = step.start_net(masked=True)  # the shapes the pruning started from, in the strategy's scope
        tuned.set_params(net.get_params())
        for key, group in net.groups.items():
            if group.masked:
                tuned.groups[key].mask.assign(group.mask)
        optim = step.optim_for_steps(opts.cp_tune_steps, optimizer="adam", learning_rate=opts.cp_tune_lr,
                                     schedule="constant", warmup_epochs=0.0)
        step.train(Classify(tuned), f"tune{index}", optim_cfg=optim, evaluate=False)
        net.set_params(tuned.get_params())


@register("cp")
class ChannelPruning(_ChannelPruning):
    """He et al.'s LASSO channel pruning (PocketFlow's `channel` learner), on channel groups."""


@register("cpr")
class RemasteredChannelPruning(_ChannelPruning):
    """PocketFlow's remastered channel pruning: inputs from the pruned net, targets from the full net,
    ISTA selection and an Adam refit."""

    Options = CPROptions
    targets_from_full = True

    def select(self, stats, keep):
        gram, lin = stats.lasso_terms()
        o = self.options
        return lasso.select_by_ista(gram, lin, keep, gamma0=o.cpr_gamma, lr=o.cpr_ista_lr, iters=o.cpr_ista_iters,
                                    rng=np.random.default_rng(self.step.run.seed))[0]

    def refit(self, conv, stats, rows):
        o = self.options
        current = conv.kernel.numpy().reshape(-1, stats.c_out)[rows]
        return lasso.adam_normal(stats.xx[np.ix_(rows, rows)], stats.xy[rows], stats.count * stats.c_out, current,
                                 lr=o.cpr_lstsq_lr, iters=o.cpr_lstsq_iters, weight_decay=self.step.optim.weight_decay)
