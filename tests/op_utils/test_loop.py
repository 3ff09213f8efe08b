"""The fit loop in-process: outputs, NaN handling, resume from a crash, argument checks."""
import glob
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from op_utils.loop import fit
from op_utils.optim import SGD
from op_utils.schedules import StepDecay
from op_utils.strategy import make_strategy
from op_utils.task import Classify
from op_utils.trainer import Trainer
from tests.support.toy import MLP, make_train_data_fn, toy_data
from utils.errors import ConfigError, TrainingError

BATCH = 8


def make_trainer(replicas=2, epochs=2, steps_per_epoch=3, loss_fn=None, **kwargs):
    strategy = make_strategy(num_replicas=replicas)
    with strategy.scope():
        model = MLP()
    schedule = StepDecay(0.1, epochs * steps_per_epoch, decay_points=(0.5,))
    task = Classify(model) if loss_fn is None else Classify(model, loss_fn)
    return Trainer(strategy, task, SGD(schedule, weight_decay=1e-3), global_batch_size=BATCH, **kwargs)


def nan_carrying_loss(model, batch, training):
    """Cross-entropy that is NaN whenever an input is. oneDNN's fused MatMul+BiasAdd+ReLU turns a
    NaN input into 0 on some CPUs (TF 2.21, AVX-512), so NaN features alone need not poison the loss."""
    x, y = batch
    logits = model(x, training=training)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
    return loss + 0.0 * tf.reduce_sum(x, axis=-1), logits, {}


def nan_gradient_loss(model, batch, training):
    """Cross-entropy that stays finite on a poisoned batch while its gradients are NaN: what a NaN
    weight behind a NaN-swallowing fused ReLU looks like to the loop."""
    x, y = batch
    poisoned = tf.reduce_any(tf.math.is_nan(x))

    @tf.custom_gradient
    def poison_gradient(logits):
        return tf.identity(logits), lambda dy: dy * tf.where(poisoned, float("nan"), 1.0)

    logits = poison_gradient(model(tf.where(tf.math.is_nan(x), 0.0, x), training=training))
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits), logits, {}


def data_fn(steps_per_epoch=3, **kwargs):
    x, y = toy_data(BATCH * steps_per_epoch)
    return make_train_data_fn(x, y, BATCH, **kwargs)


def eval_data():
    x, y = toy_data(21, seed=5)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


def checkpoints(train_path):
    return sorted(os.path.basename(p)[:-len(".index")]
                  for p in glob.glob(os.path.join(train_path, "ckpt", "*.index")))


def summary_tags(train_path):
    tags = set()
    for path in glob.glob(os.path.join(train_path, "tensorboard", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs of three steps with evaluation: `(trainer, logs, epoch-end calls, train path)`.
    Tests that write into the run work on a copy."""
    tf.random.set_seed(0)  # as tests/conftest.py does for each test
    path = str(tmp_path_factory.mktemp("fitted"))
    trainer = make_trainer()
    seen = []
    logs = fit(trainer, data_fn(), epochs=2, steps_per_epoch=3, train_path=path,
               eval_data=eval_data(),
               on_epoch_end=lambda epoch, logs: seen.append((epoch, dict(logs))),
               log_every_steps=1)
    return trainer, logs, seen, path


def test_fit_trains_evaluates_logs_and_checkpoints(fitted):
    trainer, logs, seen, path = fitted
    assert [e for e, _ in seen] == [0, 1]
    assert logs["epoch"] == 2 and logs["step"] == 6 and logs["eval_count"] == 21
    assert logs == seen[-1][1]
    assert logs["lr"] == pytest.approx(0.02)  # decayed at step 3 of 6
    assert 0.0 <= logs["eval_top1"] <= logs["eval_top5"] <= 1.0
    assert checkpoints(path) == ["ckpt-3", "ckpt-6"]
    assert int(trainer.epoch.numpy()) == 2 and int(trainer.step_in_epoch.numpy()) == 0
    assert {"train/loss", "train/top1", "train/lr", "eval/top1", "eval/top5",
            "eval/loss"} <= summary_tags(path)


def test_resume_after_a_crash_mid_epoch_ends_where_an_uninterrupted_run_ends(tmp_path):
    kwargs = dict(epochs=3, steps_per_epoch=4, eval_data=None, ckpt_every_steps=3)
    whole = make_trainer(epochs=3, steps_per_epoch=4)
    whole_logs = fit(whole, data_fn(4), train_path=str(tmp_path / "a"), **kwargs)

    crashed = make_trainer(epochs=3, steps_per_epoch=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="simulated crash"):
        fit(crashed, data_fn(4, fail_at=(1, 3)), train_path=str(tmp_path / "b"), **kwargs)
    # The last checkpoint is from global step 6, two steps into epoch 1 (0-based).
    assert checkpoints(str(tmp_path / "b"))[-1] == "ckpt-6"

    resumed = make_trainer(epochs=3, steps_per_epoch=4)
    logs = fit(resumed, data_fn(4), train_path=str(tmp_path / "b"), resume=True, **kwargs)
    assert int(resumed.global_step.numpy()) == 12
    assert int(resumed.optimizer.iterations.numpy()) == 12
    pairs = zip(resumed.model.trainable_variables, whole.model.trainable_variables, strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert logs["loss"] == pytest.approx(whole_logs["loss"], rel=1e-6)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    trainer = make_trainer(loss_fn=nan_carrying_loss)
    ckpt_dir = os.path.join(str(tmp_path), "ckpt")
    with pytest.raises(TrainingError) as err:
        # Epoch 1, step 1 (0-based) is global step 5; every step is checkpointed.
        fit(trainer, data_fn(poison=(1, 1)), epochs=2, steps_per_epoch=3,
            train_path=str(tmp_path), ckpt_every_steps=1)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"loss is NaN at step 5 (epoch 2); last checkpoint kept at "
                       f"{os.path.join(ckpt_dir, 'ckpt-4')}")
    assert checkpoints(str(tmp_path)) == ["ckpt-3", "ckpt-4"]
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
    # The kept checkpoint is complete and finite.
    fresh = make_trainer()
    fresh.checkpoint.restore(tf.train.latest_checkpoint(ckpt_dir)).assert_existing_objects_matched()
    assert int(fresh.global_step.numpy()) == 4
    assert all(np.isfinite(v.numpy()).all() for v in fresh.model.trainable_variables)


def test_nan_gradients_behind_a_finite_loss_stop_the_run_too(tmp_path):
    trainer = make_trainer(loss_fn=nan_gradient_loss)
    with pytest.raises(TrainingError, match=r"^gradient norm is NaN at step 5 \(epoch 2\); last checkpoint kept at "):
        fit(trainer, data_fn(poison=(1, 1)), epochs=2, steps_per_epoch=3, train_path=str(tmp_path),
            ckpt_every_steps=1)
    assert checkpoints(str(tmp_path)) == ["ckpt-3", "ckpt-4"]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    trainer = make_trainer()
    with caplog.at_level(logging.INFO, logger="op_utils.loop"):
        logs = fit(trainer, data_fn(), epochs=1, steps_per_epoch=3, train_path=str(tmp_path),
                   resume=True)
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert logs["step"] == 3
    # Running again with the same target has nothing left to do.
    again = make_trainer()
    logs = fit(again, data_fn(), epochs=1, steps_per_epoch=3, train_path=str(tmp_path),
               resume=True)
    assert logs == {"epoch": 1, "step": 3}


def test_existing_checkpoints_need_resume(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted[3], run)
    assert checkpoints(str(run))  # a finished run's checkpoints
    with pytest.raises(ConfigError, match="resume"):
        fit(make_trainer(), data_fn(), epochs=1, steps_per_epoch=3, train_path=str(run))


def test_data_must_be_batched_per_replica_with_drop_remainder(tmp_path):
    x, y = toy_data(24)

    def unbatched_remainder(epoch, context):
        del epoch
        size = context.get_per_replica_batch_size(BATCH)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(size)

    with pytest.raises(ConfigError, match="drop_remainder"):
        fit(make_trainer(), unbatched_remainder, epochs=1, steps_per_epoch=3,
            train_path=str(tmp_path))


@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(steps_per_epoch=-1),
                                    dict(ckpt_every_steps=0), dict(epochs=1.5)])
def test_bad_loop_arguments(tmp_path, kwargs):
    args = dict(epochs=1, steps_per_epoch=3, train_path=str(tmp_path))
    args.update(kwargs)
    with pytest.raises(ConfigError):
        fit(make_trainer(), data_fn(), **args)


def test_checkpoint_carries_the_random_generator_state(tmp_path):
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
    rng = tf.random.Generator.from_seed(7)
    trainer = Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=BATCH, rng=rng)
    rng.normal([3])
    path = trainer.checkpoint.save(str(tmp_path / "ckpt"))
    expected = rng.normal([3]).numpy()
    rng.normal([5])  # move on, then come back
    trainer.checkpoint.restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(rng.normal([3]).numpy(), expected)
