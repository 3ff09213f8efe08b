"""Properties every registered net must have, parametrised over the registry (heavy ones: one net per family)."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from tests.support.nets import (Pristine, assert_close_to_scale, family_representatives, input_for, lean_config,
                                lean_net, random_masks, randomise, small_net)
from utils.params_io import load_params, save_params

ARCHS = nets.list_archs()
# The heavy properties run on one net per family: deeper variants repeat the same blocks.
FAMILIES = family_representatives()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """One lean net per family (tests/support/nets.py), randomised: built once for the three
    tests below, which pytest groups by it."""
    net = lean_net(request.param)
    randomise(net)
    return Pristine(net)


@pytest.fixture
def net(family):
    """The family's net as `family` built it: params, masks and mask options restored."""
    return family.restored()


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape(arch):
    net = small_net(arch)
    x = input_for(net)
    classes = net.groups["logits"].size
    assert net(x, training=False).shape == (2, classes)
    assert net(x, training=True).shape == (2, classes)


def assert_same_outputs(small, net, x, what):
    # Each mode at its own scale: with renorm masks the inference logits reach 5e4 (VGG-16) to
    # 2e7 (ResNet-50) while batch statistics keep the training-mode logits near 1.
    assert_close_to_scale(small(x), net(x), err_msg=what)
    # Batch statistics of a one-channel group over a 2x2 map amplify the rounding of
    # differently blocked convolutions, so training mode gets a looser relative tolerance.
    assert_close_to_scale(small(x, training=True), net(x, training=True), rtol=1e-3, err_msg=what + " training=True")


def test_masked_equals_slimmed(net):
    arch = net.arch
    groups = list(net.prunable_groups())
    x = input_for(net, batch=4)
    # Random masks everywhere, then random masks that also empty all but one channel of two groups
    # (one in the middle, the last one); the EKG kernel renormalisation on for the second.
    for seed, single, renorm in [(1, (), False), (2, (groups[len(groups) // 2], groups[-1]), True)]:
        random_masks(net, seed=seed, single=single)
        net.options.set(renorm=renorm)
        small = nets.slim(net)
        assert small.widths() == net.widths()
        assert not small.masked and all(g.mask is None for g in small.groups.values())
        assert_same_outputs(small, net, x, f"{arch} single={single} renorm={renorm}")
        assert small.cost() == net.cost()
        assert small.cost() == net.cost(net.widths())


def test_params_pickle_round_trip(net, tmp_path):
    arch = net.arch
    random_masks(net, seed=4)
    small = nets.slim(net)
    path = tmp_path / "trained_params.pkl"
    save_params(path, small.get_params())
    loaded = load_params(path)
    assert set(loaded) == set(small.param_vars())
    # The pickle alone (no width spec) rebuilds the slimmed architecture, as EKG pickles do.
    # (The config is the test's: input size, classes and the lean depths or widths.)
    rebuilt = nets.build_from_params(arch, loaded, **lean_config(arch))
    assert rebuilt.widths() == small.widths()
    x = input_for(net)
    want = small(x)
    np.testing.assert_allclose(rebuilt(x), want, atol=1e-5)
    # ... and so does the spec.
    from_spec = nets.build_from_spec(small.spec())
    from_spec.set_params(loaded)
    np.testing.assert_allclose(from_spec(x), want, atol=1e-5)


def test_forward_traced_once_across_widths(net):
    traces = []

    @tf.function
    def forward(x):
        traces.append(1)
        return net(x, training=False)

    x = tf.constant(input_for(net))
    for seed in range(6):
        random_masks(net, seed=seed)
        net.options.set(renorm=seed % 2 == 0)
        forward(x)
    assert len(traces) == 1


def _bn_with_random_statistics(bn, rng):
    size = bn.group.size
    for var, value in [(bn.gamma, rng.uniform(0.5, 1.5, size)), (bn.beta, rng.normal(0, 0.1, size)),
                       (bn.moving_mean, rng.normal(0, 0.3, size)), (bn.moving_variance, rng.uniform(0.5, 1.5, size))]:
        var.assign(np.reshape(value, var.shape).astype(np.float32))
    return [v.numpy().reshape(-1) for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)]


@pytest.mark.parametrize("masked, path", [(False, "bn"), (False, "folded"), (True, "bn"), (True, "folded"),
                                          (True, "folded_compact")])
def test_inference_bn_after_a_traced_conv_is_the_affine_map_of_its_moving_statistics(masked, path):
    # Inference BN is either the fused kernel, which grappler folds into the convolution, or
    # folded by `conv_bn` into the kernel and bias (so that a residual add and ReLU fuse too);
    # either way the output must stay (conv(x) - mean) / sqrt(var + eps) * gamma + beta.
    from nets.groups import ChannelGroup, MaskOptions
    from nets.layers import BatchNorm, Conv2d, conv_bn

    options = MaskOptions() if masked else None
    rgb, out = ChannelGroup("rgb", 3, prunable=False, masked=False), ChannelGroup("out", 6, masked=masked)
    conv = Conv2d("conv", rgb, out, 3, (8, 8), options=options)
    bn = BatchNorm("bn", out, (8, 8), options=options)
    rng = np.random.default_rng(0)
    mean, var, gamma, beta = _bn_with_random_statistics(bn, rng)
    kept = np.array([0, 2, 3, 5]) if masked else np.arange(6)
    if masked:
        out.keep(kept)
        options.set(compact=path == "folded_compact")
    x = tf.constant(rng.normal(size=(4, 8, 8, 3)), tf.float32)
    shortcut = tf.constant(rng.normal(size=(4, 8, 8, len(kept) if path == "folded_compact" else 6)), tf.float32)
    if path == "bn":
        forward = lambda x: tf.nn.relu(bn(conv(x), training=False) + shortcut)  # noqa: E731
    else:
        forward = lambda x: tf.nn.relu(conv_bn(conv, bn, x, training=False) + shortcut)  # noqa: E731
    got = tf.function(forward)(x).numpy()
    z = tf.nn.conv2d(x, conv.kernel, 1, "SAME").numpy()
    affine = (z - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
    dropped = np.setdiff1d(np.arange(6), kept)
    affine[..., dropped] = 0.0  # masked channels: zero kernel column, gamma and beta
    if path == "folded_compact":
        affine = affine[..., kept]
    np.testing.assert_allclose(got, np.maximum(affine + shortcut.numpy(), 0), rtol=1e-4, atol=1e-5)


def test_folded_depthwise_bn_equals_bn_after_the_depthwise_conv():
    from nets.groups import ChannelGroup, MaskOptions
    from nets.layers import BatchNorm, DepthwiseConv2d, conv_bn

    group = ChannelGroup("g", 5, masked=True)
    options = MaskOptions()
    dw = DepthwiseConv2d("dw", group, 3, (6, 6), strides=2, options=options)
    bn = BatchNorm("bn", group, dw.out_hw, options=options)
    rng = np.random.default_rng(1)
    _bn_with_random_statistics(bn, rng)
    group.keep([1, 2, 4])
    x = tf.constant(rng.normal(size=(2, 6, 6, 5)), tf.float32)
    np.testing.assert_allclose(conv_bn(dw, bn, x, training=False).numpy(), bn(dw(x), training=False).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv_bn(dw, bn, x, training=True).numpy(), bn(dw(x), training=True).numpy(),
                               rtol=1e-5, atol=1e-5)
