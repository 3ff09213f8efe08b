"""Score taps: identity ops whose gradient measures each channel's importance.

`score_tap(x, probe)` returns `x` unchanged. Its gradient passes `dy` straight through to `x`
and gives `probe` (a zero vector with one entry per channel) the gradient
`|sum_{n,h,w} dy * x|`: the absolute first-order Taylor estimate of how much the loss would
change if the channel were zeroed (EKG's gate score). `tape.gradient(loss, probes)` sums it over
every tap of a probe in the forward pass, which is how a residual stream's group collects the
scores of all the places it is used. Masked channels are zero, so they always score 0.
"""

import tensorflow as tf


@tf.custom_gradient
def score_tap(x, probe):
    def grad(dy):
        axes = list(range(len(x.shape) - 1))
        score = tf.abs(tf.reduce_sum(dy * x, axis=axes))
        return dy, tf.reshape(score, tf.shape(probe))

    return tf.identity(x), grad
