"""Fake quantizers against numpy references: forward values, straight-through and centre gradients,
activation ranges in training and inference, and the one-line errors of bad settings."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from nets.layers import ForwardState
from nets.quantizers import ActivationQuantizer, NonUniformQuantizer, UniformQuantizer
from tests.support.nets import randomise
from utils.errors import ConfigError

KERNEL = "BasicBlock0.0/conv1"


def _net_with(quantizer, seed=0):
    net = nets.build("ResNet-8", masked=False, input_size=8)
    randomise(net, seed=seed)
    net.attach(quantizer, [f"{KERNEL}/kernel"])
    return net, net.layers[KERNEL].kernel


def _reference_buckets(w, buckets, size=256):
    """numpy: PocketFlow's bucket layouts as `[n_buckets, n]` (and the inverse)."""
    if buckets == "none":
        return w.reshape([1, -1]), lambda b: b.reshape(w.shape)
    if buckets == "channel":  # one bucket per output channel (HWIO: the last axis)
        moved = np.moveaxis(w, -1, 0)
        return moved.reshape([w.shape[-1], -1]), lambda b: np.moveaxis(b.reshape(moved.shape), 0, -1)
    flat = w.reshape([-1])
    count = -(-flat.size // size)
    padded = np.concatenate([flat, np.full(count * size - flat.size, flat[-1])])
    table = padded.reshape([size, count])  # bucket j = column j: every count-th value
    return table.T, lambda b: b.T.reshape([-1])[: flat.size].reshape(w.shape)


def _reference_uniform(w, bits, buckets, size=256):
    wb, back = _reference_buckets(np.asarray(w, np.float64), buckets, size)
    low, high = wb.min(1, keepdims=True), wb.max(1, keepdims=True)
    step = (high - low) / (2 ** bits - 1)
    return back(np.round((wb - low) / step) * step + low)


@pytest.mark.parametrize("bits,buckets", [(4, "none"), (2, "channel"), (3, "split"), (8, "none")])
def test_uniform_forward_matches_numpy_and_uses_2_to_the_bits_levels_per_bucket(bits, buckets):
    quantizer = UniformQuantizer(bits, buckets, bucket_size=32)
    net, kernel = _net_with(quantizer)
    w = kernel.numpy()
    q = net.layers[KERNEL].param("kernel").numpy()
    np.testing.assert_allclose(q, _reference_uniform(w, bits, buckets, 32), rtol=0, atol=1e-6)
    qb, _ = _reference_buckets(q, buckets, 32)
    assert max(len(np.unique(row)) for row in qb) <= 2 ** bits
    assert np.abs(q - w).max() <= (w.max() - w.min()) / (2 ** bits - 1) / 2 + 1e-6


def test_straight_through_gradient_is_the_identity():
    net, kernel = _net_with(UniformQuantizer(2, "channel"))
    upstream = tf.constant(np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(net.layers[KERNEL].param("kernel") * upstream)
    np.testing.assert_array_equal(tape.gradient(loss, kernel).numpy(), upstream.numpy())


@pytest.mark.parametrize("buckets", ["none", "channel", "split"])
def test_nonuniform_takes_the_nearest_centre_and_centres_get_the_sum_of_their_weights_gradients(buckets):
    quantizer = NonUniformQuantizer(2, buckets, bucket_size=64)
    net, kernel = _net_with(quantizer)
    rng = np.random.default_rng(2)
    quantizer.centres.assign(rng.uniform(0, 1, quantizer.centres.shape).astype(np.float32))  # unsorted on purpose
    w = kernel.numpy().astype(np.float64)
    wb, back = _reference_buckets(w, buckets, 64)
    low, high = wb.min(1, keepdims=True), wb.max(1, keepdims=True)
    centres = quantizer.centres.numpy().astype(np.float64)
    nearest = np.argmin(np.abs(((wb - low) / (high - low))[:, :, None] - centres[:, None, :]), axis=-1)
    expected = back(np.take_along_axis(centres, nearest, 1) * (high - low) + low)

    upstream = rng.normal(size=kernel.shape).astype(np.float32)
    with tf.GradientTape() as tape:
        q = net.layers[KERNEL].param("kernel")
        loss = tf.reduce_sum(q * upstream)
    grad_w, grad_c = tape.gradient(loss, [kernel, quantizer.centres])
    np.testing.assert_allclose(q.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(grad_w.numpy(), upstream)  # straight-through to the weights
    ub, _ = _reference_buckets(upstream.astype(np.float64), buckets, 64)
    sums = np.zeros_like(centres)
    for b in range(len(centres)):
        np.add.at(sums[b], nearest[b], ub[b])
    if buckets == "split":  # the padding repeats the last value: its gradient is not a weight's
        sums = None
    if sums is not None:
        np.testing.assert_allclose(grad_c.numpy(), sums * (high - low), rtol=1e-4, atol=1e-5)
    assert len(np.unique(q.numpy())) <= 4 * len(centres)


def test_nonuniform_quantile_initialisation_and_uniform_initialisation():
    q_init = NonUniformQuantizer(2, "none", init="quantile")
    _, kernel = _net_with(q_init)
    w = kernel.numpy().reshape([-1]).astype(np.float64)
    normalised = (w - w.min()) / (w.max() - w.min())
    np.testing.assert_allclose(q_init.centres.numpy()[0], np.quantile(normalised, [0.2, 0.4, 0.6, 0.8]), atol=1e-6)
    u_init = NonUniformQuantizer(2, "channel", init="uniform")
    _net_with(u_init)
    np.testing.assert_allclose(u_init.centres.numpy(), np.tile(np.linspace(0, 1, 4), [16, 1]), atol=1e-7)


def test_activation_quantizer_uses_the_batch_range_in_training_and_the_moving_range_in_inference():
    state = ForwardState()
    quantizer = ActivationQuantizer(state, bits=2, momentum=0.5)
    x = tf.constant([[0.0, 0.5, 1.4, 3.0]])
    np.testing.assert_array_equal(quantizer(x).numpy(), x.numpy())  # not calibrated yet: unchanged
    with state.mode(True):
        y = quantizer(x).numpy()
    np.testing.assert_allclose(y, [[0.0, 0.0, 1.0, 3.0]], atol=1e-6)  # levels 0, 1, 2, 3 over [0, 3]
    assert (quantizer.low.numpy(), quantizer.high.numpy()) == (0.0, 3.0)  # the first batch sets the range
    with state.mode(True):
        quantizer(tf.constant([[-1.0, 5.0]]))
    assert (quantizer.low.numpy(), quantizer.high.numpy()) == (-0.5, 4.0)  # moved halfway (momentum 0.5)
    # Inference: the moving range, the same whatever the batch holds.
    alone = quantizer(tf.constant([[1.2]])).numpy()
    together = quantizer(tf.constant([[1.2, 100.0, -100.0]])).numpy()
    assert alone[0, 0] == together[0, 0]
    levels = -0.5 + np.arange(4) * 1.5
    assert np.isclose(levels, alone[0, 0]).any() and together[0, 1] == 4.0 and together[0, 2] == -0.5


def test_activation_quantizer_passes_gradients_straight_through_inside_the_range():
    state = ForwardState()
    quantizer = ActivationQuantizer(state, bits=3)
    x = tf.constant([[0.0, 0.3, 0.9, 2.0]])
    with tf.GradientTape() as tape, state.mode(True):
        tape.watch(x)
        y = quantizer(x)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.ones([1, 4], np.float32))


@pytest.mark.parametrize("make,match", [
    (lambda: UniformQuantizer(0), r"--bits must be an integer in \[1, 16\], got 0"),
    (lambda: UniformQuantizer(17), r"--bits must be an integer in \[1, 16\], got 17"),
    (lambda: UniformQuantizer(4, "split", bucket_size=1), r"split needs a bucket size that is an integer >= 2"),
    (lambda: UniformQuantizer(4, "rows"), r"must be one of none, channel, split"),
    (lambda: NonUniformQuantizer(9), r"at most 8 bits"),
])
def test_bad_quantizer_settings_are_one_line_errors(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_split_buckets_refuse_slimming_and_every_quantizer_refuses_padding():
    net = nets.build("ResNet-8", masked=True, input_size=8)
    net.attach(UniformQuantizer(4, "split", bucket_size=16), [f"{KERNEL}/kernel"])
    with pytest.raises(ConfigError, match="cannot be slimmed .its buckets follow the full tensor's layout"):
        nets.slim(net)
    plain = nets.build("ResNet-8", masked=False, input_size=8)
    plain.attach(UniformQuantizer(4, "channel"), [f"{KERNEL}/kernel"])
    with pytest.raises(ConfigError, match="cannot be padded"):
        nets.pad_channels(plain, 8)
