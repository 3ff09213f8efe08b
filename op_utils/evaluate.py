"""Evaluation of a classifier over a dataset, on every replica, with no optimizer.

The model runs with ``training=False`` (BN moving statistics, nothing updated). Results are
sums over examples divided by their count, so a partial last batch (even one that leaves some
replicas empty) counts exactly. The step is traced once per dataset element structure, with an
open batch dimension, so the partial last batch does not trace it again; XLA (``xla=True``)
compiles the per-replica forward pass only, as in training.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from op_utils.task import inputs_labels
from op_utils.traced import instance_function
from utils.errors import DataError

_SUM = tf.distribute.ReduceOp.SUM


def topk_correct(logits: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
    """Per-example 1.0 where the label is among the ``k`` highest logits, else 0.0.

    An example counts as correct when fewer than ``k`` classes have a strictly higher
    logit than its label's (ties are resolved in the example's favour, as
    ``tf.math.in_top_k`` does). ``k`` is capped at the number of classes.

    Args:
        logits: ``[b, num_classes]``.
        labels: ``[b]`` integer class ids.
        k: How many top classes count.

    Returns:
        ``[b]`` float32.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    target = tf.gather(logits, labels, axis=1, batch_dims=1)
    higher = tf.reduce_sum(tf.cast(logits > target[:, None], tf.int32), axis=1)
    return tf.cast(higher < k, tf.float32)


class Evaluator:
    """Top-1, top-5 and cross-entropy of ``model`` on datasets of ``(images, labels, ...)``.

    Args:
        strategy: The strategy the model was built under.
        model: ``model(x, training=False) -> logits``.
        xla: Compile the per-replica forward pass with XLA.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model, xla: bool = False) -> None:
        self.strategy = strategy
        self.model = model
        self._forward_fn = instance_function(self._forward, jit_compile=bool(xla))
        self._steps: dict[str, tf.types.experimental.GenericFunction] = {}
        self.trace_count = 0  # traces of the distributed step (tests assert one per structure)

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """``{"top1", "top5", "loss", "count"}`` over every example of ``dataset``.

        Raises:
            DataError: If the dataset is empty.
        """
        dist = self.strategy.experimental_distribute_dataset(dataset)
        spec = dist.element_spec
        key = repr(spec)
        if key not in self._steps:
            self._steps[key] = instance_function(self._eval_step, input_signature=[spec])
        step = self._steps[key]
        totals = np.zeros(4, np.float64)
        for dist_batch in dist:
            totals += step(dist_batch).numpy()
        loss, top1, top5, count = totals
        if not count:
            raise DataError("the evaluation dataset is empty")
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "count": int(count)}

    def _forward(self, inputs):
        return self.model(inputs, training=False)

    def _eval_step(self, dist_batch):
        self.trace_count += 1
        sums = self.strategy.run(self._replica_eval, args=(dist_batch,))
        return self.strategy.reduce(_SUM, sums, axis=None)

    def _replica_eval(self, batch):
        inputs, labels = inputs_labels(batch)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        # A partial last batch can leave a replica no examples. Its net is not run then: on some
        # CPUs (TF 2.21, AVX-512) the oneDNN convolution returns an empty batch in its *input's*
        # shape, and the next layer fails on the channel count.
        return tf.cond(tf.size(labels) > 0, lambda: self._eval_sums(inputs, labels),
                       lambda: tf.zeros([4], tf.float64))

    def _eval_sums(self, inputs, labels):
        logits = tf.cast(self._forward_fn(inputs), tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.stack([
            tf.reduce_sum(tf.cast(loss, tf.float64)),
            tf.reduce_sum(tf.cast(topk_correct(logits, labels, 1), tf.float64)),
            tf.reduce_sum(tf.cast(topk_correct(logits, labels, 5), tf.float64)),
            tf.cast(tf.shape(labels)[0], tf.float64),
        ])
