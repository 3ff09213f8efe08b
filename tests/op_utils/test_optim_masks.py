"""Update masks freeze entries against gradient, weight decay and momentum; `reset` zeroes the slots;
a task's `after_step` asks the loop for that reset."""

import numpy as np
import pytest
import tensorflow as tf

from op_utils import loop
from op_utils.optim import SGD, Adam
from op_utils.strategy import make_strategy
from op_utils.task import Classify
from op_utils.trainer import Trainer


@pytest.mark.parametrize("make", [lambda: SGD(0.1, momentum=0.9, weight_decay=0.1), lambda: Adam(0.1, weight_decay=0.1)])
def test_masked_entries_never_change_and_the_others_do(make):
    var = tf.Variable(np.arange(1.0, 7.0, dtype=np.float32))
    mask = tf.Variable(np.array([1, 0, 1, 0, 1, 0], np.float32), trainable=False)
    optimizer = make()
    optimizer.build([var], masks=lambda v: mask if v is var else None)
    for _ in range(3):
        optimizer.apply([(tf.ones(6), var)])
    after = var.numpy()
    np.testing.assert_array_equal(after[1::2], [2.0, 4.0, 6.0])
    assert np.all(after[0::2] != [1.0, 3.0, 5.0])


def test_reset_zeroes_every_slot_and_keeps_the_step_count():
    var = tf.Variable(np.ones(4, np.float32))
    optimizer = Adam(0.1)
    optimizer.build([var])
    optimizer.apply([(tf.ones(4), var)])
    assert all(np.any(slot.numpy() != 0) for slot in optimizer.slots[0])
    optimizer.reset()
    assert all(np.all(slot.numpy() == 0) for slot in optimizer.slots[0]) and int(optimizer.iterations.numpy()) == 1


class _Linear(tf.Module):
    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.normal([4, 3], seed=1))

    def __call__(self, x, training=False):
        return tf.matmul(x, self.kernel)


class _ResettingTask(Classify):
    """A classifier whose `after_step` asks for a reset after step 2."""

    def after_step(self, step):
        return step == 2


def test_the_loop_resets_the_optimizer_when_the_task_asks(tmp_path):
    strategy = make_strategy(num_replicas=1)
    with strategy.scope():
        model = _Linear()
    trainer = Trainer(strategy, _ResettingTask(model), SGD(0.1, momentum=0.9), global_batch_size=4)
    seen = {}

    def on_step_end(step):
        seen[step] = float(tf.reduce_sum(tf.abs(trainer.optimizer.slots[0][0])).numpy())

    data = tf.data.Dataset.from_tensor_slices((np.ones([16, 4], np.float32), np.arange(16) % 3)).batch(4, drop_remainder=True)
    loop.fit(trainer, lambda epoch, ctx: data, epochs=1, steps_per_epoch=3, train_path=str(tmp_path),
             on_step_end=on_step_end)
    assert seen[1] > 0 and seen[2] == 0 and seen[3] > 0
