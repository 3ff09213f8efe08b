"""Masked layers written with plain TensorFlow ops on `tf.Module`s.

Each layer receives its input and output `ChannelGroup` when it is built and declares, per
parameter, which axes hold which group's channels (`nets.axes`). Masks multiply into the
*parameters* (kernel, bias, BN gamma/beta), never into activations: an output channel whose
kernel column, bias, gamma and beta are all zero is exactly zero after BatchNorm, in training
and in inference mode, so the masked net computes what the slimmed net computes at the cost of
a few parameter-sized multiplies. Masks are one kind of parameter transform
(`nets.transforms.GroupMask`): `Layer.param(name)` applies a parameter's transforms in order,
and a layer whose groups are all unmasked and which has no transform runs no extra op at all.

Calling a layer goes through `Layer.__call__`: the input site `<key>:in` (when the net was
called with a tap), the layer's own `call`, its output transforms (ResRep's compactor), the
output site `<key>:out` (see `nets.sites`).

Parameter names follow the EKG reference pickles: `<scope>/kernel:0`, `<scope>/biases:0`,
`<scope>/gamma:0`, `<scope>/beta:0`, `<scope>/moving_mean:0`, `<scope>/moving_variance:0`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tensorflow as tf

from nets import axes as ax
from nets import complexity
from nets.groups import ChannelGroup, MaskOptions
from nets.sites import Site
from nets.transforms import GroupMask


class ForwardState:
    """Trace-time switches of one net's forward pass, shared by the net and its layers.

    A plain Python object (not a variable): it changes which ops are built, not their values,
    so it is set around a call or a trace, never inside a compiled step.

    Attributes:
        tap: the tap of the current `Net.__call__` (None: no sites are emitted).
        replaying: True while `op_utils.recompute` runs a link of the net a second time to
            rebuild its activations for the backward pass; BatchNorm then skips its
            moving-statistics update, which the first run already made.
        training: the `training` argument of the current `Net.__call__` (for transforms that
            behave differently in training, such as activation quantizers).
    """

    def __init__(self):
        self.tap = None
        self.replaying = False
        self.training = False

    @contextlib.contextmanager
    def mode(self, training: bool):
        previous, self.training = self.training, bool(training)
        try:
            yield
        finally:
            self.training = previous

    @contextlib.contextmanager
    def tapping(self, tap):
        previous, self.tap = self.tap, tap
        try:
            yield
        finally:
            self.tap = previous

    @contextlib.contextmanager
    def replay(self):
        previous, self.replaying = self.replaying, True
        try:
            yield
        finally:
            self.replaying = previous


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "SAME":
        return math.ceil(size / stride)
    return math.ceil((size - kernel + 1) / stride)


def he_fan_out(shape) -> np.ndarray:
    """VarianceScaling(scale=2, mode='fan_out', truncated normal): the reference's conv init."""
    fan_out = shape[0] * shape[1] * shape[3]
    std = math.sqrt(2.0 / fan_out) / 0.87962566103423978
    return tf.random.truncated_normal(shape, stddev=std).numpy()


def _fold(kernel, biases, affine, scale_shape):
    """`kernel` and a 1-D bias with `y -> y * scale + shift` folded in (`scale_shape` puts the
    output channels of the kernel on the right axis)."""
    scale, shift = affine
    biases = shift if biases is None else tf.reshape(biases, [-1]) * scale + shift
    return kernel * tf.reshape(scale, scale_shape), biases


def _add_bias(y, biases):
    """`y + biases` as a BiasAdd op, the form grappler fuses into the convolution before it."""
    return y if biases is None else tf.nn.bias_add(y, tf.reshape(biases, [-1]))


def conv_bn(conv, bn, x, training):
    """`bn(conv(x), training)`. At inference the BatchNorm is folded into the convolution's
    kernel and bias (the same affine map), so that the graph is conv + bias-add, which
    TensorFlow's graph optimiser fuses with what follows: a residual add and ReLU, ReLU6, and
    after depthwise convs too. It already fuses conv + FusedBatchNorm + ReLU by itself, and the
    fold costs a kernel-sized multiply per call, so nets use this only where the fusion needs
    it (measured on CPU: ResNet-56 batch 128 -5-8%, MobileNetV2 -20%; VGG-16, which has no such
    place, would only lose: batch 1 6.4-7.1 -> 8.6-8.9 ms). Under a tap both layers run, so
    every site sees exactly its layer's input and output."""
    if training or bn.out_transforms or bn.state.tap is not None or len(x.shape) != 4:
        return bn(conv(x), training)
    return conv(x, affine=bn.inference_affine())


class Layer(tf.Module):
    """Base of the masked layers: a scope key, named parameters with channel axes, transforms.

    Subclasses create their parameters with `_var(name, value, axes)` and implement `call`.
    """

    def __init__(self, key: str, options: MaskOptions | None, state: ForwardState | None = None):
        super().__init__(name="".join(c if c.isalnum() else "_" for c in key))
        self.key = key
        self.options = options
        self.state = state if state is not None else ForwardState()
        self.named = {}  # parameter name -> tf.Variable, in pickle order (the EKG params)
        self.axes = {}  # parameter name -> tuple of nets.axes.Axis
        self.transforms = {}  # parameter name -> [Transform, ...], applied in order by param()
        self.out_transforms = []  # applied to the layer's output, in order
        self.in_site = self.out_site = None

    def _sites(self, in_group, out_group) -> None:
        self.in_site = Site(f"{self.key}:in", "layer_in", in_group, self)
        self.out_site = Site(f"{self.key}:out", "layer_out", out_group, self)

    def _var(self, name, value, axes=(), trainable=True, on_read=False, masked=True, renorm=False):
        """A parameter whose channel axes are `axes`; `masked` ones get the group masks."""
        kwargs = {}
        if on_read:
            # Each replica updates its own moving statistics; reading them averages replicas.
            kwargs = dict(
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
            )
        var = tf.Variable(tf.cast(value, tf.float32), trainable=trainable, name=name, **kwargs)
        self.named[name] = var
        self.axes[name] = tuple(axes)
        if masked and self.options is not None and any(a.group.masked for a in axes):
            self.transforms[name] = [GroupMask(axes, self.options, renorm=renorm)]
        return var

    def __call__(self, x, *args, **kwargs):
        tap = self.state.tap
        if tap is not None:
            x = tap(self.in_site, x)
        y = self.call(x, *args, **kwargs)
        for transform in self.out_transforms:
            y = transform(y)
        if tap is not None:
            y = tap(self.out_site, y)
        return y

    def call(self, x, *args, **kwargs):
        raise NotImplementedError

    def param(self, name: str):
        """Parameter `name` as the forward pass uses it: its transforms applied in order, then,
        in compact mode, gathered to the kept channels."""
        value = self.named[name]
        for transform in self.transforms.get(name, ()):
            value = transform(value)
        if self._compact_mode():
            value = ax.gather_kept(value, self.axes[name])
        return value

    def _compact_mode(self) -> bool:
        return self.options is not None and self.options.compact

    def _compact(self, group: ChannelGroup) -> bool:
        return self._compact_mode() and group.masked

    def groups(self) -> tuple:
        """The channel groups this layer touches."""
        raise NotImplementedError

    def cost(self, width) -> complexity.Cost:
        raise NotImplementedError

    # --- host-side: shapes, slimming, padding (generic over the declared axes) -----------
    def infer_widths(self, shapes: dict) -> dict:
        """Channel counts of this layer's groups implied by stored parameter shapes."""
        widths = {}
        for name, shape in shapes.items():
            widths.update(ax.widths(shape, self.axes[name]))
        return widths

    def sliced(self) -> dict:
        """Numpy parameters of the slimmed layer: each parameter as the masked forward pass uses it
        (group masks and EKG's renorm applied by the same ops), kept channels gathered. The
        slimmed layer therefore computes with exactly the values the compact forward pass uses."""
        out = {}
        for name, var in self.named.items():
            value = var
            for transform in self.transforms.get(name, ()):
                if isinstance(transform, GroupMask):
                    value = transform(value)
            out[name] = ax.gather(np.asarray(value.numpy()), self.axes[name])
        return out

    def padded(self, width) -> dict:
        """Numpy parameters grown to `width(group)` channels per group, new channels inert (zero)."""
        return {name: ax.pad(var.numpy(), self.axes[name], width, 1.0 if name == "moving_variance" else 0.0)
                for name, var in self.named.items()}


class Conv2d(Layer):
    """2-D convolution from `in_group` channels to `out_group` channels.

    Args:
        key: scope of the parameters (`"BasicBlock0.0/conv1"`).
        in_group, out_group: the ChannelGroups of the input and output channels.
        kernel_size: int or (kh, kw).
        in_hw: spatial size of the input, used for complexity without running the model.
        strides, padding, use_bias: as in `tf.nn.conv2d`.
        options: the net's MaskOptions (None for an ordinary, unmasked net).
        state: the net's ForwardState.
    """

    def __init__(self, key, in_group: ChannelGroup, out_group: ChannelGroup, kernel_size, in_hw,
                 strides=1, padding="SAME", use_bias=False, options=None, state=None):
        super().__init__(key, options, state)
        self.in_group, self.out_group = in_group, out_group
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides, self.padding, self.use_bias = int(strides), padding, use_bias
        self.out_hw = tuple(_out_size(s, k, self.strides, padding) for s, k in zip(in_hw, self.kernel_size))
        shape = [*self.kernel_size, in_group.size, out_group.size]
        self.kernel = self._var("kernel", he_fan_out(shape), [ax.Axis(2, in_group), ax.Axis(3, out_group)],
                                renorm=True)
        self.biases = self._var("biases", tf.zeros([1, 1, 1, out_group.size]), [ax.Axis(3, out_group)]) \
            if use_bias else None
        self._sites(in_group, out_group)

    def groups(self):
        return (self.in_group, self.out_group)

    def call(self, x, affine=None):
        """The convolution; `affine = (scale, shift)` folds a per-output-channel affine map
        (an inference BatchNorm, see `conv_bn`) into the kernel and bias."""
        kernel = self.param("kernel")
        biases = self.param("biases") if self.use_bias else None
        if affine is not None:
            kernel, biases = _fold(kernel, biases, affine, [1, 1, 1, -1])
        return _add_bias(tf.nn.conv2d(x, kernel, self.strides, self.padding), biases)

    def cost(self, width):
        return complexity.conv_cost(self.out_hw, self.kernel_size, width(self.in_group),
                                    width(self.out_group), self.use_bias)


class DepthwiseConv2d(Layer):
    """Depthwise convolution (multiplier 1): its input and output are one group."""

    def __init__(self, key, group: ChannelGroup, kernel_size, in_hw, strides=1, padding="SAME",
                 use_bias=False, options=None, state=None):
        super().__init__(key, options, state)
        self.group = group
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides, self.padding, self.use_bias = int(strides), padding, use_bias
        self.out_hw = tuple(_out_size(s, k, self.strides, padding) for s, k in zip(in_hw, self.kernel_size))
        shape = [*self.kernel_size, group.size, 1]
        fan_in = self.kernel_size[0] * self.kernel_size[1]
        self.kernel = self._var("kernel", tf.random.truncated_normal(shape, stddev=math.sqrt(2.0 / fan_in) / 0.8796),
                                [ax.Axis(2, group)], renorm=True)
        self.biases = self._var("biases", tf.zeros([1, 1, 1, group.size]), [ax.Axis(3, group)]) if use_bias else None
        self._sites(group, group)

    def groups(self):
        return (self.group,)

    def call(self, x, affine=None):
        """The convolution; `affine` as in `Conv2d.call`."""
        kernel = self.param("kernel")
        biases = self.param("biases") if self.use_bias else None
        if affine is not None:
            kernel, biases = _fold(kernel, biases, affine, [1, 1, -1, 1])
        return _add_bias(tf.nn.depthwise_conv2d(x, kernel, [1, self.strides, self.strides, 1], self.padding), biases)

    def cost(self, width):
        c = width(self.group)
        return complexity.conv_cost(self.out_hw, self.kernel_size, c, c, self.use_bias, depthwise=True)


class FC(Layer):
    """Dense layer. `spatial` > 1 means the input is a flattened H*W*C map of `in_group`.

    Flattening is channel-last, so input feature `s * C + c` belongs to channel `c`.
    """

    def __init__(self, key, in_group: ChannelGroup, out_group: ChannelGroup, spatial=1, use_bias=True,
                 stddev=0.01, options=None, state=None):
        super().__init__(key, options, state)
        self.in_group, self.out_group, self.spatial, self.use_bias = in_group, out_group, int(spatial), use_bias
        shape = [in_group.size * self.spatial, out_group.size]
        self.kernel = self._var("kernel", tf.random.normal(shape, stddev=stddev),
                                [ax.Axis(0, in_group, self.spatial), ax.Axis(1, out_group)], renorm=True)
        self.biases = self._var("biases", tf.zeros([1, out_group.size]), [ax.Axis(1, out_group)]) if use_bias else None
        self._sites(in_group, out_group)

    def groups(self):
        return (self.in_group, self.out_group)

    def call(self, x):
        y = tf.matmul(x, self.param("kernel"))
        return y if self.biases is None else y + self.param("biases")

    def cost(self, width):
        return complexity.dense_cost(width(self.in_group) * self.spatial, width(self.out_group), self.use_bias)


class BatchNorm(Layer):
    """Batch normalisation of the reference: momentum 0.9, epsilon 1e-5, [1,1,1,C] tensors.

    `training=True` normalises with batch statistics and updates the moving statistics
    (unless `options.freeze_bn` is on, or the forward pass is a recomputation);
    `training=False` uses the moving statistics.
    """

    def __init__(self, key, group: ChannelGroup, hw=(1, 1), rank=4, momentum=0.9, epsilon=1e-5,
                 gamma_init=1.0, options=None, state=None):
        super().__init__(key, options, state)
        self.group, self.hw, self.momentum, self.epsilon = group, tuple(hw), momentum, epsilon
        # When set (a float32 variable), the moving statistics move by this fraction of the
        # distance to the batch statistics instead of 1 - momentum: BN re-estimation
        # (`codebase.stages.recalibrate_bn`) makes them a cumulative mean with it.
        self.update_rate = None
        shape = [1] * (rank - 1) + [group.size]
        self.axes_rank = list(range(rank - 1))
        channel = [ax.Axis(rank - 1, group)]
        self.gamma = self._var("gamma", tf.fill(shape, float(gamma_init)), channel)
        self.beta = self._var("beta", tf.zeros(shape), channel)
        self.moving_mean = self._var("moving_mean", tf.zeros(shape), channel, trainable=False, on_read=True,
                                     masked=False)
        self.moving_variance = self._var("moving_variance", tf.ones(shape), channel, trainable=False, on_read=True,
                                         masked=False)
        self._sites(group, group)

    def groups(self):
        return (self.group,)

    @property
    def compactor(self):
        """The ResRep compactor among the output transforms, or None (see `nets.compactor`)."""
        return next((t for t in self.out_transforms if t.kind == "compactor"), None)

    def call(self, x, training=False):
        gamma, beta = self.param("gamma"), self.param("beta")
        if not training:
            mean, var = self.param("moving_mean"), self.param("moving_variance")
            if x.shape.rank == 4:
                # The fused inference kernel: grappler folds Conv2D + FusedBatchNorm (+ ReLU)
                # into one oneDNN convolution, which mul/add ops would prevent.
                return tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=tf.reshape(gamma, [-1]), offset=tf.reshape(beta, [-1]), mean=tf.reshape(mean, [-1]),
                    variance=tf.reshape(var, [-1]), epsilon=self.epsilon, is_training=False)[0]
            return tf.nn.batch_normalization(x, mean, var, beta, gamma, self.epsilon)
        y, mean, var = self._normalize(x, gamma, beta)
        if self.state.replaying:
            return y
        if self._compact(self.group):  # back to full size; the mask keeps the others unchanged
            index = self.group.kept_index()[:, None]
            mean, var = (tf.reshape(tf.scatter_nd(index, tf.reshape(t, [-1]), [self.group.size]),
                                    self.gamma.shape) for t in (mean, var))
        rate = 1.0 - self.momentum if self.update_rate is None else self.update_rate
        if self.options is not None and self.group.masked:
            # Masked channels keep their statistics, so restoring a channel restores them too.
            rate = rate * (1.0 - self.options.freeze_bn) * tf.reshape(self.group.mask, self.gamma.shape)
        self.moving_mean.assign_sub((self.moving_mean - mean) * rate)
        self.moving_variance.assign_sub((self.moving_variance - var) * rate)
        return y

    def inference_affine(self):
        """`(scale, shift)`, 1-D over the current channels: the inference map `x * scale + shift`."""
        gamma, beta, mean, var = (tf.reshape(self.param(n), [-1]) for n in
                                  ("gamma", "beta", "moving_mean", "moving_variance"))
        scale = gamma * tf.math.rsqrt(var + self.epsilon)
        return scale, beta - mean * scale

    def _normalize(self, x, gamma, beta):
        """Batch-statistics normalisation: `(y, batch mean, biased batch variance)`, stats shaped like gamma.

        Images go through one fused kernel (FusedBatchNormV3: one pass for the statistics, one
        for the output, and a backward that keeps only x and the statistics), measured faster
        than `tf.nn.moments` + `tf.nn.batch_normalization` on CPU; it returns the unbiased
        variance, which is turned back into the biased one the moving statistics follow.
        """
        if x.shape.rank != 4:
            mean, var = tf.nn.moments(x, self.axes_rank, keepdims=True)
            return tf.nn.batch_normalization(x, mean, var, beta, gamma, self.epsilon), mean, var
        y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.reshape(gamma, [-1]), offset=tf.reshape(beta, [-1]), mean=tf.zeros([0]),
            variance=tf.zeros([0]), epsilon=self.epsilon, is_training=True)
        n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        var = var * tf.maximum(n - 1.0, 0.0) / n
        return y, tf.reshape(mean, tf.shape(gamma)), tf.reshape(var, tf.shape(gamma))

    def cost(self, width):
        return complexity.bn_cost(self.hw, width(self.group))
