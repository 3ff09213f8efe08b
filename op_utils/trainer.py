"""The train step and evaluation: a model, an optimizer and a strategy wired together.

Where XLA goes (measured on TF 2.21 with 2 replicas): only on the per-replica
loss-and-gradient function. An XLA cluster that contains the all-reduce or the optimizer
update, or that wraps ``strategy.run``, fails with "Trying to access resource ... located
in device CPU:1 from device CPU:0". So one train step is::

    tf.function  train step (cross-replica context)
      strategy.run(replica_step)                  # once per replica
        grad_fn(batch)         tf.function(jit_compile=xla): micro-batch loop,
                               loss, gradients and metric sums of this replica
        all-reduce (sum)       gradients and metric sums, outside XLA
        grad_transform         optional, on the summed gradients
        optimizer.apply        merge_call -> per-device update, outside XLA
      global step and running metrics updated

Losses are summed over examples and divided by the GLOBAL batch size, so the gradients
summed across replicas (and across micro-batches) equal the gradient of the mean loss
over the global batch: the result does not depend on the number of replicas or on
``accum`` for a network without batch statistics.

The trainer knows nothing about networks or compression methods: those come in through
``loss_fn`` (what is minimised and logged) and ``grad_transform`` (how the summed
gradients are changed before the update).

Batches are ``(inputs, labels, *anything)`` tuples; ``labels`` (int class ids) are used
for the accuracy. Every tensor in a training batch must have the per-replica batch size
as its leading dimension (use ``drop_remainder=True``).
"""
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from utils.errors import ConfigError, DataError

LossFn = Callable[[tf.Module, Any, bool], tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]]
GradTransform = Callable[[list[tf.Tensor], Sequence[tf.Variable]], list[tf.Tensor]]

_SUM = tf.distribute.ReduceOp.SUM


def _inputs_labels(batch) -> tuple[Any, tf.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"a batch must be an (inputs, labels, ...) tuple, got {type(batch).__name__}"
    )


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


def softmax_cross_entropy(model: tf.Module, batch, training: bool):
    """The default ``loss_fn``: softmax cross-entropy of ``model(inputs)`` against labels.

    Args:
        model: Called as ``model(inputs, training=training)`` and returning logits.
        batch: ``(inputs, labels, ...)``.
        training: Passed to the model.

    Returns:
        ``(per_example_loss [b], logits [b, C], extras {})``.
    """
    inputs, labels = _inputs_labels(batch)
    logits = model(inputs, training=training)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(tf.reshape(labels, [-1]), tf.int32), logits=tf.cast(logits, tf.float32)
    )
    return loss, logits, {}


class Trainer:
    """Owns the strategy, model, optimizer, step counters, metrics and checkpoint.

    Build the model inside ``strategy.scope()`` first; the trainer builds the optimizer's
    slots and its own variables in that scope.

    Gradient accumulation: each replica's batch is reshaped to ``[accum, b / accum, ...]``
    and a ``tf.while_loop`` inside the compiled gradient function runs the model on one
    micro-batch at a time, summing losses and gradients, so the activation memory is that
    of one micro-batch. For a network without batch statistics the update equals one step
    on the whole batch. BatchNorm, however, normalises with the statistics of each
    micro-batch (and updates its moving statistics once per micro-batch), exactly as in
    the EKG reference.

    Args:
        strategy: The strategy the model was built under.
        model: A ``tf.Module`` with ``__call__(x, training=False) -> logits`` and
            ``trainable_variables``; BN moving statistics as ON_READ/MEAN variables.
        optimizer: An unbuilt ``op_utils.optim.Optimizer``; it is built over the model's
            trainable variables here.
        global_batch_size: Examples per step summed over all replicas.
        accum: Micro-batches per replica batch.
        loss_fn: ``loss_fn(model, batch, training) -> (per_example_loss [b], logits [b, C],
            extras)``. ``extras`` maps names to per-example ``[b]`` tensors (reported as
            their mean over the global batch) or scalars (reported as their mean over
            micro-batches and replicas); they are logged, not minimised. Runs inside the
            XLA cluster when ``xla`` is on.
        grad_transform: Optional ``(grads, variables) -> grads`` applied to the gradients
            summed over replicas, before the optimizer (and before its weight decay). It
            is traced into the step and runs on every replica, on the same summed values,
            outside XLA; it may read variables (e.g. masks) but must not assign them.
        xla: Compile the per-replica gradient (and evaluation forward) with XLA.
        rng: Optional ``tf.random.Generator`` used by the loss or model; its state is then
            saved in checkpoints.

    Raises:
        ConfigError: If the batch does not split into replicas and micro-batches, or the
            model was not built in ``strategy.scope()``.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model: tf.Module,
        optimizer,
        *,
        global_batch_size: int,
        accum: int = 1,
        loss_fn: LossFn = softmax_cross_entropy,
        grad_transform: GradTransform | None = None,
        xla: bool = False,
        rng: tf.random.Generator | None = None,
    ) -> None:
        replicas = strategy.num_replicas_in_sync
        for name, value in (("batch size", global_batch_size), ("accum", accum)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if global_batch_size % replicas or (global_batch_size // replicas) % accum:
            raise ConfigError(
                f"batch size {global_batch_size} must split evenly into {replicas} replica(s) "
                f"x {accum} micro-batch(es) (accum); use a multiple of {replicas * accum}"
            )
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.global_batch_size = int(global_batch_size)
        self.per_replica_batch_size = self.global_batch_size // replicas
        self.accum = int(accum)
        self.loss_fn = loss_fn
        self.grad_transform = grad_transform
        self.xla = bool(xla)
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ConfigError("the model has no trainable variables")
        foreign = [v.name for v in self.variables
                   if not strategy.extended.variable_created_in_scope(v)]
        if foreign:
            raise ConfigError(
                f"model variables {foreign[:3]} were not created in strategy.scope(); "
                "build the model inside the strategy's scope"
            )

        counter = dict(dtype=tf.int64, trainable=False,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        total = dict(dtype=tf.float64, trainable=False,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        with strategy.scope():
            optimizer.build(self.variables)
            self.global_step = tf.Variable(0, name="global_step", **counter)
            # The data position, for exact resumption: the epoch being trained and how
            # many of its steps are done. The loop keeps them current.
            self.epoch = tf.Variable(0, name="epoch", **counter)
            self.step_in_epoch = tf.Variable(0, name="step_in_epoch", **counter)
            # Running sums over the current epoch; checkpointed so that a resumed epoch
            # reports the same means as an uninterrupted one.
            self.loss_sum = tf.Variable(0.0, name="loss_sum", **total)
            self.correct_sum = tf.Variable(0.0, name="correct_sum", **total)
            self.example_count = tf.Variable(0.0, name="example_count", **total)

        parts = dict(model=model, optimizer=optimizer, global_step=self.global_step,
                     epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                     loss_sum=self.loss_sum, correct_sum=self.correct_sum,
                     example_count=self.example_count)
        if rng is not None:
            parts["rng"] = rng
        self.checkpoint = tf.train.Checkpoint(**parts)

        # Incremented in the Python body of the gradient function, i.e. once per trace:
        # tests assert one trace per replica and none across steps.
        self.grad_trace_count = 0
        self._extra_kinds: dict[str, str] = {}
        self._grad_fn = tf.function(self._grads, jit_compile=self.xla)
        self._train_fn = tf.function(self._train_step)
        self._forward_fn = tf.function(self._forward, jit_compile=self.xla)
        self._eval_fn = tf.function(self._eval_step)

    # -- training --------------------------------------------------------------------------

    def train_step(self, dist_batch) -> dict[str, tf.Tensor]:
        """Runs one optimizer step on a distributed batch.

        Args:
            dist_batch: One element of a dataset distributed with this trainer's strategy
                (``experimental_distribute_dataset`` of a globally batched dataset, or
                ``distribute_datasets_from_function`` of per-replica batches).

        Returns:
            Scalar tensors of this step: ``loss`` (mean over the global batch), ``top1``,
            ``grad_norm`` (global norm of the summed gradients, before ``grad_transform``)
            and the loss function's extras. Not checked for NaN here; the loop does that.
        """
        return self._train_fn(dist_batch)

    def _train_step(self, dist_batch):
        out = self.strategy.run(self._replica_step, args=(dist_batch,))
        # Every replica returns the same all-reduced sums; take the local first copy.
        out = tf.nest.map_structure(
            lambda v: self.strategy.experimental_local_results(v)[0], out)
        sums, extras, grad_norm = out
        self.global_step.assign_add(1)
        self.loss_sum.assign_add(tf.cast(sums[0], tf.float64))
        self.correct_sum.assign_add(tf.cast(sums[1], tf.float64))
        self.example_count.assign_add(tf.cast(sums[2], tf.float64))
        logs = {"loss": sums[0] / sums[2], "top1": sums[1] / sums[2], "grad_norm": grad_norm}
        for key, value in extras.items():
            if self._extra_kinds[key] == "example":
                logs[key] = value / sums[2]
            else:
                logs[key] = value / float(self.accum * self.strategy.num_replicas_in_sync)
        return logs

    def _replica_step(self, batch):
        grads, sums, extras = self._grad_fn(batch)
        context = tf.distribute.get_replica_context()
        # One batched all-reduce for gradients and metric sums, outside the XLA cluster.
        grads, sums, extras = context.all_reduce(_SUM, (grads, sums, extras))
        # Logged, and checked by the loop: a NaN or inf weight does not always reach the loss
        # (oneDNN's fused ReLU turns NaN into 0 on some CPUs), but it reaches the gradients.
        grad_norm = tf.linalg.global_norm(grads)
        if self.grad_transform is not None:
            grads = list(self.grad_transform(list(grads), self.variables))
            if len(grads) != len(self.variables):
                raise ConfigError(
                    f"grad_transform returned {len(grads)} gradients for "
                    f"{len(self.variables)} variables"
                )
        self.optimizer.apply(zip(grads, self.variables, strict=True))
        return sums, extras, grad_norm

    def _grads(self, batch):
        """Loss, gradients and metric sums of one replica's batch (compiled with XLA)."""
        self.grad_trace_count += 1
        if self.accum == 1:
            return self._micro_step(batch)
        micro = tf.nest.map_structure(self._split, batch)
        take = lambda i: tf.nest.map_structure(lambda t: t[i], micro)  # noqa: E731
        # One micro-step traced as a function: its outputs' signature gives the zeros the
        # sums start from (the extras' names are only known after a call), and the loop
        # body calls it, so the model appears once in the graph that XLA compiles.
        micro_step = tf.function(self._micro_step).get_concrete_function(take(0))
        zeros = tf.nest.map_structure(lambda t: tf.zeros(t.shape, t.dtype),
                                      micro_step.structured_outputs)

        def body(i, total):
            return i + 1, tf.nest.map_structure(tf.add, total, micro_step(take(i)))

        _, total = tf.while_loop(lambda i, _: i < self.accum, body, (tf.constant(0), zeros))
        return total

    def _split(self, t: tf.Tensor) -> tf.Tensor:
        t = tf.convert_to_tensor(t)
        size = t.shape[0] if t.shape.rank else None
        if size is not None and size != self.per_replica_batch_size:
            raise ConfigError(
                f"a training batch has leading dimension {size}, expected the per-replica "
                f"batch size {self.per_replica_batch_size}"
            )
        mb = self.per_replica_batch_size // self.accum
        return tf.reshape(t, tf.concat([[self.accum, mb], tf.shape(t)[1:]], axis=0))

    def _micro_step(self, batch):
        with tf.GradientTape() as tape:
            per_example, logits, extras = self.loss_fn(self.model, batch, True)
            per_example = tf.cast(per_example, tf.float32)
            loss = tf.reduce_sum(per_example) / float(self.global_batch_size)
        grads = tape.gradient(loss, self.variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                 for g, v in zip(grads, self.variables, strict=True)]
        _, labels = _inputs_labels(batch)
        count = tf.cast(tf.shape(per_example)[0], tf.float32)
        sums = tf.stack([tf.reduce_sum(per_example),
                         tf.reduce_sum(topk_correct(logits, labels, 1)), count])
        return grads, sums, self._reduce_extras(extras or {})

    def _reduce_extras(self, extras: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        reduced = {}
        for key, value in extras.items():
            value = tf.cast(value, tf.float32)
            if value.shape.rank == 0:
                self._extra_kinds[key] = "scalar"
                reduced[key] = value
            elif value.shape.rank == 1:
                self._extra_kinds[key] = "example"
                reduced[key] = tf.reduce_sum(value)
            else:
                raise ConfigError(
                    f"loss extra {key!r} must be a scalar or per-example [b], got shape "
                    f"{value.shape}"
                )
        return reduced

    # -- running metrics -------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Mean loss and top-1 accuracy over the steps of the current epoch so far."""
        count = float(self.example_count.numpy())
        if not count:
            return {"loss": float("nan"), "top1": float("nan")}
        return {"loss": float(self.loss_sum.numpy()) / count,
                "top1": float(self.correct_sum.numpy()) / count}

    def reset_metrics(self) -> None:
        """Starts a new epoch's running means."""
        for var in (self.loss_sum, self.correct_sum, self.example_count):
            var.assign(tf.zeros_like(var))

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Top-1, top-5 and cross-entropy over every example of ``dataset``.

        The model runs with ``training=False`` (BN moving statistics, nothing updated).
        Results are sums over examples divided by their count, so a partial last batch
        (even one that leaves some replicas empty) counts exactly.

        Args:
            dataset: A plain dataset of ``(images, labels, ...)`` batches of any size.

        Returns:
            ``{"top1", "top5", "loss", "count"}``.

        Raises:
            DataError: If the dataset is empty.
        """
        dist = self.strategy.experimental_distribute_dataset(dataset)
        totals = np.zeros(4, np.float64)
        for dist_batch in dist:
            totals += self._eval_fn(dist_batch).numpy()
        loss, top1, top5, count = totals
        if not count:
            raise DataError("the evaluation dataset is empty")
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count,
                "count": int(count)}

    def _forward(self, inputs):
        return self.model(inputs, training=False)

    def _eval_step(self, dist_batch):
        sums = self.strategy.run(self._replica_eval, args=(dist_batch,))
        return self.strategy.reduce(_SUM, sums, axis=None)

    def _replica_eval(self, batch):
        inputs, labels = _inputs_labels(batch)
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
