"""Masked layers written with plain TensorFlow ops on `tf.Module`s.

Each layer receives its input and output `ChannelGroup` when it is built. A masked layer
multiplies masks into its *parameters* (kernel, bias, BN gamma/beta), never into activations:
an output channel whose kernel column, bias, gamma and beta are all zero is exactly zero after
BatchNorm, in training and in inference mode, so the masked net computes what the slimmed net
computes at the cost of a few parameter-sized multiplies. Layers whose groups are all unmasked
run no mask op at all.

Parameter names follow the EKG reference pickles: `<scope>/kernel:0`, `<scope>/biases:0`,
`<scope>/gamma:0`, `<scope>/beta:0`, `<scope>/moving_mean:0`, `<scope>/moving_variance:0`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tensorflow as tf

from nets import complexity
from nets.groups import ChannelGroup, MaskOptions

_EPS = 1e-12
_replaying = [False]  # set only while a recomputed forward pass is traced (see `replaying`)


@contextlib.contextmanager
def replaying():
    """While active, layers skip the side effects of a training forward pass.

    `op_utils.recompute` runs a link of the net a second time to rebuild its activations for
    the backward pass; BatchNorm must not update its moving statistics twice. A trace-time
    switch, like `MaskOptions.compact`: it changes which ops are built, not their values.
    """
    previous, _replaying[0] = _replaying[0], True
    try:
        yield
    finally:
        _replaying[0] = previous


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "SAME":
        return math.ceil(size / stride)
    return math.ceil((size - kernel + 1) / stride)


def pad_axis(array: np.ndarray, axis: int, size: int, fill: float = 0.0) -> np.ndarray:
    """`array` grown to `size` along `axis`, the new entries (after the old ones) set to `fill`."""
    extra = size - array.shape[axis]
    if extra <= 0:
        return array
    shape = list(array.shape)
    shape[axis] = extra
    return np.concatenate([array, np.full(shape, fill, array.dtype)], axis)


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
    place, would only lose: batch 1 6.4-7.1 -> 8.6-8.9 ms)."""
    if training or bn.compactor is not None or len(x.shape) != 4:
        return bn(conv(x), training)
    return conv(x, affine=bn.inference_affine())


class Layer(tf.Module):
    """Base of the masked layers: a scope key, named variables and slicing."""

    def __init__(self, key: str, options: MaskOptions | None):
        super().__init__(name="".join(c if c.isalnum() else "_" for c in key))
        self.key = key
        self.options = options
        self.named = {}  # parameter name -> tf.Variable, in pickle order

    def _var(self, name, value, trainable=True, on_read=False):
        kwargs = {}
        if on_read:
            # Each replica updates its own moving statistics; reading them averages replicas.
            kwargs = dict(
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
            )
        var = tf.Variable(tf.cast(value, tf.float32), trainable=trainable, name=name, **kwargs)
        self.named[name] = var
        return var

    def groups(self) -> tuple:
        """The channel groups this layer touches."""
        raise NotImplementedError

    def cost(self, width) -> complexity.Cost:
        raise NotImplementedError

    def infer_widths(self, shapes: dict) -> dict:
        """Channel counts of this layer's groups implied by stored parameter shapes."""
        raise NotImplementedError

    def sliced(self) -> dict:
        """Numpy parameters of the slimmed layer: kept channels gathered, renorm baked in."""
        raise NotImplementedError

    def padded(self, width) -> dict:
        """Numpy parameters grown to `width(group)` channels per group, new channels inert (zero)."""
        raise NotImplementedError

    def _renorm_scale(self, full: np.ndarray, kept: np.ndarray) -> float:
        if self.options is None or float(self.options.renorm.numpy()) < 0.5:
            return 1.0
        return float(np.linalg.norm(full) / max(np.linalg.norm(kept), _EPS))

    def _compact(self, group: ChannelGroup) -> bool:
        return self.options is not None and self.options.compact and group.masked

    def _gather(self, tensor, group: ChannelGroup, axis: int):
        """`tensor` restricted to the kept channels of `group` along `axis` in compact mode."""
        return tf.gather(tensor, group.kept_index(), axis=axis) if self._compact(group) else tensor

    def _masked_kernel(self, kernel, mask):
        """kernel * mask, rescaled to the full kernel's norm when `options.renorm` is on."""
        masked = kernel * mask
        if self.options is None:
            return masked
        scale = tf.norm(kernel) / tf.maximum(tf.norm(masked), _EPS)
        return masked * (1.0 + self.options.renorm * (scale - 1.0))


class Conv2d(Layer):
    """2-D convolution from `in_group` channels to `out_group` channels.

    Args:
        key: scope of the parameters (`"BasicBlock0.0/conv1"`).
        in_group, out_group: the ChannelGroups of the input and output channels.
        kernel_size: int or (kh, kw).
        in_hw: spatial size of the input, used for complexity without running the model.
        strides, padding, use_bias: as in `tf.nn.conv2d`.
        options: the net's MaskOptions (None for an ordinary, unmasked net).
    """

    def __init__(self, key, in_group: ChannelGroup, out_group: ChannelGroup, kernel_size, in_hw,
                 strides=1, padding="SAME", use_bias=False, options=None):
        super().__init__(key, options)
        self.in_group, self.out_group = in_group, out_group
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides, self.padding, self.use_bias = int(strides), padding, use_bias
        self.out_hw = tuple(_out_size(s, k, self.strides, padding) for s, k in zip(in_hw, self.kernel_size))
        shape = [*self.kernel_size, in_group.size, out_group.size]
        self.kernel = self._var("kernel", he_fan_out(shape))
        self.biases = self._var("biases", tf.zeros([1, 1, 1, out_group.size])) if use_bias else None
        self._masked = in_group.masked or out_group.masked
        if not self._masked:
            self.options = None

    def groups(self):
        return (self.in_group, self.out_group)

    def __call__(self, x, affine=None):
        """The convolution; `affine = (scale, shift)` folds a per-output-channel affine map
        (an inference BatchNorm, see `conv_bn`) into the kernel and bias."""
        kernel, biases = self.kernel, self.biases
        if self._masked:
            mask = 1.0
            if self.in_group.masked:
                mask = mask * tf.reshape(self.in_group.mask, [1, 1, -1, 1])
            if self.out_group.masked:
                out_mask = tf.reshape(self.out_group.mask, [1, 1, 1, -1])
                mask = mask * out_mask
                biases = None if biases is None else biases * out_mask
            kernel = self._masked_kernel(kernel, mask)
            kernel = self._gather(self._gather(kernel, self.in_group, 2), self.out_group, 3)
            biases = None if biases is None else self._gather(biases, self.out_group, 3)
        if affine is not None:
            kernel, biases = _fold(kernel, biases, affine, [1, 1, 1, -1])
        return _add_bias(tf.nn.conv2d(x, kernel, self.strides, self.padding), biases)

    def cost(self, width):
        return complexity.conv_cost(self.out_hw, self.kernel_size, width(self.in_group),
                                    width(self.out_group), self.use_bias)

    def infer_widths(self, shapes):
        return {self.in_group.key: shapes["kernel"][2], self.out_group.key: shapes["kernel"][3]}

    def sliced(self):
        full = self.kernel.numpy()
        kernel = full[:, :, self.in_group.kept()][:, :, :, self.out_group.kept()]
        out = {"kernel": kernel * self._renorm_scale(full, kernel)}
        if self.use_bias:
            out["biases"] = self.biases.numpy()[..., self.out_group.kept()]
        return out

    def padded(self, width):
        kernel = pad_axis(pad_axis(self.kernel.numpy(), 2, width(self.in_group)), 3, width(self.out_group))
        out = {"kernel": kernel}
        if self.use_bias:
            out["biases"] = pad_axis(self.biases.numpy(), 3, width(self.out_group))
        return out


class DepthwiseConv2d(Layer):
    """Depthwise convolution (multiplier 1): its input and output are one group."""

    def __init__(self, key, group: ChannelGroup, kernel_size, in_hw, strides=1, padding="SAME",
                 use_bias=False, options=None):
        super().__init__(key, options)
        self.group = group
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides, self.padding, self.use_bias = int(strides), padding, use_bias
        self.out_hw = tuple(_out_size(s, k, self.strides, padding) for s, k in zip(in_hw, self.kernel_size))
        shape = [*self.kernel_size, group.size, 1]
        fan_in = self.kernel_size[0] * self.kernel_size[1]
        self.kernel = self._var("kernel", tf.random.truncated_normal(shape, stddev=math.sqrt(2.0 / fan_in) / 0.8796))
        self.biases = self._var("biases", tf.zeros([1, 1, 1, group.size])) if use_bias else None
        if not group.masked:
            self.options = None

    def groups(self):
        return (self.group,)

    def __call__(self, x, affine=None):
        """The convolution; `affine` as in `Conv2d.__call__`."""
        kernel, biases = self.kernel, self.biases
        if self.group.masked:
            mask = tf.reshape(self.group.mask, [1, 1, -1, 1])
            kernel = self._gather(self._masked_kernel(kernel, mask), self.group, 2)
            biases = None if biases is None else self._gather(biases * tf.reshape(mask, [1, 1, 1, -1]), self.group, 3)
        if affine is not None:
            kernel, biases = _fold(kernel, biases, affine, [1, 1, -1, 1])
        return _add_bias(tf.nn.depthwise_conv2d(x, kernel, [1, self.strides, self.strides, 1], self.padding), biases)

    def cost(self, width):
        c = width(self.group)
        return complexity.conv_cost(self.out_hw, self.kernel_size, c, c, self.use_bias, depthwise=True)

    def infer_widths(self, shapes):
        return {self.group.key: shapes["kernel"][2]}

    def sliced(self):
        full = self.kernel.numpy()
        kernel = full[:, :, self.group.kept()]
        out = {"kernel": kernel * self._renorm_scale(full, kernel)}
        if self.use_bias:
            out["biases"] = self.biases.numpy()[..., self.group.kept()]
        return out

    def padded(self, width):
        out = {"kernel": pad_axis(self.kernel.numpy(), 2, width(self.group))}
        if self.use_bias:
            out["biases"] = pad_axis(self.biases.numpy(), 3, width(self.group))
        return out


class FC(Layer):
    """Dense layer. `spatial` > 1 means the input is a flattened H*W*C map of `in_group`.

    Flattening is channel-last, so input feature `s * C + c` belongs to channel `c`.
    """

    def __init__(self, key, in_group: ChannelGroup, out_group: ChannelGroup, spatial=1, use_bias=True,
                 stddev=0.01, options=None):
        super().__init__(key, options)
        self.in_group, self.out_group, self.spatial, self.use_bias = in_group, out_group, int(spatial), use_bias
        shape = [in_group.size * self.spatial, out_group.size]
        self.kernel = self._var("kernel", tf.random.normal(shape, stddev=stddev))
        self.biases = self._var("biases", tf.zeros([1, out_group.size])) if use_bias else None
        self._masked = in_group.masked or out_group.masked
        if not self._masked:
            self.options = None

    def groups(self):
        return (self.in_group, self.out_group)

    def _in_index(self, kept: np.ndarray) -> np.ndarray:
        c = self.in_group.size
        return (np.arange(self.spatial)[:, None] * c + kept[None, :]).reshape([-1])

    def __call__(self, x):
        kernel, biases = self.kernel, self.biases
        if self._masked:
            mask = 1.0
            if self.in_group.masked:
                mask = mask * tf.reshape(tf.tile(self.in_group.mask, [self.spatial]), [-1, 1])
            if self.out_group.masked:
                out_mask = tf.reshape(self.out_group.mask, [1, -1])
                mask = mask * out_mask
                biases = None if biases is None else biases * out_mask
            kernel = self._masked_kernel(kernel, mask)
            if self._compact(self.in_group):
                kept, c = self.in_group.kept_index(), self.in_group.size
                rows = tf.range(self.spatial, dtype=kept.dtype)[:, None] * c + kept[None, :]
                kernel = tf.gather(kernel, tf.reshape(rows, [-1]), axis=0)
            kernel = self._gather(kernel, self.out_group, 1)
            biases = None if biases is None else self._gather(biases, self.out_group, 1)
        y = tf.matmul(x, kernel)
        return y if biases is None else y + biases

    def cost(self, width):
        return complexity.dense_cost(width(self.in_group) * self.spatial, width(self.out_group), self.use_bias)

    def infer_widths(self, shapes):
        return {self.in_group.key: shapes["kernel"][0] // self.spatial, self.out_group.key: shapes["kernel"][1]}

    def sliced(self):
        full = self.kernel.numpy()
        kernel = full[self._in_index(self.in_group.kept())][:, self.out_group.kept()]
        out = {"kernel": kernel * self._renorm_scale(full, kernel)}
        if self.use_bias:
            out["biases"] = self.biases.numpy()[:, self.out_group.kept()]
        return out

    def padded(self, width):
        # Rows are spatial-major (`s * C + c`): grow each position's block of C rows.
        kernel = self.kernel.numpy().reshape([self.spatial, self.in_group.size, -1])
        kernel = pad_axis(pad_axis(kernel, 1, width(self.in_group)).reshape([-1, kernel.shape[-1]]), 1,
                          width(self.out_group))
        out = {"kernel": kernel}
        if self.use_bias:
            out["biases"] = pad_axis(self.biases.numpy(), 1, width(self.out_group))
        return out


class BatchNorm(Layer):
    """Batch normalisation of the reference: momentum 0.9, epsilon 1e-5, [1,1,1,C] tensors.

    `training=True` normalises with batch statistics and updates the moving statistics
    (unless `options.freeze_bn` is on); `training=False` uses the moving statistics.

    `compactor` is None, or the ResRep compactor of the group (`nets/compactor.py`) applied to
    the normalised output; only `Net.add_compactors` sets it, before the net is first called.
    """

    def __init__(self, key, group: ChannelGroup, hw=(1, 1), rank=4, momentum=0.9, epsilon=1e-5,
                 gamma_init=1.0, options=None):
        super().__init__(key, options)
        self.group, self.hw, self.momentum, self.epsilon = group, tuple(hw), momentum, epsilon
        shape = [1] * (rank - 1) + [group.size]
        self.axes = list(range(rank - 1))
        self.gamma = self._var("gamma", tf.fill(shape, float(gamma_init)))
        self.beta = self._var("beta", tf.zeros(shape))
        self.moving_mean = self._var("moving_mean", tf.zeros(shape), trainable=False, on_read=True)
        self.moving_variance = self._var("moving_variance", tf.ones(shape), trainable=False, on_read=True)
        if not group.masked:
            self.options = None
        self.compactor = None

    def groups(self):
        return (self.group,)

    def _gamma_beta(self):
        """gamma and beta with the mask applied, gathered to the kept channels in compact mode."""
        gamma, beta = self.gamma, self.beta
        if self.group.masked:
            mask = tf.reshape(self.group.mask, gamma.shape)
            gamma, beta = gamma * mask, beta * mask
        return self._gather(gamma, self.group, -1), self._gather(beta, self.group, -1)

    def __call__(self, x, training=False):
        gamma, beta = self._gamma_beta()
        if training:
            y, mean, var = self._normalize(x, gamma, beta)
            if _replaying[0]:
                return y if self.compactor is None else self.compactor(y)
            if self._compact(self.group):  # back to full size; the mask keeps the others unchanged
                index = self.group.kept_index()[:, None]
                mean, var = (tf.reshape(tf.scatter_nd(index, tf.reshape(t, [-1]), [self.group.size]),
                                        self.gamma.shape) for t in (mean, var))
            rate = 1.0 - self.momentum
            if self.options is not None:
                # Masked channels keep their statistics, so restoring a channel restores them too.
                rate = rate * (1.0 - self.options.freeze_bn) * tf.reshape(self.group.mask, self.gamma.shape)
            self.moving_mean.assign_sub((self.moving_mean - mean) * rate)
            self.moving_variance.assign_sub((self.moving_variance - var) * rate)
        else:
            mean, var = (self._gather(t, self.group, -1) for t in (self.moving_mean, self.moving_variance))
            if x.shape.rank == 4:
                # The fused inference kernel: grappler folds Conv2D + FusedBatchNorm (+ ReLU)
                # into one oneDNN convolution, which mul/add ops would prevent.
                y = tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=tf.reshape(gamma, [-1]), offset=tf.reshape(beta, [-1]), mean=tf.reshape(mean, [-1]),
                    variance=tf.reshape(var, [-1]), epsilon=self.epsilon, is_training=False)[0]
            else:
                y = tf.nn.batch_normalization(x, mean, var, beta, gamma, self.epsilon)
        return y if self.compactor is None else self.compactor(y)

    def inference_affine(self):
        """`(scale, shift)`, 1-D over the current channels: the inference map `x * scale + shift`."""
        gamma, beta = (tf.reshape(t, [-1]) for t in self._gamma_beta())
        mean, var = (tf.reshape(self._gather(t, self.group, -1), [-1]) for t in (self.moving_mean, self.moving_variance))
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
            mean, var = tf.nn.moments(x, self.axes, keepdims=True)
            return tf.nn.batch_normalization(x, mean, var, beta, gamma, self.epsilon), mean, var
        y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.reshape(gamma, [-1]), offset=tf.reshape(beta, [-1]), mean=tf.zeros([0]),
            variance=tf.zeros([0]), epsilon=self.epsilon, is_training=True)
        n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        var = var * tf.maximum(n - 1.0, 0.0) / n
        return y, tf.reshape(mean, tf.shape(gamma)), tf.reshape(var, tf.shape(gamma))


    def cost(self, width):
        return complexity.bn_cost(self.hw, width(self.group))

    def infer_widths(self, shapes):
        return {self.group.key: shapes["gamma"][-1]}

    def sliced(self):
        kept = self.group.kept()
        return {name: var.numpy()[..., kept] for name, var in self.named.items()}

    def padded(self, width):
        # gamma = beta = 0: a new channel's output is 0 whatever its (zero) input and statistics.
        return {name: pad_axis(var.numpy(), -1, width(self.group), 1.0 if name == "moving_variance" else 0.0)
                for name, var in self.named.items()}
