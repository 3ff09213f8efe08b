"""The policy search's environments: clipping never leaves the budget unreachable (over random
actions), the settings land in their ranges, policies become masks and quantizer choices, and
impossible targets are refused."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase import channel_stats
from codebase.importance import filter_l1
from codebase.methods.quantization import quantized_layers
from codebase.methods.sparsity import attach_masks, maskable
from codebase.policy_envs import BitsEnv, ChannelEnv, SparsityEnv
from nets.quantizers import QuantizerChoice, UniformQuantizer
from tests.support.nets import input_for, randomise
from utils.errors import ConfigError


def roll(env, actions, rng=None):
    env.begin(rng)
    taken = [env.take(i, a) for i, a in enumerate(actions)]
    return env.policy(), taken


@pytest.fixture(scope="module")
def masked_resnet():
    net = nets.build("ResNet-20", masked=True, input_size=8)
    randomise(net, seed=3)
    return net


def channel_env(net, target=0.5, min_ratio=0.2):
    groups = [p.group for p in channel_stats.problems(net, streams=True)]
    return ChannelEnv(net, groups, target, min_ratio)


def test_channel_clipping_keeps_every_random_policy_at_or_under_the_flops_target(masked_resnet):
    env = channel_env(masked_resnet)
    rng = np.random.default_rng(0)
    for trial in range(40):
        actions = rng.uniform(size=len(env.keys)) if trial % 4 else np.ones(len(env.keys)) * (trial % 8 == 0)
        policy, taken = roll(env, actions)
        assert env.summary(policy)["flops_rate"] <= 0.5 + 1e-12
        assert all(env.lowest[k] <= policy[k] <= env.size[k] for k in env.keys)
        assert all(0.0 <= a <= 1.0 for a in taken)
    # Asking for everything ends just under the target: the caps only cut what overshoots.
    policy, _ = roll(env, np.ones(len(env.keys)))
    assert 0.45 < env.summary(policy)["flops_rate"] <= 0.5
    lowest, _ = roll(env, np.zeros(len(env.keys)))
    assert lowest == env.lowest


def test_channel_state_has_a_fixed_size_and_sees_the_flops_removed_so_far(masked_resnet):
    env = channel_env(masked_resnet)
    env.begin()
    first = env.state(0)
    env.take(0, 0.0)
    second = env.state(1)
    assert first.shape == second.shape == (env.state_dim,)
    assert second[-3] > first[-3] == 0.0  # removed so far
    assert second[-1] == 0.0 and np.all(np.isfinite(second))


def test_channel_policy_becomes_the_largest_l1_filters_and_a_ratio_file(masked_resnet):
    env = channel_env(masked_resnet)
    policy, _ = roll(env, np.full(len(env.keys), 0.5))
    env.apply(policy)
    scores = filter_l1(masked_resnet)
    for key in env.keys:
        kept = masked_resnet.groups[key].kept()
        assert len(kept) == policy[key]
        assert set(kept) == set(np.argsort(-scores[key], kind="stable")[:policy[key]])
    ratios = env.payload(policy)
    assert all(int(round(ratios[k] * env.size[k])) == policy[k] for k in env.keys)
    for group in masked_resnet.groups.values():
        group.reset()


def test_a_roll_out_keeps_the_channels_its_inner_pruner_chooses(masked_resnet):
    asked = []

    def last_channels(key, count):  # an inner pruner unlike L1: the highest indices
        asked.append((key, count))
        return np.arange(masked_resnet.groups[key].size - count, masked_resnet.groups[key].size)

    groups = [p.group for p in channel_stats.problems(masked_resnet, streams=True)]
    env = ChannelEnv(masked_resnet, groups, 0.5, 0.2, select=last_channels)
    policy, _ = roll(env, np.full(len(env.keys), 0.5))
    env.apply(policy)
    assert sorted(asked) == sorted(policy.items())
    for key in env.keys:
        size = masked_resnet.groups[key].size
        assert list(masked_resnet.groups[key].kept()) == list(range(size - policy[key], size))
    for group in masked_resnet.groups.values():
        group.reset()


def test_channel_uniform_policy_meets_the_target_with_one_fraction(masked_resnet):
    env = channel_env(masked_resnet)
    rate = env.summary(env.uniform())["flops_rate"]
    assert 0.45 < rate <= 0.5


def test_an_unreachable_flops_target_is_refused(masked_resnet):
    with pytest.raises(ConfigError, match="search_target_rate 0.05 is below"):
        channel_env(masked_resnet, target=0.05, min_ratio=0.5)


def sparsity_env(target=0.75):
    net = nets.build("ResNet-8", input_size=8)
    randomise(net, seed=1)
    masks = attach_masks(net)
    edges = set(maskable(net)) - set(quantized_layers(net, False))
    kernels = {k: net.layers[k].kernel.numpy() for k in masks}
    return net, SparsityEnv(kernels, masks, target, fixed=edges), edges


def test_sparsity_clipping_ends_exactly_at_the_global_target_within_pocketflow_s_bounds():
    _, env, edges = sparsity_env(0.75)
    rng = np.random.default_rng(1)
    for _ in range(40):
        policy, taken = roll(env, rng.uniform(size=len(env.keys)))
        assert abs(env.summary(policy)["sparsity"] - 0.75) < 1e-9
        assert all(policy[k] == 0.0 for k in edges) and edges
        assert all(env.low - 1e-12 <= policy[k] <= env.high + 1e-12 for k in env.keys)
        assert all(0.0 <= a <= 1.0 for a in taken)
    assert env.low == pytest.approx(0.25) and env.high == pytest.approx(1 - 0.25 / 3)


def test_a_sparsity_policy_becomes_magnitude_masks():
    net, env, _ = sparsity_env(0.5)
    policy, _ = roll(env, np.full(len(env.keys), 0.3))
    env.apply(policy)
    for key, mask in env.masks.items():
        kernel = env.kernels[key]
        assert mask.sparsity() == pytest.approx(np.floor(policy[key] * kernel.size) / kernel.size)
        kept = np.abs(kernel)[mask.mask.numpy() > 0]
        dropped = np.abs(kernel)[mask.mask.numpy() == 0]
        assert not dropped.size or dropped.max() <= kept.min()


def test_a_sparsity_the_bounds_cannot_reach_is_refused():
    with pytest.raises(ConfigError, match="ws_sparsity 0.99"):
        sparsity_env(0.99)


def bits_env(bits=4.0, low=2, high=8):
    net = nets.build("ResNet-8", input_size=8)
    randomise(net, seed=2)
    keys = quantized_layers(net, False)
    choices = {k: net.attach(QuantizerChoice([UniformQuantizer(b) for b in range(low, high + 1)]), [f"{k}/kernel"])
               for k in keys}
    kernels = {k: net.layers[k].kernel.numpy() for k in keys}
    return net, BitsEnv(kernels, choices, bits, low, high)


@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0, 7.5])
def test_bit_clipping_stays_within_the_budget_in_any_visiting_order(bits):
    _, env = bits_env(bits)
    rng = np.random.default_rng(int(bits * 10))
    for _ in range(40):
        policy, taken = roll(env, rng.uniform(size=len(env.keys)), rng)
        assert env.summary(policy)["equivalent_bits"] <= bits + 1e-9
        assert all(2 <= policy[k] <= 8 and isinstance(policy[k], int) for k in env.keys)
        assert all(0.0 <= a <= 1.0 for a in taken)
    orders = set()
    for _ in range(5):
        env.begin(rng)
        orders.add(tuple(env.order))
    assert len(orders) > 1  # a new visiting order per roll-out


def test_the_last_layer_takes_the_bits_left():
    _, env = bits_env(4.0)
    policy, _ = roll(env, np.zeros(len(env.keys)))
    last = env.keys[env.order[-1]]
    rest = sum(2 * env.params[k] for k in env.keys if k != last)
    assert policy[last] == min(8, int((4.0 * env.total - rest) // env.params[last]))


def test_a_bits_policy_selects_each_layer_s_quantizer_without_retracing():
    net, env = bits_env(4.0)
    x = input_for(net, batch=2)
    forward = tf.function(lambda t: net(t, training=False), autograph=False)
    outputs = {}
    for bits in (2, 5, 8):
        policy = dict.fromkeys(env.keys, bits)
        env.apply(policy)
        outputs[bits] = forward(x).numpy()
        reference = nets.build("ResNet-8", input_size=8)
        reference.set_params(net.get_params())
        for k in env.keys:
            reference.attach(UniformQuantizer(bits), [f"{k}/kernel"])
        np.testing.assert_allclose(outputs[bits], reference(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert forward.experimental_get_tracing_count() == 1
    assert not np.allclose(outputs[2], outputs[8])


def test_equivalent_bits_outside_the_range_are_refused():
    with pytest.raises(ConfigError, match="equivalent bits 9"):
        bits_env(9.0)
