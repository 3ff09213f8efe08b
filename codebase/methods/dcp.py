"""`--method dcp`: discrimination-aware channel pruning (Zhuang et al. 2018; PocketFlow's `dis-chn-pruned`).

The convolutions, in network order, are split evenly into `--dcp_stages` + 1 stages (PocketFlow:
`ceil((convs + 1) / (stages + 1))` convs each); an auxiliary head (`codebase.dcp_tasks.AuxHead`:
BN, ReLU, global pooling, dense) reads the output of the last conv of every stage but the last,
whose discrimination loss is the net's own cross-entropy. Stage by stage:

1. block-wise fine-tuning: `--dcp_block_steps` Adam steps (`--dcp_lr`) of every weight on the
   final cross-entropy plus the stage head's (PocketFlow: 10,000);
2. for each channel group of the stage (`codebase.channel_stats.problems`, the groups inside
   blocks: a group read by one conv, never the image), in order, choose the kept channels
   greedily by addition (`codebase.dcp_tasks.ChannelChoice`): starting from none, add the channel
   whose reading-kernel rows have the largest gradient norm of reconstruction loss (the conv's
   output against the unpruned net's) plus discrimination loss, then fine-tune the reading conv on
   the same loss for `--dcp_layer_steps` Adam steps (PocketFlow: 500), until the group keeps its
   count. `--dcp_chunk N` adds the N largest at once: N times fewer fine-tunings.

How many channels each group keeps is `cp`'s `--cp_protocol` (FLOPs target, uniform, list), over
these groups. Residual streams are not pruned: DCP's criterion and its fine-tuning act on the
kernel rows of the convs reading a channel, and a stream is also carried on by identity shortcuts
that no kernel row controls (PocketFlow, too, pruned only the convs' input channels inside blocks).
The state (net, masks, heads, stages and groups done) is saved after every block-wise fine-tuning
and every group (`dcp_state.npz`, plain arrays), and each training inside checkpoints as any
training does, so `--resume` continues where the pruning stopped. Then the net is slimmed, its BN
statistics re-estimated, and it is fine-tuned on the final loss alone (or distilled: `dcp,kd`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time


from codebase import channel_stats
from codebase.artifacts import load_pruning_state, save_pruning_state
from codebase.dcp_tasks import REC_LOSSES, AuxHead, ChannelChoice, StageTune
from codebase.methods.base import register
from codebase.methods.channel import ChannelRatios, kept_counts
from codebase.methods.pruning import PruneMethod
from codebase.options import option, positive
from nets.layers import Conv2d
from utils.errors import ConfigError
from utils.logs import get_logger

log = get_logger(__name__)

STATE = "dcp_state.npz"


@dataclasses.dataclass(frozen=True)
class DCPOptions(ChannelRatios):
    """Discrimination-aware channel pruning's options (PocketFlow's `dcp_*` defaults)."""

    dcp_stages: int = option(3, "dcp: auxiliary heads, evenly spaced over the convolutions (stages + 1 stages)")
    dcp_lr: float = option(1e-3, "dcp: Adam learning rate of the block-wise and layer-wise fine-tuning")
    dcp_block_steps: int = option(10000, "dcp: Adam steps of the block-wise fine-tuning of each stage")
    dcp_layer_steps: int = option(500, "dcp: Adam steps of the layer-wise fine-tuning after each choice")
    dcp_chunk: int = option(1, "dcp: channels added per choice (1: PocketFlow; N: N times fewer fine-tunings)")
    dcp_rec_loss: str = option("sum", "dcp: reconstruction loss: sum (PocketFlow's l2_loss over the batch) or "
                                      "mean (over positions and channels, the paper's)", choices=REC_LOSSES)

    def validate(self, **context) -> None:
        super().validate(**context)
        positive(dcp_stages=self.dcp_stages, dcp_lr=self.dcp_lr, dcp_layer_steps=self.dcp_layer_steps,
                 dcp_chunk=self.dcp_chunk)
        if self.dcp_block_steps < 0:
            raise ConfigError(f"--dcp_block_steps must be >= 0, got {self.dcp_block_steps}")


def stage_plan(net, stages: int) -> tuple:
    """`(heads, stage_of)`: the convs whose outputs the heads read, in order, and `{conv key: stage}`
    for every conv, PocketFlow's even split of the convs into `stages + 1` stages."""
    convs = [s.layer.key for s in net.sites() if s.kind == "layer_in" and isinstance(s.layer, Conv2d)]
    per = math.ceil((len(convs) + 1) / (stages + 1))
    heads = [key for i, key in enumerate(convs) if (i + 1) % per == 0]
    return heads, {key: i // per for i, key in enumerate(convs)}


def _save_state(path: str, net, heads: list, done: dict) -> None:
    """`done`: `{"stages": [stage indices tuned], "groups": [group keys chosen]}`."""
    extra = {f"head{i}/{k}": v for i, head in enumerate(heads) for k, v in head.get_params().items()}
    save_pruning_state(path, net, done, extra)


def _load_state(path: str, net, heads: list) -> dict:
    done, extra = load_pruning_state(path, net)
    for i, head in enumerate(heads):
        head.set_params({k.split("/", 1)[1]: v for k, v in extra.items() if k.startswith(f"head{i}/")})
    return done


@register("dcp")
class DiscriminationAwarePruning(PruneMethod):
    """Zhuang et al.'s discrimination-aware channel pruning (PocketFlow's `dis-chn-pruned`), on channel groups."""

    Options = DCPOptions

    def prune(self):
        step, opts, ctx = self.step, self.options, self.ctx
        net = step.start_net(masked=True)
        full = step.start_net(masked=False)
        problems = channel_stats.problems(net, streams=False)
        if not problems:
            raise ConfigError(f"--method dcp: {net.arch} has no channel group inside a block to prune (dcp leaves "
                              "residual streams)")
        counts = kept_counts(net, problems, opts)
        heads_at, stage_of = stage_plan(net, opts.dcp_stages)
        with ctx.strategy.scope():
            heads = [AuxHead(net.layers[key].out_group.size, ctx.info.num_classes, step.run.seed + i, f"head{i}")
                     for i, key in enumerate(heads_at)]
        state = step.path(STATE)
        done = _load_state(state, net, heads) if step.run.resume and os.path.exists(state) else \
            {"stages": [], "groups": []}
        if done["stages"]:
            log.info("dcp: resumed after %d block-wise fine-tunings and %d groups", len(done["stages"]),
                     len(done["groups"]))
        start, groups = time.time(), []
        for stage in range(len(heads) + 1):
            head, site = (heads[stage], f"{heads_at[stage]}:out") if stage < len(heads) else (None, None)
            if stage not in done["stages"]:
                if opts.dcp_block_steps:
                    step.train(StageTune(net, head, site), f"stage{stage}", optim_cfg=self._adam(opts.dcp_block_steps),
                               evaluate=False)
                done["stages"].append(stage)
                _save_state(state, net, heads, done)
            for problem in (p for p in problems if stage_of[p.convs[0]] == stage):
                group, keep = net.groups[problem.group], counts[problem.group]
                if problem.group not in done["groups"]:
                    self._choose(net, full, problem, keep, head, site)
                    done["groups"].append(problem.group)
                    _save_state(state, net, heads, done)
                groups.append({"group": problem.group, "kept": keep, "size": group.size, "stage": stage})
                log.info("dcp: stage %d: %s keeps %d of %d channels", stage, problem.group, keep, group.size)
        info = {"protocol": opts.cp_protocol, "groups": groups, "heads": heads_at,
                "pruning_seconds": time.time() - start}
        self.save_pruned(net, info)

    def _adam(self, steps: int):
        return self.step.optim_for_steps(steps, optimizer="adam", learning_rate=self.options.dcp_lr,
                                         schedule="constant", warmup_epochs=0.0)

    def _choose(self, net, full, problem, keep: int, head, site) -> None:
        group, opts = net.groups[problem.group], self.options
        if keep >= group.size:
            return
        batch = self.step.optim.batch_size
        with self.ctx.strategy.scope():
            task = ChannelChoice(net, full, problem.convs, keep, head, site, opts.dcp_chunk, opts.dcp_layer_steps,
                                 opts.dcp_rec_loss, rec_weight=batch if opts.dcp_rec_loss == "sum" else 1.0)
        folder = "choose_" + re.sub(r"[^A-Za-z0-9_.-]", "_", problem.group)
        self.step.train(task, folder, optim_cfg=self._adam(task.total_steps), evaluate=False)
        chosen = task.chosen()
        if len(chosen) != keep:
            raise RuntimeError(f"dcp chose {len(chosen)} channels of {problem.group}, not {keep}")
        group.keep(chosen)
