"""FLOPs budgets: a net's FLOPs (EKG convention) as a function of its group widths.

One helper for every method that prunes to a FLOPs target: EKG's search checks each
candidate against it, ResRep's mask update removes channels until it is met, L1 and random
pruning scale their keep fractions onto it, and channel pruning and the policy search will
clip their per-layer ratios with it. Nothing is run: costs are pure functions of the layer
shapes and the widths (`nets.complexity`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from nets.complexity import width_fn_from


class FlopsBudget:
    """EKG-convention FLOPs of `net`'s architecture at any widths of its prunable groups.

    Args:
        net: a built net (masked or not); its groups' full sizes define the unpruned cost.
    """

    def __init__(self, net):
        self.net = net
        self.full = {key: group.size for key, group in net.prunable_groups().items()}
        self.full_flops = net.cost(self.full).ekg_flops
        self.touching = {key: [layer for layer in net.layers.values() if group in layer.groups()]
                         for key, group in net.prunable_groups().items()}

    def total(self, widths: Mapping[str, int]) -> int:
        """FLOPs at `widths` (groups not named keep their current width)."""
        return self.net.cost(widths).ekg_flops

    def rate(self, widths: Mapping[str, int]) -> float:
        """FLOPs at `widths` as a fraction of the unpruned net's."""
        return self.total(widths) / self.full_flops

    def saving(self, widths: Mapping[str, int], key: str) -> int:
        """FLOPs saved by removing one channel of group `key` at `widths`."""
        now, fewer = width_fn_from(widths), width_fn_from({**widths, key: widths[key] - 1})
        return sum(layer.cost(now).ekg_flops - layer.cost(fewer).ekg_flops for layer in self.touching[key])

    def widths_at_rate(self, fractions: Mapping[str, float], target_rate: float, only=None) -> dict:
        """Scale per-group keep fractions by one factor so FLOPs land at or just under the target.

        Rounding every group down leaves the FLOPs a few percent under the target (0.426 instead
        of 0.45 for a uniform ResNet-56), so channels are then added back one at a time, each to
        the group furthest below its share, while the FLOPs stay at or under the target: every
        method gets the same budget. With `only` (group keys), only those groups are scaled (and
        need fractions); the others keep their full width (channel pruning leaves some groups).
        The result names every prunable group.
        """
        full = self.full
        scaled = [k for k in full if only is None or k in only]
        fixed = {k: full[k] for k in full if k not in scaled}

        def widths(scale):
            return {**fixed, **{k: max(1, min(full[k], int(np.floor(fractions[k] * scale * full[k])))) for k in scaled}}

        lo, hi = 0.0, 1.0 / min(fractions[k] for k in scaled)
        for _ in range(50):
            mid = (lo + hi) / 2
            if self.rate(widths(mid)) <= target_rate:
                lo = mid
            else:
                hi = mid
        chosen = widths(lo)
        while True:
            open_ = sorted((k for k in scaled if chosen[k] < full[k]),
                           key=lambda k: chosen[k] / (fractions[k] * full[k]))
            for k in open_:
                trial = {**chosen, k: chosen[k] + 1}
                if self.rate(trial) <= target_rate:
                    chosen = trial
                    break
            else:
                return chosen
