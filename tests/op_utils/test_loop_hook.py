"""The fit loop's `on_step_end` hook: when it runs, its scalars, and that what it assigns is saved."""
import os

import tensorflow as tf

from op_utils.loop import fit
from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.task import Classify
from op_utils.trainer import Trainer
from tests.support.toy import MLP
from tests.op_utils.test_loop import BATCH, data_fn, summary_tags


def test_step_hook_runs_after_every_step_and_its_state_is_checkpointed(tmp_path):
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
        model.marker = tf.Variable(0.0, trainable=False)  # stands for a mask the hook updates
    trainer = Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=BATCH)
    steps = []

    def hook(step):
        steps.append(step)
        model.marker.assign(float(step))
        return {"marker": float(step)}

    fit(trainer, data_fn(), epochs=2, steps_per_epoch=3, train_path=str(tmp_path), on_step_end=hook,
        log_every_steps=1)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "train/marker" in summary_tags(str(tmp_path))
    reader = tf.train.load_checkpoint(os.path.join(str(tmp_path), "ckpt", "ckpt-3"))
    [key] = [k for k in reader.get_variable_to_shape_map() if k.startswith("model/marker/")]
    assert reader.get_tensor(key) == 3.0
