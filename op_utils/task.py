"""Training tasks: what the engine trains, its loss, and what it checkpoints.

The engine (`op_utils.trainer.Trainer`) owns the strategy, XLA placement, accumulation, the
all-reduce, the optimizer update and exact resume; a `Task` owns everything about *what* is
trained (orbit's task/trainer split):

* `variables_to_train()`: the variables the optimizer updates. Nothing else gets an update:
  a frozen teacher, the net around a shunt, a net whose inputs are being optimised get no
  weight decay and no momentum, not even a zero step.
* `loss(batch, training)`: a `LossOut` with the per-example loss (summed and divided by the
  global batch by the engine), logged extras, and optionally logits and labels for top-1.
  It runs inside the per-replica XLA cluster when XLA is on.
* `eval_model`: the classifier `evaluate` runs (`model(x, training=False)`), or None.
* `checkpoint_items()`: the trackables saved with the optimizer and step counters.
* `transform_grads` / `optimizer_overrides`: how the summed gradients are changed before the
  update and which variables get their own hyperparameters (ResRep's compactors).
* `update_mask` / `after_step`: entries of a variable whose update is always zero (gradient and
  weight decay: pruned weights), and a host-side hook after every step that may change them and
  ask for the optimizer's slots to be reset (weight sparsification's mask updates).

`Classify` is the plain task: one classifier trained with softmax cross-entropy, or with any
`loss_fn(model, batch, training) -> (per_example, logits, extras)`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from utils.errors import ConfigError


class LossOut(NamedTuple):
    """What a task's loss returns for one (micro-)batch.

    Attributes:
        per_example: ``[b]`` losses; the engine sums them and divides by the global batch.
        extras: ``{name: [b] or scalar}`` logged beside the loss (per-example values are
            reported as their mean over the global batch, scalars as their mean over
            micro-batches and replicas), never minimised.
        logits: ``[b, classes]`` for the running top-1, or None.
        labels: ``[b]`` integer labels for the running top-1, or None.
    """

    per_example: tf.Tensor
    extras: Mapping[str, tf.Tensor] = {}
    logits: tf.Tensor | None = None
    labels: tf.Tensor | None = None


def inputs_labels(batch) -> tuple[Any, tf.Tensor]:
    """``(inputs, labels)`` of an ``(inputs, labels, ...)`` batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"a batch must be an (inputs, labels, ...) tuple, got {type(batch).__name__}"
    )


def softmax_cross_entropy(model: tf.Module, batch, training: bool):
    """The default loss of `Classify`: softmax cross-entropy of ``model(inputs)`` against labels.

    Returns:
        ``(per_example_loss [b], logits [b, C], extras {})``.
    """
    inputs, labels = inputs_labels(batch)
    logits = model(inputs, training=training)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(tf.reshape(labels, [-1]), tf.int32), logits=tf.cast(logits, tf.float32)
    )
    return loss, logits, {}


class Task(tf.Module):
    """Base class; see the module docstring. Subclasses implement `variables_to_train` and `loss`."""

    def variables_to_train(self) -> list[tf.Variable]:
        raise NotImplementedError

    def loss(self, batch, training: bool) -> LossOut:
        raise NotImplementedError

    @property
    def eval_model(self):
        """The classifier that evaluation runs, or None if the task has none."""
        return None

    def checkpoint_items(self) -> dict:
        """Trackables saved in the training checkpoint beside the optimizer and counters."""
        return {}

    def transform_grads(self, grads: list, variables: Sequence[tf.Variable]) -> list:
        """The summed gradients as the update uses them (default: unchanged)."""
        del variables
        return grads

    def optimizer_overrides(self, var: tf.Variable) -> Mapping[str, float] | None:
        """Hyperparameters of ``var`` that differ from the optimizer's (see `op_utils.optim`)."""
        del var
        return None

    def update_mask(self, var: tf.Variable) -> tf.Variable | None:
        """A 0/1 variable of ``var``'s shape multiplying its every update, or None (asked once)."""
        del var
        return None

    def after_step(self, step: int) -> bool:
        """Host-side hook after optimizer step ``step`` (1-based), before any checkpoint of it.

        It may assign variables (masks); return True to have the optimizer's slots reset.
        """
        del step
        return False


class Classify(Task):
    """Train one classifier ``model``.

    Args:
        model: ``model(x, training) -> logits``; a ``tf.Module``.
        loss_fn: ``loss_fn(model, batch, training) -> (per_example [b], logits, extras)``.
        grad_transform: Optional ``(grads, variables) -> grads`` on the summed gradients.
        overrides: Optional ``overrides(variable) -> {name: value} | None`` for the optimizer.
        variables: The variables to train (default: ``model.trainable_variables``).
        checkpoint: Extra trackables to checkpoint (e.g. a ``tf.random.Generator``).
    """

    def __init__(self, model, loss_fn: Callable = softmax_cross_entropy,
                 grad_transform: Callable | None = None, overrides: Callable | None = None,
                 variables: Sequence[tf.Variable] | None = None, checkpoint: Mapping | None = None):
        super().__init__(name="classify")
        self.model = model
        self.loss_fn = loss_fn
        self._grad_transform = grad_transform
        self._overrides = overrides
        self._variables = None if variables is None else list(variables)
        self._checkpoint = dict(checkpoint or {})

    def variables_to_train(self):
        return list(self.model.trainable_variables) if self._variables is None else list(self._variables)

    def loss(self, batch, training):
        per_example, logits, extras = self.loss_fn(self.model, batch, training)
        return LossOut(per_example, extras or {}, logits, inputs_labels(batch)[1])

    @property
    def eval_model(self):
        return self.model

    def checkpoint_items(self):
        return {"model": self.model, **self._checkpoint}

    def transform_grads(self, grads, variables):
        return grads if self._grad_transform is None else self._grad_transform(grads, variables)

    def optimizer_overrides(self, var):
        return None if self._overrides is None else self._overrides(var)
