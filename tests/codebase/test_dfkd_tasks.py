"""`Reconstruct`: every objective is zero at its own target and falls under Adam; the gradient of
a shard equals the gradient of each reference batch's mean objective; dropout masks and BN
statistics enter as they should."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.dfkd_tasks import OBJECTIVES, Priors, Reconstruct
from nets.layers import BatchNorm
from nets.sites import Record
from op_utils.optim import Adam
from op_utils.trainer import Trainer
from tests.support.nets import randomise

SITES = ["fc1:out", "fc2:out", "logits:out"]
T = 2.0


def _mlp():
    net = nets.build("MLP", masked=False, hidden=[6, 5], input_size=4, channels=1, num_classes=3)
    randomise(net, seed=3)
    return net


def _images(n=8, seed=0, size=4, channels=1):
    return np.random.default_rng(seed).normal(size=(n, size, size, channels)).astype(np.float32)


def _values(net, x):
    record = Record(set(SITES))
    net(tf.constant(x), training=False, tap=record)
    values = {s: record.values[s].numpy().reshape(len(x), -1) for s in SITES}
    values["logits:out"] = values["logits:out"] / T
    return values


def _task(objective, net, x, targets_from, batch=4, **kw):
    """The task on images `x`, with targets that are the teacher's values on `targets_from`."""
    if objective == "bn_stats":  # no metadata, no recorded sites
        return Reconstruct(net, x, objective, batch, **kw)
    values = _values(net, targets_from)
    if objective.startswith("spectral"):
        signal = np.concatenate([values[s] for s in SITES], axis=1)
        basis = np.linalg.qr(np.random.default_rng(1).normal(size=(signal.shape[1], 4)))[0].astype(np.float32)
        kw["spectral"] = {"all": (SITES, basis, signal @ basis)}
    else:
        kw["layer_targets"] = values
    return Reconstruct(net, x, objective, batch, temperature=T, sites=SITES, **kw)


def _objective(task, n, labels=None):
    batch = (tf.range(n, dtype=tf.int64), tf.constant(np.arange(n) % 3 if labels is None else labels))
    return task.loss(batch, training=True).extras["objective"].numpy()


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o != "bn_stats"])
def test_each_statistics_objective_is_zero_at_its_target_and_falls_under_adam(objective):
    net, x = _mlp(), _images()
    dropout = None
    if objective == "all_layers_dropout":  # all-ones masks at keep 1: the plain forward pass
        dropout = {"fc1:in": (np.ones((8, 16)), 1.0), "fc2:in": (np.ones((8, 6)), 1.0)}
    at_target = _task(objective, net, x, x, dropout=dropout)
    np.testing.assert_allclose(_objective(at_target, 8), 0.0, atol=1e-10)
    task = _task(objective, net, _images(seed=5), x, dropout=dropout)
    trainer = Trainer(tf.distribute.get_strategy(), task, Adam(0.05), global_batch_size=8)
    before = _objective(task, 8).mean()
    batch = (tf.range(8, dtype=tf.int64), tf.constant(np.arange(8) % 3))
    for _ in range(30):
        trainer.train_step(tf.data.Dataset.from_tensors(batch).get_single_element())
    assert _objective(task, 8).mean() < 0.5 * before
    assert not any(v is task.images for v in net.trainable_variables)  # only the images are trained


def test_dropout_masks_scale_the_dropped_inputs_as_inverted_dropout():
    net, x = _mlp(), _images()
    rng = np.random.default_rng(0)
    mask = rng.binomial(1, 0.5, size=(8, 6)).astype(np.float32)
    task = _task("all_layers_dropout", net, x, x, dropout={"fc2:in": (mask, 0.5)})
    record = Record({"fc2:in", "fc2:out"})
    net(tf.constant(x), training=False, tap=record)
    plain_in = record.values["fc2:in"].numpy()
    got = Record({"fc2:out"})
    from nets.sites import Replace, chain
    replace = Replace({"fc2:in": lambda v: v * mask / 0.5})
    net(tf.constant(x), training=False, tap=chain(replace, got))
    w, b = net.layers["fc2"].kernel.numpy(), net.layers["fc2"].biases.numpy()
    np.testing.assert_allclose(got.values["fc2:out"].numpy(), (plain_in * mask / 0.5) @ w + b, rtol=1e-5, atol=1e-6)
    assert _objective(task, 8).max() > 0  # the targets were made without the masks


def test_a_shard_gradient_is_each_reference_batch_gradient_of_its_mean_objective():
    net, x = _mlp(), _images(n=8)
    targets = _images(n=8, seed=9)
    shard = _task("all_layers", net, x, targets, batch=4)
    alone = _task("all_layers", net, x[4:], targets[4:], batch=4)
    with tf.GradientTape() as tape:
        out = shard.loss((tf.range(8, dtype=tf.int64), tf.constant(np.arange(8) % 3)), training=True)
        loss = tf.reduce_sum(out.per_example) / 8  # what the engine minimises
    grad = tf.convert_to_tensor(tape.gradient(loss, shard.images)).numpy()
    with tf.GradientTape() as tape:
        out = alone.loss((tf.range(4, dtype=tf.int64), tf.constant(np.arange(4) % 3)), training=True)
        batch_mean = tf.reduce_mean(out.extras["objective"])  # the original's loss of that batch
    np.testing.assert_allclose(grad[4:], tf.convert_to_tensor(tape.gradient(batch_mean, alone.images)).numpy(), rtol=1e-5, atol=1e-9)


def _match_bn_statistics(net, x, groups):
    """Set every BN's moving statistics to its input's statistics over the first `x / groups` images."""
    first = tf.constant(x[: len(x) // groups])
    for layer in (l for l in net.layers.values() if isinstance(l, BatchNorm)):
        record = Record(lambda site, layer=layer: site.kind == "layer_in" and site.layer is layer)
        net(first, training=False, tap=record)
        value = next(iter(record.values.values()))
        mean, var = tf.nn.moments(value, axes=[0, 1, 2])
        layer.moving_mean.assign(tf.reshape(mean, layer.moving_mean.shape))
        layer.moving_variance.assign(tf.reshape(var, layer.moving_variance.shape))


def test_bn_stats_is_zero_when_the_batch_statistics_are_the_stored_ones_and_falls_under_adam():
    net = nets.build("ResNet-8", masked=False, num_classes=3, input_size=8)
    randomise(net, seed=2)
    x = np.tile(_images(n=4, size=8, channels=3), [2, 1, 1, 1])  # two batches of 4 identical images
    _match_bn_statistics(net, x, 2)
    quiet = Priors(bn=1.0, ce=0.0, tv=0.0, l2=0.0)
    np.testing.assert_allclose(_objective(_task("bn_stats", net, x, x, priors=quiet), 8), 0.0, atol=1e-4)
    task = _task("bn_stats", net, _images(n=8, size=8, channels=3, seed=4), x, priors=Priors(jitter=1))
    labels = np.arange(8) % 3
    out = task.loss((tf.range(8, dtype=tf.int64), tf.constant(labels), tf.constant([[1, -1]] * 8)), training=True)
    assert set(out.extras) == {"objective", "ce", "bn", "tv"}
    bn = out.extras["bn"].numpy()
    assert bn[0] == bn[3] and bn[4] == bn[7] and bn[0] != bn[4]  # one term per batch of 4, on each image
    trainer = Trainer(tf.distribute.get_strategy(), task, Adam(0.1), global_batch_size=8)
    before = out.extras["objective"].numpy().mean()
    batch = (tf.range(8, dtype=tf.int64), tf.constant(labels), tf.zeros([8, 2], tf.int32))
    for _ in range(30):
        trainer.train_step(tf.data.Dataset.from_tensors(batch).get_single_element())
    assert _objective(task, 8, labels).mean() < before
    with pytest.raises(ValueError, match="no BatchNorm"):
        Reconstruct(_mlp(), _images(), "bn_stats", 4)
