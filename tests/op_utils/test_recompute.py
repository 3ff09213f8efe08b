"""op_utils.recompute: same values and gradients, the replay context around the second run only."""
import contextlib

import numpy as np
import pytest
import tensorflow as tf

from op_utils.recompute import recompute


class Link(tf.Module):
    """conv -> ReLU -> conv with a side effect counted per run (as BN's moving-statistics update)."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.k1 = tf.Variable(rng.normal(size=[3, 3, 2, 4]).astype(np.float32))
        self.k2 = tf.Variable(rng.normal(size=[3, 3, 4, 2]).astype(np.float32))
        self.runs = tf.Variable(0.0, trainable=False)
        self.replaying = False

    def __call__(self, x):
        if not self.replaying:
            self.runs.assign_add(1.0)
        h = tf.nn.relu(tf.nn.conv2d(x, self.k1, 1, "SAME"))
        return tf.nn.conv2d(h, self.k2, 1, "SAME")

    @contextlib.contextmanager
    def replay(self):
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False


def loss_and_grads(link, x, remat):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x
        for _ in range(3):  # a chain of links sharing the weights
            y = recompute(link, y, link.replay) if remat else link(y)
        loss = tf.reduce_sum(tf.sin(y))
    return [loss] + tape.gradient(loss, [x, link.k1, link.k2])


@pytest.mark.parametrize("traced", [False, True])
def test_values_and_gradients_equal_the_plain_backward_and_side_effects_run_once(traced):
    x = tf.constant(np.random.default_rng(1).normal(size=[2, 5, 5, 2]).astype(np.float32))
    plain_link, remat_link = Link(), Link()
    plain = loss_and_grads(plain_link, x, remat=False)
    run = tf.function(loss_and_grads, autograph=False) if traced else loss_and_grads
    got = run(remat_link, x, True)
    for a, b in zip(got, plain, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    assert float(remat_link.runs.numpy()) == float(plain_link.runs.numpy()) == 3.0
    assert not remat_link.replaying


def test_without_a_tape_it_is_the_function():
    link = Link()
    x = tf.ones([1, 4, 4, 2])
    np.testing.assert_array_equal(recompute(link, x).numpy(), Link()(x).numpy())
