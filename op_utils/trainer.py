"""The train step: a task, an optimizer and a strategy wired together.

Where XLA goes (measured on TF 2.21 with 2 replicas): only on the per-replica
loss-and-gradient function. An XLA cluster that contains the all-reduce or the optimizer
update, or that wraps ``strategy.run``, fails with "Trying to access resource ... located
in device CPU:1 from device CPU:0". So one train step is::

    tf.function  train step (cross-replica context)
      strategy.run(replica_step)                  # once per replica
        grad_fn(batch)         tf.function(jit_compile=xla): micro-batch loop,
                               loss, gradients and metric sums of this replica
        all-reduce (sum)       gradients and metric sums, outside XLA
        task.transform_grads   on the summed gradients
        optimizer.apply        merge_call -> per-device update, outside XLA
      global step and running metrics updated

Losses are summed over examples and divided by the GLOBAL batch size, so the gradients
summed across replicas (and across micro-batches) equal the gradient of the mean loss
over the global batch: the result does not depend on the number of replicas or on
``accum`` for a network without batch statistics.

The trainer knows nothing about networks or compression methods: those come in through
the ``Task`` (``op_utils.task``): which variables are trained, the loss, what is
checkpointed, the gradient transform and per-variable optimizer overrides. A variable of
``task.variables_to_train()`` that the loss does not reach (its gradient is None) gets no
update at all that step: no weight decay, no momentum.

Every tensor in a training batch must have the per-replica batch size as its leading
dimension (use ``drop_remainder=True``).
"""
import tensorflow as tf

from op_utils.evaluate import Evaluator, topk_correct
from op_utils.task import Task
from op_utils.traced import instance_function
from utils.errors import ConfigError

_SUM = tf.distribute.ReduceOp.SUM
_RESERVED = ("optimizer", "global_step", "epoch", "step_in_epoch", "loss_sum", "correct_sum", "example_count")


class Trainer:
    """Owns the strategy, task, optimizer, step counters, metrics and checkpoint.

    Build the task's variables inside ``strategy.scope()`` first; the trainer builds the
    optimizer's slots and its own variables in that scope.

    Gradient accumulation: each replica's batch is reshaped to ``[accum, b / accum, ...]``
    and a ``tf.while_loop`` inside the compiled gradient function runs the task's loss on
    one micro-batch at a time, summing losses and gradients, so the activation memory is
    that of one micro-batch. For a network without batch statistics the update equals one
    step on the whole batch. BatchNorm, however, normalises with the statistics of each
    micro-batch (and updates its moving statistics once per micro-batch), exactly as in
    the EKG reference.

    Args:
        strategy: The strategy the task's variables were built under.
        task: What is trained (``op_utils.task.Task``; ``Classify(model)`` for a classifier).
            Its loss runs inside the XLA cluster when ``xla`` is on; its gradient transform
            runs on every replica, on the same summed values, outside XLA, and may read
            variables (e.g. masks) but must not assign them.
        optimizer: An unbuilt ``op_utils.optim.Optimizer``; it is built over the task's
            variables here, with the task's overrides.
        global_batch_size: Examples per step summed over all replicas.
        accum: Micro-batches per replica batch.
        xla: Compile the per-replica gradient (and evaluation forward) with XLA.
        rng: Optional ``tf.random.Generator`` used by the loss or model; its state is then
            saved in checkpoints.

    Raises:
        ConfigError: If the batch does not split into replicas and micro-batches, the task
            has nothing to train, or its variables were not built in ``strategy.scope()``.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        task: Task,
        optimizer,
        *,
        global_batch_size: int,
        accum: int = 1,
        xla: bool = False,
        rng: tf.random.Generator | None = None,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigError(f"the trainer needs an op_utils.task.Task (e.g. Classify(model)), got "
                              f"{type(task).__name__}")
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
        self.task = task
        self.model = task.eval_model
        self.optimizer = optimizer
        self.global_batch_size = int(global_batch_size)
        self.per_replica_batch_size = self.global_batch_size // replicas
        self.accum = int(accum)
        self.xla = bool(xla)
        self.variables = list(task.variables_to_train())
        if not self.variables:
            raise ConfigError("the task has no variables to train")
        foreign = [v.name for v in self.variables
                   if not strategy.extended.variable_created_in_scope(v)]
        if foreign:
            raise ConfigError(
                f"variables {foreign[:3]} were not created in strategy.scope(); "
                "build the model inside the strategy's scope"
            )

        counter = dict(dtype=tf.int64, trainable=False,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        total = dict(dtype=tf.float64, trainable=False,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        with strategy.scope():
            optimizer.build(self.variables, overrides=task.optimizer_overrides, masks=task.update_mask)
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

        items = dict(task.checkpoint_items())
        clash = sorted(set(items) & set(_RESERVED))
        if clash:
            raise ConfigError(f"the task checkpoints an item named {clash[0]!r}, which the trainer uses itself")
        parts = dict(items, optimizer=optimizer, global_step=self.global_step,
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
        self._connected: list[int] | None = None  # indices of the variables the loss reaches
        self.reports_top1 = True  # False when the task's loss gives no logits (known once traced)
        self._grad_fn = instance_function(self._grads, jit_compile=self.xla)
        self._train_fn = instance_function(self._train_step)
        self.evaluator = None if self.model is None else Evaluator(strategy, self.model, self.xla)

    # -- training --------------------------------------------------------------------------

    def train_step(self, dist_batch) -> dict[str, tf.Tensor]:
        """Runs one optimizer step on a distributed batch.

        Args:
            dist_batch: One element of a dataset distributed with this trainer's strategy
                (``experimental_distribute_dataset`` of a globally batched dataset, or
                ``distribute_datasets_from_function`` of per-replica batches).

        Returns:
            Scalar tensors of this step: ``loss`` (mean over the global batch), ``top1``
            (when the task gives logits), ``grad_norm`` (global norm of the summed
            gradients, before the task's transform) and the loss's extras. Not checked for
            NaN here; the loop does that.
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
        logs = {"loss": sums[0] / sums[2], "grad_norm": grad_norm}
        if self.reports_top1:
            logs["top1"] = sums[1] / sums[2]
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
        variables = [self.variables[i] for i in self._connected]
        grads = list(self.task.transform_grads(list(grads), variables))
        if len(grads) != len(variables):
            raise ConfigError(
                f"the task's transform_grads returned {len(grads)} gradients for {len(variables)} variables"
            )
        self.optimizer.apply(zip(grads, variables, strict=True))
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
        micro_step = tf.function(self._micro_step, autograph=False).get_concrete_function(take(0))
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
            out = self.task.loss(batch, True)
            per_example = tf.cast(out.per_example, tf.float32)
            loss = tf.reduce_sum(per_example) / float(self.global_batch_size)
        grads = tape.gradient(loss, self.variables)
        # Which variables the loss reaches is fixed by the graph: known at trace time, the
        # same on every replica. The others are left out of the all-reduce and the update.
        connected = [i for i, g in enumerate(grads) if g is not None]
        if self._connected is not None and connected != self._connected:
            raise ConfigError("the task's loss reaches different variables in different traces")
        if not connected:
            raise ConfigError("the task's loss reaches none of the variables it trains")
        self._connected = connected
        self.reports_top1 = out.logits is not None and out.labels is not None
        count = tf.cast(tf.shape(per_example)[0], tf.float32)
        correct = tf.reduce_sum(topk_correct(out.logits, out.labels, 1)) if self.reports_top1 \
            else tf.zeros([], tf.float32)
        sums = tf.stack([tf.reduce_sum(per_example), correct, count])
        return [tf.convert_to_tensor(grads[i]) for i in connected], sums, self._reduce_extras(dict(out.extras))

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
        """Mean loss (and top-1 accuracy, if the task reports it) over the current epoch so far."""
        count = float(self.example_count.numpy())
        out = {"loss": float(self.loss_sum.numpy()) / count if count else float("nan")}
        if self.reports_top1:
            out["top1"] = float(self.correct_sum.numpy()) / count if count else float("nan")
        return out

    def reset_metrics(self) -> None:
        """Starts a new epoch's running means."""
        for var in (self.loss_sum, self.correct_sum, self.example_count):
            var.assign(tf.zeros_like(var))

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Top-1, top-5 and cross-entropy of the task's ``eval_model`` (see ``op_utils.evaluate``).

        Raises:
            ConfigError: If the task has no model to evaluate.
            DataError: If the dataset is empty.
        """
        if self.evaluator is None:
            raise ConfigError(f"{type(self.task).__name__} has no model to evaluate")
        return self.evaluator.evaluate(dataset)

