"""The baselines: widths on the FLOPs target (the searched net's budget), the filters L1 keeps,
and reproducible random pruning."""

import types

import numpy as np

import nets
from codebase.budget import FlopsBudget
from codebase.methods.baselines import L1Pruning, RandomPruning
from tests.support.nets import randomise

# Every conv writing into each group of ResNet-20, by name: a residual stream has several writers.
WRITERS = {
    "stem": ["conv"] + [f"BasicBlock0.{j}/conv2" for j in range(3)],
    "stage1": ["BasicBlock1.0/conv3"] + [f"BasicBlock1.{j}/conv2" for j in range(3)],
    "stage2": ["BasicBlock2.0/conv3"] + [f"BasicBlock2.{j}/conv2" for j in range(3)],
    **{f"BasicBlock{i}.{j}/conv1": [f"BasicBlock{i}.{j}/conv1"] for i in range(3) for j in range(3)},
}


def method(cls, seed=0, **options):
    """A baseline whose `choose` reads only these options (and the run's seed)."""
    step = types.SimpleNamespace(ctx=None, options=types.SimpleNamespace(**options),
                                 run=types.SimpleNamespace(seed=seed))
    return cls(step)


def widths_at_rate(net, fractions, target):
    return FlopsBudget(net).widths_at_rate(fractions, target)


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


def test_l1_keeps_the_channels_with_the_largest_filter_norms_summed_over_every_writer():
    net = nets.build("ResNet-20", masked=True)
    randomise(net)
    params = net.get_params()
    assert set(WRITERS) == set(net.prunable_groups())
    scores = {k: sum(np.abs(params[f"{conv}/kernel:0"]).sum(axis=(0, 1, 2)) for conv in convs)
              for k, convs in WRITERS.items()}
    kept = method(L1Pruning, search_target_rate=0.5).choose(net)
    widths = widths_at_rate(net, dict.fromkeys(scores, 1.0), 0.5)
    for key, score in scores.items():
        assert len(kept[key]) == widths[key] < net.groups[key].size
        assert set(kept[key]) == set(np.argsort(-score)[:widths[key]]), key
    # The streams' choice is the sum's: no single writer's filters would give it.
    for key in ("stem", "stage1", "stage2"):
        for conv in WRITERS[key]:
            alone = np.abs(params[f"{conv}/kernel:0"]).sum(axis=(0, 1, 2))
            assert set(np.argsort(-alone)[:widths[key]]) != set(kept[key]), conv


def test_random_pruning_is_reproducible_per_seed_and_meets_the_budget():
    net = nets.build("ResNet-20", masked=True)
    groups = net.prunable_groups()
    full = net.cost({k: g.size for k, g in groups.items()}).ekg_flops
    choices = [method(RandomPruning, search_target_rate=0.5, seed=seed).choose(net) for seed in (0, 0, 1)]
    assert all(np.array_equal(choices[0][k], choices[1][k]) for k in groups)
    assert any(not np.array_equal(choices[0][k], choices[2][k]) for k in groups)
    for kept in choices:
        widths = {k: len(v) for k, v in kept.items()}
        assert all(len(set(kept[k])) == widths[k] and set(kept[k]) <= set(range(g.size)) for k, g in groups.items())
        assert 0.49 < net.cost(widths).ekg_flops / full <= 0.5
        fractions = [widths[k] / g.size for k, g in groups.items()]
        assert max(fractions) - min(fractions) > 0.3  # random fractions, not uniform ones
        # Random channels too, not the first ones of each group.
        assert any(sorted(kept[k]) != list(range(widths[k])) for k in groups)
