"""Channel importance: a score per channel of every prunable group (higher = keep).

One interface, `importance(net) -> {group key: scores}`, where the pruning criteria plug in:

* `filter_l1`: the summed L1 norms of the filters of every conv writing into a group (a
  residual stream sums over all its writers); uniform L1 pruning keeps the largest.
* `compactor_norms`: the L2 norm of each row of a group's ResRep compactor.
* `taylor(images, labels, loss)`: EKG's first-order Taylor score `|sum(dy * y)|` at every
  site where the group's activations are final (`op_utils.taps`), summed over the batches.
  EKG's search computes the same quantity chunk by chunk from cached segment inputs
  (`codebase/methods/ekg/search.py`); this one-tape version is its reference.

`keep_top(scores, widths)` turns scores and widths into the kept channel indices.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nets.layers import Conv2d
from op_utils.taps import score_tap


def filter_l1(net) -> dict:
    """Per group, the summed L1 norms of the filters of every conv writing into it."""
    scores = {k: np.zeros(g.size) for k, g in net.prunable_groups().items()}
    for layer in net.layers.values():
        if isinstance(layer, Conv2d) and layer.out_group.key in scores:
            scores[layer.out_group.key] += np.abs(layer.kernel.numpy()).sum(axis=(0, 1, 2))
    return scores


def compactor_norms(net) -> dict:
    """Per compacted group, the L2 norm of every row of its compactor."""
    return {key: compactor.row_norms() for key, compactor in net.compactors.items()}


def taylor(images, labels, loss=None, batch_size: int = 256):
    """The importance `|sum_{n,h,w} dL/dy * y|` per channel, summed over every final site of a
    group and over the batches (the net's current masks and mode apply; training mode).

    Args:
        images, labels: numpy arrays of the data the score is measured on.
        loss: `loss(logits, labels) -> [b]` (default: cross-entropy), summed and divided by
            the first batch's size (EKG's convention).
    """
    def measure(net) -> dict:
        groups = net.prunable_groups()
        probes = {k: tf.Variable(tf.zeros([g.size]), trainable=False) for k, g in groups.items()}

        def tap(site, x):
            if not site.final or site.group.key not in probes:
                return x
            probe = probes[site.group.key]
            return score_tap(x, tf.gather(probe, site.group.kept_index()) if net.options and net.options.compact
                             and site.group.masked else probe)

        totals = {k: np.zeros(g.size) for k, g in groups.items()}
        size = float(min(batch_size, len(labels)))
        for begin in range(0, len(labels), batch_size):
            x = tf.constant(images[begin:begin + batch_size])
            y = tf.constant(labels[begin:begin + batch_size], tf.int32)
            with tf.GradientTape() as tape:
                tape.watch(list(probes.values()))
                logits = net(x, training=True, tap=tap)
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits) if loss is None \
                    else loss(logits, y)
                value = tf.reduce_sum(per_example) / size
            for key, grad in zip(probes, tape.gradient(value, list(probes.values()))):
                totals[key] += tf.convert_to_tensor(grad).numpy()
        return totals

    return measure


def keep_top(scores: dict, widths: dict) -> dict:
    """`{group: indices of its widths[group] highest-scored channels}` (ties broken by index)."""
    return {k: np.argsort(-np.asarray(scores[k], np.float64), kind="stable")[:widths[k]] for k in widths}
