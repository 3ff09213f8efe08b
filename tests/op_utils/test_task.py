"""Tasks: what the engine trains. Frozen variables get no update at all; inputs can be trained."""

import numpy as np
import pytest
import tensorflow as tf

from op_utils.evaluate import Evaluator
from op_utils.optim import SGD, Adam
from op_utils.strategy import make_strategy
from op_utils.task import Classify, LossOut, Task
from op_utils.trainer import Trainer
from tests.support.toy import MLP, toy_data
from utils.errors import ConfigError

BATCH = 8


def _steps(trainer, strategy, x, y, steps=3):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).take(steps)
    return [float(trainer.train_step(b)["loss"]) for b in strategy.experimental_distribute_dataset(ds)]


@pytest.mark.parametrize("optimizer", [lambda: SGD(0.1, momentum=0.9, weight_decay=0.05),
                                       lambda: Adam(0.1, weight_decay=0.05)])
def test_variables_not_trained_are_bitwise_unchanged_with_weight_decay_and_momentum(optimizer):
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
        unreached = tf.Variable(np.ones([3], np.float32), name="unreached")  # trained, but the loss ignores it
    untouched = [model.w1, model.b1, unreached]  # two frozen, one trained that the loss never reaches
    before = [v.numpy().copy() for v in untouched]
    w2 = model.w2.numpy().copy()
    task = Classify(model, variables=[model.w2, model.b2, unreached])
    trainer = Trainer(strategy, task, optimizer(), global_batch_size=BATCH, accum=2)
    x, y = toy_data(BATCH * 3)
    _steps(trainer, strategy, x, y)
    for var, value in zip(untouched, before):
        np.testing.assert_array_equal(var.numpy(), value)
    assert not np.array_equal(model.w2.numpy(), w2)  # the trained ones moved
    assert [v.ref() for v in trainer.variables] == [v.ref() for v in (model.w2, model.b2, unreached)]


class Images(Task):
    """Optimise input images so that a frozen classifier assigns them target classes."""

    def __init__(self, model, count, dim, classes):
        super().__init__(name="images")
        self.model = model
        self.images = tf.Variable(tf.zeros([count, dim]), name="images")
        self.targets = tf.constant(np.arange(count) % classes, tf.int32)

    def variables_to_train(self):
        return [self.images]

    def loss(self, batch, training):
        (index,) = batch
        logits = self.model(tf.gather(self.images, index), training=False)
        targets = tf.gather(self.targets, index)
        return LossOut(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits), {}, logits, targets)

    def checkpoint_items(self):
        return {"images": self.images}


def test_a_task_whose_trainable_variables_are_its_inputs():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
        task = Images(model, count=16, dim=6, classes=5)
    weights = [v.numpy().copy() for v in model.trainable_variables]
    trainer = Trainer(strategy, task, Adam(0.2), global_batch_size=BATCH)
    ds = tf.data.Dataset.range(16).map(lambda i: (i,)).batch(BATCH).repeat(25)
    losses = [float(trainer.train_step(b)["loss"]) for b in strategy.experimental_distribute_dataset(ds)]
    assert losses[-1] < 0.5 * losses[0]
    assert np.abs(task.images.numpy()).max() > 0
    for var, value in zip(model.trainable_variables, weights):
        np.testing.assert_array_equal(var.numpy(), value)  # the classifier is frozen
    assert trainer.evaluator is None and trainer.checkpoint.images is task.images
    with pytest.raises(ConfigError, match="no model to evaluate"):
        trainer.evaluate(tf.data.Dataset.from_tensors((tf.zeros([1, 6]), tf.zeros([1], tf.int32))))


def test_the_trainer_needs_a_task_and_a_loss_that_reaches_its_variables():
    strategy = make_strategy(num_replicas=1)
    with strategy.scope():
        model = MLP()
        stray = tf.Variable(1.0)
    with pytest.raises(ConfigError, match="Task"):
        Trainer(strategy, model, SGD(0.1), global_batch_size=BATCH)
    trainer = Trainer(strategy, Classify(model, variables=[stray]), SGD(0.1), global_batch_size=BATCH)
    x, y = toy_data(BATCH)
    with pytest.raises(ConfigError, match="reaches none of the variables"):
        _steps(trainer, strategy, x, y, steps=1)


def test_evaluation_needs_no_optimizer_and_traces_once_with_a_partial_last_batch():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
    x, y = toy_data(23)
    evaluator = Evaluator(strategy, model)
    first = evaluator.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(5))  # 4 full batches, then 3
    again = evaluator.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(5))
    assert evaluator.trace_count == 1 and first == again and first["count"] == 23
    logits = model(x).numpy()
    assert first["top1"] == pytest.approx(np.mean(logits.argmax(1) == y))
