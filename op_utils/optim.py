"""Small optimizers (SGD with momentum, Adam) as ``tf.Module``s with explicit slots.

Why our own: models here are plain ``tf.Module``s holding raw ``tf.Variable``s, and the
update must run under ``MirroredStrategy`` / ``MultiWorkerMirroredStrategy`` with XLA kept
off the update (see ``op_utils/trainer.py``). A hundred lines of update rules are easier
to check against a hand computation than Keras optimizer internals.

How an update is applied:

* ``build(variables)`` creates the step counter and one set of slots per variable. Call it
  inside ``strategy.scope()`` so the slots are mirrored like the variables they belong to.
* ``apply(grads_and_vars)`` expects gradients that are already summed over replicas. From
  a replica context it moves to the cross-replica context with ``merge_call``; there each
  variable is updated with ``strategy.extended.update``, which runs the update rule once
  per device on that device's copy of the variable and of its slots.
* Weight decay follows EKG: ``g <- g + weight_decay * w`` for every variable given to the
  optimizer (BN gamma/beta and biases included). It is added here, once, after the
  cross-replica sum, so it does not depend on the number of replicas (EKG divided it by
  the number of GPUs to undo the sum instead).
* ``overrides`` gives some variables their own hyperparameters (e.g. ResRep's compactors:
  momentum 0.99, no weight decay): a function of the variable, asked once in ``build``. The
  constructor takes one, and ``build`` another (the training task's, see ``op_utils.task``);
  where both name a hyperparameter of a variable, the one given to ``build`` wins.

Slots are stored in the order of the variables passed to ``build``; a checkpoint restores
into an optimizer built over the same model.
"""
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import tensorflow as tf

from utils.errors import ConfigError

LearningRate = float | Callable[[tf.Tensor], tf.Tensor]
GradsAndVars = Iterable[tuple[tf.Tensor, tf.Variable]]
Overrides = Callable[[tf.Variable], Mapping[str, float] | None]


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_decay(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ConfigError(f"weight_decay must be a number >= 0, got {value!r}")
    return float(value)


class Optimizer(tf.Module):
    """Base class: step counter, slots, learning rate and the distributed apply.

    Subclasses define ``_slot_names``, the hyperparameters a variable may override
    (``_hyper``, checked by ``_check_hyper``) and ``_update(var, grad, slots, lr, step, hyper)``,
    the rule for one device's copy of one variable.

    Args:
        learning_rate: A float, or a schedule called with the number of updates applied
            so far (an int64 tensor) and returning a scalar.
        weight_decay: L2 coefficient added to the gradient of every variable (>= 0).
        name: The module name.
        overrides: Optional ``overrides(variable) -> {name: value} or None``, asked once per
            variable in ``build``: that variable's own ``weight_decay`` and, for SGD,
            ``momentum``. Other names raise ConfigError.

    Raises:
        ConfigError: If an argument is out of range.
    """

    _slot_names: tuple[str, ...] = ()

    def __init__(self, learning_rate: LearningRate, weight_decay: float = 0.0,
                 name: str | None = None, overrides: Overrides | None = None) -> None:
        super().__init__(name=name)
        if not callable(learning_rate):
            if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real) \
                    or not learning_rate > 0:
                raise ConfigError(
                    f"learning_rate must be a positive number or a schedule, got {learning_rate!r}"
                )
            learning_rate = float(learning_rate)
        self.learning_rate = learning_rate
        self.weight_decay = _check_decay(weight_decay)
        self.overrides = overrides
        self.iterations = None
        self.slots: list[list[tf.Variable]] = []
        # Maps a variable (by reference) to its position in ``slots`` and ``_hypers``.
        # Values are ints and floats, so checkpoint tracking ignores these.
        self._index = {}
        self._hypers: list[dict[str, float]] = []
        self._masks: list = []  # per variable: its update mask or None
        self._build_overrides = None

    @property
    def _hyper(self) -> dict[str, float]:
        """The hyperparameters a variable may override, with the optimizer's values."""
        return {"weight_decay": self.weight_decay}

    def _check_hyper(self, hyper: dict[str, float]) -> dict[str, float]:
        return {**hyper, "weight_decay": _check_decay(hyper["weight_decay"])}

    def _slots_for(self, hyper: dict[str, float]) -> tuple[str, ...]:
        """The slots a variable with these hyperparameters needs."""
        del hyper
        return self._slot_names

    # -- set-up ----------------------------------------------------------------------------

    @property
    def built(self) -> bool:
        return self.iterations is not None

    def build(self, variables: Sequence[tf.Variable], overrides: Overrides | None = None,
              masks: Callable[[tf.Variable], tf.Variable | None] | None = None) -> None:
        """Creates the step counter and the slots of ``variables``.

        Must be called once, inside the scope of the strategy that owns the variables.
        ``overrides`` is asked after the constructor's (see the module docstring).
        ``masks(variable)`` may return a 0/1 variable of the variable's shape: its update
        (gradient and weight decay) is multiplied by it, so entries at 0 never change
        (weight sparsification's pruned weights).

        Raises:
            ConfigError: If already built, or if a variable is listed twice.
        """
        if self.built:
            raise ConfigError(f"optimizer {self.name!r} is already built")
        self._build_overrides = overrides
        strategy = tf.distribute.get_strategy()
        # ONLY_FIRST_REPLICA: the counter is updated in cross-replica context only, and
        # this aggregation makes any stray replica-context update well defined.
        self.iterations = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="iterations",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        for position, var in enumerate(variables):
            if var.ref() in self._index:
                raise ConfigError(f"variable {var.name} is listed twice")
            self._index[var.ref()] = position
            mask = masks(var) if masks is not None else None
            if mask is not None and tuple(mask.shape) != tuple(var.shape):
                raise ConfigError(f"the update mask of {var.name} has shape {tuple(mask.shape)}, expected "
                                  f"{tuple(var.shape)}")
            self._masks.append(mask)
            hyper = self._hyper_of(var)
            self._hypers.append(hyper)
            base = var.name.split(":")[0]
            with strategy.extended.colocate_vars_with(var):
                self.slots.append([
                    tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                                name=f"{base}/{slot}")
                    for slot in self._slots_for(hyper)
                ])

    def _hyper_of(self, var: tf.Variable) -> dict[str, float]:
        hyper = self._hyper
        changed = {}
        for overrides in (self.overrides, self._build_overrides):
            if overrides is not None:
                changed.update(overrides(var) or {})
        unknown = sorted(set(changed) - set(hyper))
        if unknown:
            raise ConfigError(f"{type(self).__name__} cannot override {unknown[0]!r} of {var.name}; "
                              f"known: {', '.join(hyper)}")
        return self._check_hyper({**hyper, **changed})

    # -- learning rate ---------------------------------------------------------------------

    def learning_rate_at(self, step) -> tf.Tensor:
        """The learning rate used by the update that follows ``step`` earlier updates."""
        if callable(self.learning_rate):
            return tf.cast(self.learning_rate(step), tf.float32)
        return tf.constant(self.learning_rate, tf.float32)

    def current_learning_rate(self) -> tf.Tensor:
        """The learning rate the next update will use."""
        return self.learning_rate_at(self.iterations)

    # -- update ----------------------------------------------------------------------------

    def apply(self, grads_and_vars: GradsAndVars) -> None:
        """Applies summed gradients to their variables and advances the step counter.

        Works eagerly, inside a ``tf.function``, with the default strategy, and from a
        replica context of ``MirroredStrategy``/``MultiWorkerMirroredStrategy`` (where the
        gradients must already be identical on every replica, e.g. after an all-reduce).

        Args:
            grads_and_vars: Pairs of (gradient tensor, variable) for variables given to
                ``build``. A None gradient skips that variable for this step (no decay).

        Raises:
            ConfigError: If the optimizer is not built or a variable is unknown to it.
        """
        if not self.built:
            raise ConfigError(f"optimizer {self.name!r} must be built before apply()")
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        for _, var in pairs:
            if var.ref() not in self._index:
                raise ConfigError(f"variable {var.name} was not given to build()")
        if tf.distribute.in_cross_replica_context():
            self._apply_cross_replica(tf.distribute.get_strategy(), pairs)
        else:
            tf.distribute.get_replica_context().merge_call(
                self._apply_cross_replica, args=(pairs,)
            )

    def _apply_cross_replica(self, strategy, pairs) -> None:
        # One learning rate for all devices, computed from the step before this update.
        step = self.iterations.read_value()
        lr = self.learning_rate_at(step)
        for grad, var in pairs:
            position = self._index[var.ref()]
            # group=False: the per-device results are not needed; automatic control
            # dependencies in tf.function order these writes before the counter update.
            mask = self._masks[position]
            strategy.extended.update(
                var, self._update_with_decay,
                args=(grad, *self.slots[position], *(() if mask is None else (mask,))),
                kwargs={"lr": lr, "step": step, "hyper": self._hypers[position], "masked": mask is not None},
                group=False,
            )
        self.iterations.assign_add(1)

    def _update_with_decay(self, var, grad, *slots, lr, step, hyper, masked):
        grad = tf.convert_to_tensor(grad)
        if hyper["weight_decay"]:
            grad = grad + hyper["weight_decay"] * var.read_value()
        if masked:
            *slots, mask = slots
            grad = grad * mask
        return self._update(var, grad, slots, lr, step, hyper)

    def reset(self) -> None:
        """Zero every slot (momentum, Adam's moments), keeping the step counter and schedule.

        Weight sparsification calls it after each mask update, as PocketFlow reset its
        optimizer: momentum gathered before the update would otherwise move pruned weights.
        """
        for slots in self.slots:
            for slot in slots:
                slot.assign(tf.zeros_like(slot))

    def _update(self, var, grad, slots, lr, step, hyper):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with (Nesterov) momentum and L2 weight decay.

    Update rule, with ``g`` the gradient plus weight decay and ``v`` the momentum slot::

        v <- momentum * v - lr * g
        w <- w + momentum * v - lr * g      (nesterov=True, as tf.keras SGD)
        w <- w + v                          (nesterov=False)
        w <- w - lr * g                     (momentum=0, no slot)

    Args:
        learning_rate: A float or a schedule of the step.
        momentum: In [0, 1).
        nesterov: Use the Nesterov form (requires momentum > 0 to matter).
        weight_decay: L2 coefficient added to every gradient.
        name: The module name.
        overrides: Per-variable ``momentum`` and ``weight_decay`` (see ``Optimizer``).
    """

    def __init__(self, learning_rate: LearningRate, momentum: float = 0.9,
                 nesterov: bool = True, weight_decay: float = 0.0, name: str = "SGD",
                 overrides: Overrides | None = None) -> None:
        super().__init__(learning_rate, weight_decay, name=name, overrides=overrides)
        self.momentum = _check_fraction("momentum", momentum)
        self.nesterov = bool(nesterov)

    @property
    def _hyper(self):
        return {**super()._hyper, "momentum": self.momentum}

    def _check_hyper(self, hyper):
        return {**super()._check_hyper(hyper), "momentum": _check_fraction("momentum", hyper["momentum"])}

    def _slots_for(self, hyper):
        return ("momentum",) if hyper["momentum"] else ()

    def _update(self, var, grad, slots, lr, step, hyper):
        lr = tf.cast(lr, var.dtype)
        momentum = hyper["momentum"]
        if not momentum:
            return var.assign_sub(lr * grad)
        (velocity,) = slots
        new_velocity = momentum * velocity.read_value() - lr * grad
        velocity.assign(new_velocity)
        if self.nesterov:
            return var.assign_add(momentum * new_velocity - lr * grad)
        return var.assign_add(new_velocity)


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient (not the decoupled AdamW form).

    Update rule at update number ``t = step + 1``, ``g`` the gradient plus weight decay::

        m <- beta_1 * m + (1 - beta_1) * g
        v <- beta_2 * v + (1 - beta_2) * g^2
        w <- w - lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

    This is the form tf.keras uses (epsilon added to the uncorrected ``sqrt(v)``).

    Args:
        learning_rate: A float or a schedule of the step.
        beta_1: Decay of the first moment, in [0, 1).
        beta_2: Decay of the second moment, in [0, 1).
        epsilon: Added to the denominator (> 0).
        weight_decay: L2 coefficient added to every gradient.
        name: The module name.
        overrides: Per-variable ``weight_decay`` (see ``Optimizer``).
    """

    _slot_names = ("m", "v")

    def __init__(self, learning_rate: LearningRate, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, weight_decay: float = 0.0,
                 name: str = "Adam", overrides: Overrides | None = None) -> None:
        super().__init__(learning_rate, weight_decay, name=name, overrides=overrides)
        self.beta_1 = _check_fraction("beta_1", beta_1)
        self.beta_2 = _check_fraction("beta_2", beta_2)
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
            raise ConfigError(f"epsilon must be a positive number, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def _update(self, var, grad, slots, lr, step, hyper):
        m, v = slots
        dtype = var.dtype
        t = tf.cast(step + 1, dtype)
        alpha = tf.cast(lr, dtype) * tf.sqrt(1.0 - tf.pow(tf.cast(self.beta_2, dtype), t)) \
            / (1.0 - tf.pow(tf.cast(self.beta_1, dtype), t))
        new_m = self.beta_1 * m.read_value() + (1.0 - self.beta_1) * grad
        new_v = self.beta_2 * v.read_value() + (1.0 - self.beta_2) * tf.square(grad)
        m.assign(new_m)
        v.assign(new_v)
        return var.assign_sub(alpha * new_m / (tf.sqrt(new_v) + self.epsilon))
