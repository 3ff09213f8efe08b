"""Evaluation is exact over partial batches; BN moving statistics under two replicas."""
import numpy as np
import pytest
import tensorflow as tf

from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.task import Classify
from op_utils.trainer import Trainer
from tests.support.toy import MLP, ConvNet, toy_data, toy_images
from utils.errors import DataError


def numpy_metrics(logits, labels):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    target = logits[np.arange(len(labels)), labels]
    rank = (logits > target[:, None]).sum(1)  # classes scoring strictly higher
    return {"top1": np.mean(rank < 1), "top5": np.mean(rank < 5),
            "loss": -logp[np.arange(len(labels)), labels].mean(), "count": len(labels)}


def test_exact_metrics_with_a_partial_last_batch_on_two_replicas():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP(classes=9, seed=3)
    trainer = Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=4)
    x, y = toy_data(13, classes=9, seed=7)
    # 13 = 4 + 4 + 4 + 1: the last batch leaves one replica with no example at all.
    got = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    w1, b1, w2, b2 = (v.numpy() for v in (model.w1, model.b1, model.w2, model.b2))
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    want = numpy_metrics(logits, y)
    assert got["count"] == 13
    for key in ("top1", "top5", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert 0 < want["top1"] < want["top5"] < 1  # the test data exercise both metrics


def test_a_replica_left_empty_by_the_last_batch_of_a_conv_net():
    # 9 = 4 + 4 + 1: one replica gets no image. Its convolution (3 -> 4 channels) must not run:
    # on some CPUs oneDNN returns the empty input's shape and BN would fail on 3 channels.
    strategy, model, trainer = _bn_trainer(global_batch=4)
    x, y = toy_images(9)
    got = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    want = numpy_metrics(model(x, training=False).numpy(), y)
    assert got["count"] == 9
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["top1"] == pytest.approx(want["top1"])


def test_empty_evaluation_set_is_a_data_error():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
    trainer = Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=4)
    x, y = toy_data(0)
    with pytest.raises(DataError, match="empty"):
        trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))


def _bn_trainer(global_batch=8):
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = ConvNet()
    return strategy, model, Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=global_batch)


def test_evaluation_uses_moving_statistics_and_leaves_them_alone():
    strategy, model, trainer = _bn_trainer()
    model.bn.moving_mean.assign([0.5, -0.2, 0.1, 0.3])
    model.bn.moving_var.assign([2.0, 0.5, 1.5, 1.0])
    x, y = toy_images(10)
    got = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    want = numpy_metrics(model(x, training=False).numpy(), y)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["top1"] == pytest.approx(want["top1"])
    for copy in model.bn.moving_mean.values:  # evaluation updated nothing on any replica
        np.testing.assert_allclose(copy.numpy(), [0.5, -0.2, 0.1, 0.3], rtol=1e-6)
    for copy in model.bn.moving_var.values:
        np.testing.assert_allclose(copy.numpy(), [2.0, 0.5, 1.5, 1.0], rtol=1e-6)
    # Batch statistics would have given another loss.
    batch_stats = numpy_metrics(model(x, training=True).numpy(), y)
    assert batch_stats["loss"] != pytest.approx(want["loss"], rel=1e-3)


def test_bn_moving_statistics_are_the_mean_of_the_replicas_updates(tmp_path):
    strategy, model, trainer = _bn_trainer()
    x, y = toy_images(8)
    kernel = model.kernel.numpy()
    ds = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    trainer.train_step(next(iter(ds)))

    # Each replica saw 4 images and updated its copy: 0.9 * 0 + 0.1 * its batch mean.
    conv = tf.nn.conv2d(x, kernel, strides=1, padding="SAME").numpy()
    per_replica = [0.1 * conv[:4].mean((0, 1, 2)), 0.1 * conv[4:].mean((0, 1, 2))]
    local = [c.numpy() for c in model.bn.moving_mean.values]
    np.testing.assert_allclose(local[0], per_replica[0], rtol=1e-5)
    np.testing.assert_allclose(local[1], per_replica[1], rtol=1e-5)
    assert not np.allclose(local[0], local[1])
    mean = (per_replica[0] + per_replica[1]) / 2
    np.testing.assert_allclose(model.bn.moving_mean.numpy(), mean, rtol=1e-5)

    # The checkpoint stores the mean, and a fresh model restores it.
    path = trainer.checkpoint.save(str(tmp_path / "ckpt"))
    fresh = ConvNet(seed=9)
    tf.train.Checkpoint(model=fresh).restore(path).expect_partial()
    np.testing.assert_allclose(fresh.bn.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(fresh.kernel.numpy(), model.kernel.numpy())


def test_bn_net_with_xla_and_accumulation_matches_the_plain_step():
    results = []
    for xla in (False, True):
        strategy, model, trainer = _bn_trainer()
        trainer = Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=8, accum=2, xla=xla)
        x, y = toy_images(16)
        ds = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
        losses = [float(trainer.train_step(b)["loss"]) for b in ds]
        # 16 = 5 + 5 + 5 + 1: the compiled forward also meets an empty replica batch.
        evaluation = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(5))
        results.append((losses, model.bn.moving_mean.numpy(), model.bn.moving_var.numpy(),
                        [v.numpy() for v in model.trainable_variables], evaluation))
    (loss0, mean0, var0, weights0, eval0), (loss1, mean1, var1, weights1, eval1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    np.testing.assert_allclose(mean1, mean0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var1, var0, rtol=1e-5)
    for a, b in zip(weights1, weights0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert eval1["count"] == eval0["count"] == 16
    assert eval1["loss"] == pytest.approx(eval0["loss"], rel=1e-5)
