"""Fake quantizers: parameter transforms (weights) and site transforms (activations).

PocketFlow's uniform and non-uniform quantization learners, as `nets.transforms.Transform`s, so
the quantized net is an ordinary net with quantizers attached, saved with its spec and state:

* `UniformQuantizer` (weights): per tensor, per output channel (`channel` buckets) or in
  `split` buckets of `bucket_size` strided values (PocketFlow's layout: flatten, pad with the
  last value to a multiple of the bucket size, reshape to `[bucket_size, n_buckets]`, one bucket
  per column). Each bucket is mapped to `2^bits` levels between its min and max:
  `code = round((w - min) / scale)`, `scale = (max - min) / (2^bits - 1)`,
  `w_q = code * scale + min`. Min and max are not differentiated; the gradient to `w` is the
  straight-through estimator (identity).
* `NonUniformQuantizer` (weights): `2^bits` learnable centres per bucket in the bucket's
  normalised range `[0, 1]`, initialised at the (i+1)/(K+1) quantiles or uniformly; each weight
  takes its nearest centre, `w_q = c[code] * (max - min) + min`. The gradient to `w` is the
  straight-through estimator; the gradient to a centre is the sum of the gradients of the
  weights assigned to it, times the bucket's range (the chain rule of the line above: centres
  live in normalised units).
* `ActivationQuantizer` (activation sites after a ReLU): `2^bits` levels over the batch's range
  while training and over moving averages of it at inference, so evaluation does not depend on
  the batch. The range always includes 0, so zero (every ReLU's most common output, and every
  removed channel) is exact.

The quantized value is exactly `code * scale + min` (the straight-through term adds an exact
zero), so `codes()` and the packed params file (`codebase.packed`) reproduce it bit for bit.

In a masked net, weight ranges are taken over the kept entries and the result is masked again,
so a masked net and its slimmed copy quantize identically (per tensor and per channel).
`split` buckets depend on the flat layout of the full tensor, so a net with them cannot be
slimmed or padded (quantize after pruning; `--method ekg,uq` does). Quantized weights change
under zero padding, so `pad_channels` is refused too: bake first (`nets.deploy.baked`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nets import axes as ax
from nets.transforms import Transform, register_transform
from utils.errors import ConfigError

BUCKETS = ("none", "channel", "split")


def check_bits(flag: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ConfigError(f"--{flag} must be an integer in [1, 16], got {bits!r}")
    return int(bits)


def check_buckets(flag: str, buckets: str, bucket_size) -> None:
    if buckets not in BUCKETS:
        raise ConfigError(f"--{flag} must be one of {', '.join(BUCKETS)}, got {buckets!r}")
    if buckets == "split" and (isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer))
                               or bucket_size < 2):
        raise ConfigError(f"--{flag} split needs a bucket size that is an integer >= 2, got {bucket_size!r}")


class BucketLayout:
    """How a weight tensor is cut into buckets: `to_buckets(w) -> [n_buckets, n]` and back."""

    def __init__(self, shape, buckets: str, channel_axis: int, bucket_size: int):
        self.shape, self.buckets = tuple(int(s) for s in shape), buckets
        self.size = int(np.prod(self.shape))
        self.channel_axis = channel_axis % len(self.shape)
        self.bucket_size = int(bucket_size)
        rank = len(self.shape)
        self.perm = [self.channel_axis] + [i for i in range(rank) if i != self.channel_axis]
        self.inverse = list(np.argsort(self.perm))
        if buckets == "none":
            self.count = 1
        elif buckets == "channel":
            self.count = self.shape[self.channel_axis]
        else:
            self.count = -(-self.size // self.bucket_size)

    def to_buckets(self, w):
        if self.buckets == "none":
            return tf.reshape(w, [1, -1])
        if self.buckets == "channel":
            return tf.reshape(tf.transpose(w, self.perm), [self.count, -1])
        flat = tf.reshape(w, [-1])
        extra = self.count * self.bucket_size - self.size
        if extra:
            flat = tf.concat([flat, tf.fill([extra], flat[-1])], 0)
        return tf.transpose(tf.reshape(flat, [self.bucket_size, self.count]))

    def from_buckets(self, b):
        if self.buckets == "none":
            return tf.reshape(b, self.shape)
        if self.buckets == "channel":
            moved = [self.shape[i] for i in self.perm]
            return tf.transpose(tf.reshape(b, moved), self.inverse)
        flat = tf.reshape(tf.transpose(b), [-1])[: self.size]
        return tf.reshape(flat, self.shape)


def _ranges(wb, kept):
    """Per-bucket `(min, max)`, `[n_buckets, 1]`, over the kept entries (all if `kept` is None)."""
    if kept is None:
        return tf.reduce_min(wb, 1, keepdims=True), tf.reduce_max(wb, 1, keepdims=True)
    inf = tf.constant(np.inf, wb.dtype)
    low = tf.reduce_min(tf.where(kept > 0, wb, inf), 1, keepdims=True)
    high = tf.reduce_max(tf.where(kept > 0, wb, -inf), 1, keepdims=True)
    empty = tf.math.is_inf(low)  # a bucket whose entries are all removed
    return tf.where(empty, tf.zeros_like(low), low), tf.where(empty, tf.zeros_like(high), high)


class _WeightQuantizer(Transform):
    """Shared set-up of the weight quantizers: bucket layout, kept-entry masks, resizing rules."""

    def __init__(self, bits: int, buckets: str = "none", bucket_size: int = 256, name: str = "quantizer"):
        super().__init__(name=name)
        self.bits = check_bits("bits", bits)
        check_buckets("buckets", buckets, bucket_size)
        self.buckets, self.bucket_size = buckets, int(bucket_size)
        self.layout = None
        self.axes = ()

    def attached(self, layer, target):
        if self.layout is not None:
            raise ConfigError(f"{self.kind}: one quantizer per parameter; {target} is a second target")
        name = target.rpartition("/")[2]
        if name not in layer.named:
            raise ConfigError(f"{self.kind} quantizes parameters, not {target!r}")
        self.axes = layer.axes[name]
        channel_axis = self.axes[-1].dim if self.axes else -1
        self.layout = BucketLayout(layer.named[name].shape, self.buckets, channel_axis, self.bucket_size)
        self._init_state(layer.named[name])

    def _init_state(self, var) -> None:
        del var

    def _kept(self, w):
        mask = ax.mask_tensor(self.axes, len(w.shape))
        if isinstance(mask, float):
            return None
        return self.layout.to_buckets(tf.broadcast_to(mask, tf.shape(w)))

    def _quantize(self, wb, kept):
        """`(w_q in buckets, codes, scale, offset)`; subclasses implement."""
        raise NotImplementedError

    def __call__(self, w):
        kept = self._kept(w)
        wb = self.layout.to_buckets(w)
        qb = self._quantize(wb, kept)[0]
        if kept is not None:
            qb = qb * kept
        q = self.layout.from_buckets(qb)
        return q + (w - tf.stop_gradient(w))  # straight-through: the forward value is exactly q

    def codes(self, w) -> dict:
        """Numpy `codes` (bucketed, `[n_buckets, n]`) and what decodes them; see subclasses."""
        _, codes, *rest = self._quantize(self.layout.to_buckets(tf.convert_to_tensor(w)), None)
        names = self._decode_names
        return {"codes": np.asarray(codes.numpy(), np.int64), **{k: np.asarray(v.numpy()) for k, v in zip(names, rest)}}

    def check_resize(self, how: str) -> None:
        if self.buckets == "split" or how == "padded":
            why = "its buckets follow the full tensor's layout" if how == "slimmed" else "new zeros would quantize"
            raise ConfigError(f"a net with a {self.kind} ({self.buckets} buckets) cannot be {how} ({why}); "
                              "quantize after pruning, or bake it first (nets.deploy.baked)")

    def config(self):
        return {"bits": self.bits, "buckets": self.buckets, "bucket_size": self.bucket_size}


@register_transform
class UniformQuantizer(_WeightQuantizer):
    """`2^bits` evenly spaced levels per bucket (see the module docstring)."""

    kind = "uniform_quantizer"
    _decode_names = ("scale", "offset")

    def __init__(self, bits: int, buckets: str = "none", bucket_size: int = 256):
        super().__init__(bits, buckets, bucket_size, name="uniform_quantizer")

    def _quantize(self, wb, kept):
        wb = tf.stop_gradient(wb)
        low, high = _ranges(wb, kept)
        levels = float(2 ** self.bits - 1)
        span = high - low
        scale = tf.where(span > 0, span / levels, tf.ones_like(span))
        codes = tf.clip_by_value(tf.round((wb - low) / scale), 0.0, levels)
        return codes * scale + low, codes, scale, low


@register_transform
class NonUniformQuantizer(_WeightQuantizer):
    """`2^bits` learnable centres per bucket (see the module docstring).

    Args:
        bits, buckets, bucket_size: as `UniformQuantizer`.
        init: `quantile` (the (i+1)/(K+1) quantiles of the bucket's normalised weights) or
            `uniform` (evenly over [0, 1]); used when the quantizer is attached.
    """

    kind = "nonuniform_quantizer"
    _decode_names = ("centres", "span", "offset")

    def __init__(self, bits: int, buckets: str = "none", bucket_size: int = 256, init: str = "quantile"):
        super().__init__(bits, buckets, bucket_size, name="nonuniform_quantizer")
        if init not in ("quantile", "uniform"):
            raise ConfigError(f"--nuq_init must be quantile or uniform, got {init!r}")
        if self.bits > 8:
            raise ConfigError(f"--nuq_weight_bits {self.bits}: non-uniform quantization keeps 2^bits centres "
                              "per bucket; use at most 8 bits")
        self.init = init
        self.centres = None

    def _init_state(self, var):
        wb = self.layout.to_buckets(tf.convert_to_tensor(var)).numpy()
        low, high = wb.min(1, keepdims=True), wb.max(1, keepdims=True)
        span = np.where(high > low, high - low, 1.0)
        normalised = (wb - low) / span
        k = 2 ** self.bits
        if self.init == "quantile":
            centres = np.quantile(normalised, np.arange(1, k + 1) / (k + 1), axis=1).T
        else:
            centres = np.tile(np.linspace(0.0, 1.0, k), [self.layout.count, 1])
        self.centres = tf.Variable(centres.astype(np.float32), name="centres")

    def _quantize(self, wb, kept):
        wb = tf.stop_gradient(wb)
        low, high = _ranges(wb, kept)
        span = high - low
        span = tf.where(span > 0, span, tf.ones_like(span))
        normalised = (wb - low) / span
        order = tf.argsort(self.centres, axis=1)
        centres = tf.gather(self.centres, order, batch_dims=1)  # sorted; differentiable w.r.t. the centres
        mids = tf.stop_gradient((centres[:, 1:] + centres[:, :-1]) / 2.0)
        codes = tf.searchsorted(mids, normalised, side="left")
        return tf.gather(centres, codes, batch_dims=1) * span + low, codes, centres, span, low

    def state(self):
        return {"centres": self.centres}

    def state_axes(self):
        if self.buckets == "channel" and self.axes:
            return {"centres": (ax.Axis(0, self.axes[-1].group),)}
        return {}

    def config(self):
        return {**super().config(), "init": self.init}

    def is_centre(self, var) -> bool:
        return self.centres is not None and var is self.centres


@register_transform
class ActivationQuantizer(Transform):
    """Fake-quantizes an activation site to `2^bits` levels over `[min(0, lo), max(0, hi)]`.

    Training calls use the batch's range and move the averages (by `1 - momentum`, the first
    batch sets them); inference calls use the averages, and pass the activation through unchanged
    until a training call has set them. A recomputation replay does not move them.

    Args:
        state: the net's `ForwardState` (training flag, replay flag).
        bits: levels are `2^bits`.
        momentum: of the moving range.
    """

    kind = "activation_quantizer"

    def __init__(self, state, bits: int, momentum: float = 0.9):
        super().__init__(name="activation_quantizer")
        self.forward_state = state
        self.bits = check_bits("uq_activation_bits", bits)
        self.momentum = float(momentum)
        on_read = dict(synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.MEAN)
        self.low = tf.Variable(0.0, trainable=False, name="low", **on_read)
        self.high = tf.Variable(0.0, trainable=False, name="high", **on_read)
        self.seen = tf.Variable(0.0, trainable=False, name="seen", **on_read)

    @classmethod
    def from_config(cls, config, net):
        return cls(net.state, **config)

    def __call__(self, x):
        if self.forward_state.training:
            low = tf.stop_gradient(tf.minimum(tf.reduce_min(x), 0.0))
            high = tf.stop_gradient(tf.maximum(tf.reduce_max(x), 0.0))
            if not self.forward_state.replaying:
                rate = 1.0 - self.momentum * self.seen
                self.low.assign_sub((self.low - low) * rate)
                self.high.assign_sub((self.high - high) * rate)
                self.seen.assign(1.0)
        else:
            low, high = tf.convert_to_tensor(self.low), tf.convert_to_tensor(self.high)
        levels = float(2 ** self.bits - 1)
        span = high - low
        scale = tf.where(span > 0, span / levels, 1.0)
        codes = tf.round((tf.clip_by_value(x, low, high) - low) / scale)
        q = tf.stop_gradient(codes * scale + low)
        if not self.forward_state.training:  # never calibrated (no training call yet): pass through
            return tf.where(self.seen > 0, q, x)
        inside = tf.cast((x >= low) & (x <= high), x.dtype)
        return q + (x - tf.stop_gradient(x)) * inside  # straight-through inside the range

    def state(self):
        return {"low": self.low, "high": self.high, "seen": self.seen}

    def config(self):
        return {"bits": self.bits, "momentum": self.momentum}


class QuantizerChoice(Transform):
    """One of several weight quantizers of a parameter, chosen by a variable (a policy search's
    roll-outs: every bit width of a layer is tried without tracing again).

    `choice` (an int32 scalar variable) indexes `quantizers`; only the chosen one runs
    (`tf.switch_case`). Not saved: a search's net is never written with it (the learner then
    attaches one quantizer per layer).

    Args:
        quantizers: weight quantizers of one parameter (e.g. bits 2..8), each attached with it.
    """

    kind = "quantizer_choice"
    saved = False

    def __init__(self, quantizers):
        super().__init__(name="quantizer_choice")
        self.quantizers = list(quantizers)
        self.choice = tf.Variable(0, dtype=tf.int32, trainable=False, name="choice")

    def attached(self, layer, target):
        for quantizer in self.quantizers:
            quantizer.attached(layer, target)

    def __call__(self, w):
        return tf.switch_case(tf.convert_to_tensor(self.choice), [lambda q=q: q(w) for q in self.quantizers])

    def check_resize(self, how: str) -> None:
        raise ConfigError(f"a net with a {self.kind} (a search's net) cannot be {how}")
