"""The baselines' widths land on the FLOPs target: they get the same budget as the searched net."""

import numpy as np

import nets
from codebase.methods.baselines import widths_at_rate


def test_uniform_widths_land_just_under_the_target():
    net = nets.build("ResNet-56", masked=True)
    groups = net.prunable_groups()
    full = net.cost({k: g.size for k, g in groups.items()}).ekg_flops
    widths = widths_at_rate(net, dict.fromkeys(groups, 1.0), 0.45)
    rate = net.cost(widths).ekg_flops / full
    assert 0.445 < rate <= 0.45
    fractions = np.array([widths[k] / g.size for k, g in groups.items()])
    assert fractions.max() - fractions.min() < 0.2  # still uniform, up to rounding of small groups
    random = widths_at_rate(net, {k: 0.2 + 0.8 * (i % 5) / 4 for i, k in enumerate(groups)}, 0.45)
    assert 0.44 < net.cost(random).ekg_flops / full <= 0.45
