"""Score taps: the identity forward and EKG's first-order Taylor score as the probe's gradient."""

import numpy as np
import pytest
import tensorflow as tf

from op_utils.taps import score_tap


def test_score_tap_is_identity_with_taylor_gradient():
    rng = np.random.default_rng(0)
    y = tf.constant(rng.normal(size=(4, 3, 3, 5)), tf.float32)
    w = tf.constant(rng.normal(size=(4, 3, 3, 5)), tf.float32)
    probe = tf.zeros([5])

    def loss(t):
        return tf.reduce_sum(w * t) + 0.01 * tf.reduce_sum(t ** 2)

    with tf.GradientTape() as tape:
        tape.watch(probe)
        out = score_tap(y, probe)
        value = loss(out)
    np.testing.assert_array_equal(out, y)
    score = tape.gradient(value, probe).numpy()
    # The score is |first-order change of the loss when the channel is zeroed|.
    for c in range(5):
        zeroed = y.numpy().copy()
        zeroed[..., c] = 0
        change = float(loss(y) - loss(tf.constant(zeroed)))
        quadratic = 0.01 * float(tf.reduce_sum(y[..., c] ** 2))
        assert score[c] == pytest.approx(abs(change + quadratic), rel=1e-4)
