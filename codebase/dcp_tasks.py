"""The training tasks of discrimination-aware channel pruning (`--method dcp`, `codebase.methods.dcp`).

* `AuxHead`: the discrimination head DCP adds after a conv: BN (batch statistics), ReLU, global
  average pooling, dense.
* `StageTune`: the block-wise fine-tuning of a stage: the final cross-entropy plus the stage
  head's, every variable of the net and of the head trained.
* `ChannelChoice`: the greedy choice of one group's channels, the layer-wise fine-tuning of its
  reading convs between two choices; `next_channels` is the greedy rule.

The heads exist only while pruning: they are not part of the pruned net, and are saved with the
pruning state so that a resumed pruning goes on with the same heads.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nets.sites import Record
from op_utils.task import LossOut, Task, inputs_labels

REC_LOSSES = ("sum", "mean")
_FIRST = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def next_channels(norms, chosen, count: int) -> np.ndarray:
    """The `count` channels not yet `chosen` with the largest gradient norms (PocketFlow's
    `argmax((norm + 1e-8) * not_chosen)`, repeated: a channel whose gradient is zero can still be
    chosen, never one chosen before; ties go to the lower index)."""
    open_ = np.asarray(chosen) == 0
    if count > int(open_.sum()):
        raise ValueError(f"cannot choose {count} more channels: {int(open_.sum())} are left")
    score = (np.asarray(norms, np.float64) + 1e-8) * open_
    return np.sort(np.argsort(-score, kind="stable")[:count])


def cross_entropy(labels, logits):
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=tf.cast(logits, tf.float32))


class AuxHead(tf.Module):
    """BN with batch statistics, ReLU, global average pooling and a dense layer on a conv's output
    (DCP's head; PocketFlow's `batch_normalization(training=True)` and `dense`). Build it in the
    strategy's scope. `seed` fixes the dense kernel's Glorot-uniform draw."""

    def __init__(self, channels: int, classes: int, seed: int, name: str = "head"):
        super().__init__(name=name)
        limit = float(np.sqrt(6.0 / (channels + classes)))
        kernel = tf.random.stateless_uniform([channels, classes], [seed, 7], -limit, limit)
        self.gamma = tf.Variable(tf.ones([channels]), name="gamma")
        self.beta = tf.Variable(tf.zeros([channels]), name="beta")
        self.kernel = tf.Variable(kernel, name="kernel")
        self.bias = tf.Variable(tf.zeros([classes]), name="bias")

    def __call__(self, x):
        x = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
        x = tf.nn.relu(tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, 1e-3))
        return tf.reduce_mean(x, axis=[1, 2]) @ self.kernel + self.bias

    def get_params(self) -> dict:
        return {name: getattr(self, name).numpy() for name in ("gamma", "beta", "kernel", "bias")}

    def set_params(self, params: dict) -> None:
        for name, value in params.items():
            getattr(self, name).assign(value)


class StageTune(Task):
    """Block-wise fine-tuning: `CE(final logits) + CE(head)` (the final one alone in the last stage,
    `head` None), every trainable variable of `net` and `head` trained. PocketFlow adds the final loss
    to itself in the last stage, which under Adam is the same update."""

    def __init__(self, net, head: AuxHead | None = None, site: str | None = None):
        super().__init__(name="dcp_stage")
        self.net, self.head, self.site = net, head, site

    def variables_to_train(self):
        head = list(self.head.trainable_variables) if self.head is not None else []
        return list(self.net.trainable_variables) + head

    def loss(self, batch, training):
        images, labels = inputs_labels(batch)
        record = Record({self.site}) if self.head is not None else None
        logits = self.net(images, training=training, tap=record)
        ce = cross_entropy(labels, logits)
        if self.head is None:
            return LossOut(ce, {}, logits, labels)
        head_ce = cross_entropy(labels, self.head(record.values[self.site]))
        return LossOut(ce + head_ce, {"ce": ce, "head_ce": head_ce}, logits, labels)

    @property
    def eval_model(self):
        return self.net

    def checkpoint_items(self):
        return {"model": self.net, **({"head": self.head} if self.head is not None else {})}


class _ChoiceState(tf.Module):
    def __init__(self, size: int, kernels: dict):
        super().__init__(name="dcp_choice")
        self.chosen = tf.Variable(tf.zeros([size]), name="chosen", **_FIRST)
        self.norms = tf.Variable(tf.zeros([size]), name="norms", **_FIRST)
        self.updates = {key: tf.Variable(tf.zeros(k.shape), name=f"update_{i}", **_FIRST)
                        for i, (key, k) in enumerate(kernels.items())}


class ChannelChoice(Task):
    """DCP's greedy choice of `keep` input channels of the group the convs `convs` read.

    The convs see every channel of the group; their kernels keep only the chosen input rows (the
    others are zeroed when a choice is made and get no update), so their outputs are those of the
    net pruned to the chosen channels. The loss is `rec_weight * sum_convs 1/2 ||Y - Y_full||^2`
    (the convs' outputs against the unpruned `full` net's, per example: summed over positions and
    channels for `rec_loss="sum"`, PocketFlow's `tf.nn.l2_loss`, which also sums over the batch, so
    `rec_weight` is then the global batch size; averaged for `"mean"`, the paper's normalisation)
    plus the stage's discrimination loss: its head's cross-entropy at `site`, or the final one when
    `head` is None. Only the reading kernels train.

    Steps (`total_steps`, `layer_steps` per choice): step 1 updates nothing; its gradient, at the
    weights the choice starts from, makes the first choice. Then every `layer_steps` steps (the
    layer-wise fine-tuning of the chosen rows) the gradient of the step makes the next: the `chunk`
    unchosen channels with the largest squared norm of the gradient over their kernel rows, summed
    over the convs (PocketFlow: one channel, 500 steps). The first fine-tuning thus has
    `layer_steps` updates, the last `layer_steps - 1`. Build it in the strategy's scope.
    """

    def __init__(self, net, full, convs, keep: int, head: AuxHead | None, site: str | None, chunk: int,
                 layer_steps: int, rec_loss: str, rec_weight: float):
        super().__init__(name="dcp_choice")
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"unknown reconstruction loss {rec_loss!r}; known: {', '.join(REC_LOSSES)}")
        self.net, self.full, self.convs = net, full, tuple(convs)
        self.head, self.site = head, site
        self.keep, self.chunk, self.rec_loss, self.rec_weight = int(keep), int(chunk), rec_loss, float(rec_weight)
        kernels = {key: net.layers[key].kernel for key in self.convs}
        size = net.layers[self.convs[0]].in_group.size
        self.state = _ChoiceState(size, kernels)
        self._update = {kernel.ref(): self.state.updates[key] for key, kernel in kernels.items()}
        choices = -(-self.keep // self.chunk)
        self.choice_steps = tuple(1 + i * int(layer_steps) for i in range(choices))
        self.total_steps = choices * int(layer_steps)

    def variables_to_train(self):
        return [self.net.layers[key].kernel for key in self.convs]

    def update_mask(self, var):
        return self._update.get(var.ref())

    def loss(self, batch, training):
        images, labels = inputs_labels(batch)
        outs = {f"{key}:out" for key in self.convs}
        target = Record(outs)
        self.full.forward_until(images, lambda: len(target.values) == len(outs), training=False, tap=target)
        wanted = outs | ({self.site} if self.head is not None else set())
        record = Record(wanted)
        if self.head is None:
            disc = cross_entropy(labels, self.net(images, training=training, tap=record))
        else:
            self.net.forward_until(images, lambda: len(record.values) == len(wanted), training=training, tap=record)
            disc = cross_entropy(labels, self.head(record.values[self.site]))
        reduce = tf.reduce_sum if self.rec_loss == "sum" else tf.reduce_mean
        rec = tf.add_n([0.5 * reduce(tf.square(tf.cast(record.values[name], tf.float32)
                                               - tf.stop_gradient(tf.cast(target.values[name], tf.float32))),
                                     axis=[1, 2, 3]) for name in sorted(outs)])
        return LossOut(self.rec_weight * rec + disc, {"rec": rec, "disc": disc})

    def transform_grads(self, grads, variables):
        norms = [tf.reduce_sum(tf.square(g), axis=[0, 1, 3]) for g, v in zip(grads, variables)
                 if v.ref() in self._update]
        self.state.norms.assign(tf.add_n(norms))
        return grads

    def after_step(self, step):
        if step not in self.choice_steps:
            return False
        chosen = self.state.chosen.numpy()
        count = min(self.chunk, self.keep - int(chosen.sum()))
        chosen[next_channels(self.state.norms.numpy(), chosen, count)] = 1.0
        self.state.chosen.assign(chosen)
        rows = chosen[None, None, :, None]
        for key in self.convs:
            kernel = self.net.layers[key].kernel
            kernel.assign(kernel * rows)
            self.state.updates[key].assign(np.broadcast_to(rows, kernel.shape).astype(np.float32))
        return False

    def chosen(self) -> np.ndarray:
        """The chosen channel indices, ascending."""
        return np.flatnonzero(self.state.chosen.numpy() > 0)

    @property
    def eval_model(self):
        return self.net

    def checkpoint_items(self):
        return {"model": self.net, "dcp_choice": self.state, **({"head": self.head} if self.head is not None else {})}
