"""Baselines in the same harness as EKG: uniform L1-norm filter pruning and random widths.

Both prune the trained net to the same FLOPs target (EKG convention) and are then fine-tuned
with plain cross-entropy and the same budget (or by the next step of a chain, e.g. `l1,kd`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from codebase.budget import FlopsBudget
from codebase.importance import filter_l1, keep_top
from codebase.methods.base import register
from codebase.methods.pruning import Batched, FlopsTarget, PruneMethod


@dataclasses.dataclass(frozen=True)
class PruneOptions(FlopsTarget, Batched):
    """Options of L1 and random pruning."""


class _Prune(PruneMethod):
    Options = PruneOptions

    def choose(self, net) -> dict:
        """`{group: kept indices}` at the FLOPs target."""
        raise NotImplementedError

    def prune(self):
        net = self.step.start_net(masked=True, local=True)
        for key, kept in self.choose(net).items():
            net.groups[key].keep(kept)
        self.save_pruned(net, {})


@register("l1")
class L1Pruning(_Prune):
    """Every group keeps the same fraction of channels, those with the largest filter L1 norms."""

    def choose(self, net):
        scores = filter_l1(net)
        widths = FlopsBudget(net).widths_at_rate(dict.fromkeys(scores, 1.0), self.options.search_target_rate)
        return keep_top(scores, widths)


@register("random")
class RandomPruning(_Prune):
    """Random keep fractions per group (scaled to the FLOPs target) and random channels."""

    def choose(self, net):
        rng = np.random.default_rng(self.step.run.seed)
        groups = net.prunable_groups()
        fractions = {k: rng.uniform(0.2, 1.0) for k in groups}
        widths = FlopsBudget(net).widths_at_rate(fractions, self.options.search_target_rate)
        return {k: rng.choice(g.size, widths[k], replace=False) for k, g in groups.items()}
