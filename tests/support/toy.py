"""Tiny models and data for the op_utils tests, following the engine's model contract.

Weights come from a numpy ``RandomState`` so that every process (and every replica
count) starts from exactly the same numbers, without relying on TensorFlow's RNG.
"""
import time

import numpy as np
import tensorflow as tf


def _init(rng: np.random.RandomState, shape, scale: float) -> tf.Variable:
    return tf.Variable(rng.normal(0.0, scale, size=shape).astype(np.float32))


class MLP(tf.Module):
    """Dense -> ReLU -> Dense; no batch statistics."""

    def __init__(self, in_dim: int = 6, hidden: int = 16, classes: int = 5, seed: int = 0):
        super().__init__(name="mlp")
        rng = np.random.RandomState(seed)
        self.w1 = _init(rng, (in_dim, hidden), 1.0 / np.sqrt(in_dim))
        self.b1 = _init(rng, (hidden,), 0.1)
        self.w2 = _init(rng, (hidden, classes), 1.0 / np.sqrt(hidden))
        self.b2 = _init(rng, (classes,), 0.1)

    def __call__(self, x, training=False):
        del training
        h = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
        return tf.matmul(h, self.w2) + self.b2


class BatchNorm(tf.Module):
    """BN whose moving statistics are ON_READ/MEAN variables, updated when training."""

    def __init__(self, channels: int, momentum: float = 0.9, epsilon: float = 1e-3):
        super().__init__(name="bn")
        self.momentum = momentum
        self.epsilon = epsilon
        self.gamma = tf.Variable(tf.ones([channels]))
        self.beta = tf.Variable(tf.zeros([channels]))
        stat = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.MEAN)
        self.moving_mean = tf.Variable(tf.zeros([channels]), name="moving_mean", **stat)
        self.moving_var = tf.Variable(tf.ones([channels]), name="moving_var", **stat)

    def __call__(self, x, training=False):
        if training:
            axes = list(range(len(x.shape) - 1))
            mean, var = tf.nn.moments(x, axes)
            m = self.momentum
            self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * mean)
            self.moving_var.assign(m * self.moving_var + (1.0 - m) * var)
        else:
            mean, var = self.moving_mean, self.moving_var
        return tf.nn.batch_normalization(x, mean, var, self.beta, self.gamma, self.epsilon)


class ConvNet(tf.Module):
    """3x3 conv -> BN -> ReLU -> global average pool -> dense."""

    def __init__(self, channels: int = 3, filters: int = 4, classes: int = 5, seed: int = 0):
        super().__init__(name="convnet")
        rng = np.random.RandomState(seed)
        self.kernel = _init(rng, (3, 3, channels, filters), 0.3)
        self.bn = BatchNorm(filters)
        self.w = _init(rng, (filters, classes), 0.5)
        self.b = tf.Variable(tf.zeros([classes]))

    def __call__(self, x, training=False):
        h = tf.nn.conv2d(x, self.kernel, strides=1, padding="SAME")
        h = tf.nn.relu(self.bn(h, training=training))
        return tf.matmul(tf.reduce_mean(h, axis=[1, 2]), self.w) + self.b


def toy_data(n: int, in_dim: int = 6, classes: int = 5, seed: int = 1):
    """``n`` examples of one fixed, learnable but noisy task: float32 features, int32 labels.

    ``seed`` picks the examples; the task (a random linear map) is the same for all seeds,
    so data drawn with another seed serves as a test set.
    """
    proj = np.random.RandomState(1234).normal(size=(in_dim, classes)).astype(np.float32)
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, in_dim)).astype(np.float32)
    y = np.argmax(x @ proj + 0.5 * rng.normal(size=(n, classes)), axis=1).astype(np.int32)
    return x, y


def toy_images(n: int, size: int = 6, channels: int = 3, classes: int = 5, seed: int = 2):
    """``n`` small NHWC float32 images and int32 labels."""
    rng = np.random.RandomState(seed)
    x = rng.normal(1.0, 2.0, size=(n, size, size, channels)).astype(np.float32)
    y = rng.randint(0, classes, size=n).astype(np.int32)
    return x, y


def make_train_data_fn(features, labels, global_batch: int, *, step_delay: float = 0.0,
                       delay_from_epoch: int = 0, poison=None, fail_at=None):
    """A ``train_data_fn(epoch, input_context)`` for ``op_utils.loop.fit`` over arrays.

    Epoch ``e`` visits the examples in the order of ``RandomState(e).permutation``; global
    batch ``k`` is examples ``[k*B, (k+1)*B)`` of that order, split into consecutive
    per-replica chunks. Each input pipeline keeps the chunks of its own replicas, so any
    split into workers and replicas trains on the same global batches.

    Args:
        features, labels: The training arrays.
        global_batch: The global batch size ``B``.
        step_delay: Seconds to sleep per batch (lets a test kill the run mid-epoch).
        delay_from_epoch: The first epoch whose batches are slowed by ``step_delay``.
        poison: ``(epoch, step)``: that global batch's features become NaN.
        fail_at: ``(epoch, step)``: reading that global batch raises an error (a crash).
    """
    n = len(features)

    def train_data_fn(epoch, context):
        per_replica = context.get_per_replica_batch_size(global_batch)
        replicas = context.num_replicas_in_sync
        mine = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * mine
        order = np.random.RandomState(epoch).permutation(n)
        x, y = features[order].copy(), labels[order]
        if poison is not None and poison[0] == epoch:
            x[poison[1] * global_batch:(poison[1] + 1) * global_batch] = np.nan
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.batch(per_replica, drop_remainder=True).batch(replicas, drop_remainder=True)
        ds = ds.map(lambda a, b: (a[first:first + mine], b[first:first + mine])).unbatch()
        if fail_at is not None and fail_at[0] == epoch:
            limit = fail_at[1] * mine

            def crash(i, batch):
                check = tf.debugging.Assert(i < limit, ["simulated crash"])
                with tf.control_dependencies([check]):
                    return tf.nest.map_structure(tf.identity, batch)

            ds = ds.enumerate().map(crash)
        if step_delay and epoch >= delay_from_epoch:
            def slow(a, b):
                pause = tf.numpy_function(
                    lambda: np.float32(time.sleep(step_delay) or 0.0), [], tf.float32)
                pause.set_shape([])  # keep the batch shape static
                return a + pause, b
            ds = ds.map(slow)
        return ds

    return train_data_fn
