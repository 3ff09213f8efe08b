"""Learning-rate schedules: callables from the optimizer step to a learning rate.

Each schedule takes the number of updates already applied (an int or an integer tensor,
so it works both eagerly and inside a ``tf.function``) and returns a float32 scalar
tensor. Durations are in optimizer steps; a caller that thinks in epochs multiplies by
``steps_per_epoch`` once, when it builds the schedule.

An optional linear warm-up scales the first ``warmup_steps`` updates by
``(step + 1) / warmup_steps``, so the first update already moves the weights and update
``warmup_steps - 1`` uses the full rate.
"""
import math
import numbers
from collections.abc import Sequence

import tensorflow as tf

from utils.errors import ConfigError

StepLike = int | tf.Tensor | tf.Variable


def _check_number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigError(f"{name} must be {relation} {minimum}, got {value!r}")
    return float(value)


def _check_steps(total_steps, warmup_steps) -> tuple:
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) \
            or total_steps < 1:
        raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) \
            or not 0 <= warmup_steps < total_steps:
        raise ConfigError(
            f"warmup_steps must be an integer in [0, total_steps={total_steps}), "
            f"got {warmup_steps!r}"
        )
    return int(total_steps), int(warmup_steps)


class _Schedule:
    """Shared warm-up handling; subclasses implement ``_decayed(step)``."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int) -> None:
        self.base_lr = _check_number("base_lr", base_lr, strict=True)
        self.total_steps, self.warmup_steps = _check_steps(total_steps, warmup_steps)

    def _decayed(self, step: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def __call__(self, step: StepLike) -> tf.Tensor:
        """Returns the learning rate for the update that follows ``step`` earlier ones."""
        step = tf.cast(step, tf.float32)
        lr = self._decayed(step)
        if self.warmup_steps:
            ramp = tf.minimum((step + 1.0) / float(self.warmup_steps), 1.0)
            lr = lr * ramp
        return lr


class StepDecay(_Schedule):
    """Piecewise-constant decay: the rate is multiplied by ``decay_rate`` at fixed fractions.

    With the EKG defaults and 100 epochs the rate is ``base_lr`` for epochs 0-29,
    ``0.2 * base_lr`` for 30-59, ``0.04 * base_lr`` for 60-79 and ``0.008 * base_lr`` after.

    Args:
        base_lr: The initial learning rate (> 0).
        total_steps: The length of training in optimizer steps.
        decay_points: Strictly increasing fractions of training in (0, 1); the decay at
            point ``p`` takes effect from step ``int(p * total_steps)`` on.
        decay_rate: The factor applied at each point, in (0, 1].
        warmup_steps: Length of the linear warm-up (0 for none).

    Raises:
        ConfigError: If an argument is out of range.
    """

    def __init__(
        self,
        base_lr: float,
        total_steps: int,
        decay_points: Sequence[float] = (0.3, 0.6, 0.8),
        decay_rate: float = 0.2,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(base_lr, total_steps, warmup_steps)
        points = [_check_number("decay point", p) for p in decay_points]
        if any(not 0.0 < p < 1.0 for p in points):
            raise ConfigError(f"decay_points must lie in (0, 1), got {list(decay_points)}")
        if any(b <= a for a, b in zip(points, points[1:], strict=False)):
            raise ConfigError(f"decay_points must be strictly increasing, got {points}")
        rate = _check_number("decay_rate", decay_rate, strict=True)
        if rate > 1.0:
            raise ConfigError(f"decay_rate must be in (0, 1], got {decay_rate!r}")
        self.decay_points = tuple(points)
        self.decay_rate = rate
        self.boundaries = tuple(int(p * self.total_steps) for p in points)

    def _decayed(self, step: tf.Tensor) -> tf.Tensor:
        # Counting the boundaries already passed keeps this a handful of ops, with no
        # Python branching on the step, so it traces once.
        passed = tf.zeros([], tf.float32)
        for boundary in self.boundaries:
            passed += tf.cast(step >= float(boundary), tf.float32)
        return self.base_lr * tf.pow(self.decay_rate, passed)

    def __repr__(self) -> str:
        return (f"StepDecay(base_lr={self.base_lr}, total_steps={self.total_steps}, "
                f"decay_points={self.decay_points}, decay_rate={self.decay_rate}, "
                f"warmup_steps={self.warmup_steps})")


class Cosine(_Schedule):
    """Half-cosine decay from ``base_lr`` to ``final_lr``.

    The cosine runs over the steps after the warm-up, reaching ``final_lr`` at
    ``total_steps`` and staying there afterwards.

    Args:
        base_lr: The initial learning rate (> 0).
        total_steps: The length of training in optimizer steps.
        final_lr: The rate at the end, in [0, base_lr].
        warmup_steps: Length of the linear warm-up (0 for none).

    Raises:
        ConfigError: If an argument is out of range.
    """

    def __init__(
        self, base_lr: float, total_steps: int, final_lr: float = 0.0, warmup_steps: int = 0
    ) -> None:
        super().__init__(base_lr, total_steps, warmup_steps)
        self.final_lr = _check_number("final_lr", final_lr)
        if self.final_lr > self.base_lr:
            raise ConfigError(
                f"final_lr ({final_lr!r}) must not exceed base_lr ({base_lr!r})"
            )

    def _decayed(self, step: tf.Tensor) -> tf.Tensor:
        span = float(self.total_steps - self.warmup_steps)
        progress = tf.clip_by_value((step - float(self.warmup_steps)) / span, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.final_lr + (self.base_lr - self.final_lr) * cosine

    def __repr__(self) -> str:
        return (f"Cosine(base_lr={self.base_lr}, total_steps={self.total_steps}, "
                f"final_lr={self.final_lr}, warmup_steps={self.warmup_steps})")


class Poly(_Schedule):
    """Polynomial decay by epochs: ``base_lr * (1 - e / E) ** power`` during epoch ``e`` of ``E``
    (the ShuntConnector's `poly` policy, which Keras applied at every epoch's end).

    Args:
        base_lr: The initial learning rate (> 0).
        total_steps: The length of training in optimizer steps.
        steps_per_epoch: Optimizer steps per epoch (the rate changes only between epochs).
        power: The exponent (> 0; the original used 0.9).
        warmup_steps: Length of the linear warm-up (0 for none).
    """

    def __init__(self, base_lr: float, total_steps: int, steps_per_epoch: int, power: float = 0.9,
                 warmup_steps: int = 0) -> None:
        super().__init__(base_lr, total_steps, warmup_steps)
        self.power = _check_number("power", power, strict=True)
        self.steps_per_epoch, _ = _check_steps(steps_per_epoch, 0)
        self.epochs = max(1, -(-self.total_steps // self.steps_per_epoch))

    def _decayed(self, step: tf.Tensor) -> tf.Tensor:
        epoch = tf.minimum(tf.floor(step / float(self.steps_per_epoch)), float(self.epochs - 1))
        return self.base_lr * tf.pow(1.0 - epoch / float(self.epochs), self.power)

    def __repr__(self) -> str:
        return (f"Poly(base_lr={self.base_lr}, total_steps={self.total_steps}, "
                f"steps_per_epoch={self.steps_per_epoch}, power={self.power}, warmup_steps={self.warmup_steps})")


class Plateau(tf.Module):
    """The rate times ``factor`` whenever the monitored value (the epoch's training loss) has not
    improved by ``min_delta`` for ``patience`` epochs, never below ``min_lr`` (Keras'
    ``ReduceLROnPlateau``, which the ShuntConnector used to train its shunts).

    Its state (scale, best value, epochs waited) is held in variables: a checkpoint of the
    optimizer that owns it saves it, so a resumed run continues the same decay. ``update`` is
    called on the host at every epoch's end (`RunContext.train` does it).
    """

    def __init__(self, base_lr: float, factor: float = 0.1, patience: int = 4, min_lr: float = 1e-7,
                 min_delta: float = 1e-4) -> None:
        super().__init__(name="plateau")
        self.base_lr = _check_number("base_lr", base_lr, strict=True)
        self.factor = _check_number("factor", factor, strict=True)
        if self.factor >= 1.0:
            raise ConfigError(f"plateau factor must be in (0, 1), got {factor!r}")
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1:
            raise ConfigError(f"plateau patience must be a positive integer, got {patience!r}")
        self.patience = int(patience)
        self.min_lr = _check_number("min_lr", min_lr)
        self.min_delta = _check_number("min_delta", min_delta)
        self.rate = tf.Variable(self.base_lr, trainable=False, dtype=tf.float32, name="rate")
        self.best = tf.Variable(math.inf, trainable=False, dtype=tf.float32, name="best")
        self.wait = tf.Variable(0, trainable=False, dtype=tf.int64, name="wait")

    def __call__(self, step: StepLike) -> tf.Tensor:
        del step
        return tf.identity(self.rate)

    def update(self, value: float) -> bool:
        """Record the epoch's monitored value; returns True if the rate was just reduced."""
        if not math.isfinite(value):
            return False
        if value < float(self.best.numpy()) - self.min_delta:
            self.best.assign(value)
            self.wait.assign(0)
            return False
        self.wait.assign_add(1)
        if int(self.wait.numpy()) < self.patience or float(self.rate.numpy()) <= self.min_lr:
            return False
        self.rate.assign(max(float(self.rate.numpy()) * self.factor, self.min_lr))
        self.wait.assign(0)
        return True

    def __repr__(self) -> str:
        return (f"Plateau(base_lr={self.base_lr}, factor={self.factor}, patience={self.patience}, "
                f"min_lr={self.min_lr})")
