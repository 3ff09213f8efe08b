"""Baselines in the same harness as EKG: uniform L1-norm filter pruning and random widths.

Both prune the trained net to the same FLOPs target (EKG convention) and are then fine-tuned
with plain cross-entropy and the same budget.
"""

from __future__ import annotations

import numpy as np

from codebase.methods.base import Stage, register
from codebase.methods.pruning import PruningMethod
from nets.layers import Conv2d


def filter_l1(net) -> dict:
    """Per group, the summed L1 norms of the filters of every conv writing into it."""
    scores = {k: np.zeros(g.size) for k, g in net.prunable_groups().items()}
    for layer in net.layers.values():
        if isinstance(layer, Conv2d) and layer.out_group.key in scores:
            scores[layer.out_group.key] += np.abs(layer.kernel.numpy()).sum(axis=(0, 1, 2))
    return scores


def widths_at_rate(net, fractions: dict, target_rate: float) -> dict:
    """Scale per-group keep fractions by one factor so FLOPs land at or just under the target.

    Rounding every group down leaves the FLOPs a few percent under the target (0.426 instead
    of 0.45 for a uniform ResNet-56), so channels are then added back one at a time, each to the
    group furthest below its share, while the FLOPs stay at or under the target: baselines get
    the same budget as the searched net.
    """
    full = {k: g.size for k, g in net.prunable_groups().items()}
    base = net.cost(full).ekg_flops

    def widths(scale):
        return {k: max(1, min(full[k], int(np.floor(fractions[k] * scale * full[k])))) for k in full}

    lo, hi = 0.0, 1.0 / min(fractions.values())
    for _ in range(50):
        mid = (lo + hi) / 2
        if net.cost(widths(mid)).ekg_flops / base <= target_rate:
            lo = mid
        else:
            hi = mid
    chosen = widths(lo)
    while True:
        open_ = sorted((k for k in full if chosen[k] < full[k]), key=lambda k: chosen[k] / (fractions[k] * full[k]))
        for k in open_:
            trial = {**chosen, k: chosen[k] + 1}
            if net.cost(trial).ekg_flops / base <= target_rate:
                chosen = trial
                break
        else:
            return chosen


class _Prune(PruningMethod):
    def stages(self):
        return [Stage("baseline", self.baseline), Stage("prune", self.prune), Stage("finetune", self.finetune),
                Stage("test", self.test)]

    def choose(self, net) -> dict:
        """`{group: kept indices}` at the FLOPs target."""
        raise NotImplementedError

    def prune(self):
        net = self.base_net(masked=True, local=True)
        for key, kept in self.choose(net).items():
            net.groups[key].keep(kept)
        self.save_slimmed(net, {"method": self.cfg.method})


@register("l1")
class L1Pruning(_Prune):
    """Every group keeps the same fraction of channels, those with the largest filter L1 norms."""

    def choose(self, net):
        scores = filter_l1(net)
        widths = widths_at_rate(net, dict.fromkeys(scores, 1.0), self.cfg.search_target_rate)
        return {k: np.argsort(-scores[k], kind="stable")[:widths[k]] for k in scores}


@register("random")
class RandomPruning(_Prune):
    """Random keep fractions per group (scaled to the FLOPs target) and random channels."""

    def choose(self, net):
        rng = np.random.default_rng(self.cfg.seed)
        groups = net.prunable_groups()
        fractions = {k: rng.uniform(0.2, 1.0) for k in groups}
        widths = widths_at_rate(net, fractions, self.cfg.search_target_rate)
        return {k: rng.choice(g.size, widths[k], replace=False) for k, g in groups.items()}
