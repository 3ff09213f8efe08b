"""Net.set_recompute: training with recomputed segments equals training without, in every engine mode."""

import numpy as np
import pytest
import tensorflow as tf

from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.trainer import Trainer
from tests.nets.helpers import input_for, random_masks, randomise, small_net

BATCH = 8


def train(remat, replicas, accum, xla, steps=2):
    """(losses, every param after `steps` steps) of a masked ResNet-20 with random params and masks."""
    strategy = make_strategy(num_replicas=replicas)
    with strategy.scope():
        net = small_net("ResNet-20")
    randomise(net)
    random_masks(net, seed=2)
    net.set_recompute(remat)
    trainer = Trainer(strategy, net, SGD(0.05, momentum=0.9, weight_decay=1e-4), global_batch_size=BATCH,
                      accum=accum, xla=xla)
    x = input_for(net, batch=BATCH * steps, seed=1)
    y = np.arange(BATCH * steps) % 10
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    losses = [float(trainer.train_step(b)["loss"]) for b in strategy.experimental_distribute_dataset(ds)]
    return losses, net.get_params()


@pytest.fixture(scope="module")
def plain():
    return train(remat=False, replicas=2, accum=2, xla=False)


@pytest.mark.parametrize("replicas,accum,xla", [(2, 2, False), (1, 1, True)])
def test_recomputed_training_equals_plain_training(plain, replicas, accum, xla):
    want_losses, want = plain if (replicas, accum) == (2, 2) else train(False, replicas, accum, xla)
    losses, got = train(True, replicas, accum, xla)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert want_losses[0] != want_losses[1]  # the params did move
    for key, value in want.items():
        # Moving statistics included: updated once per micro-batch, as without recomputation.
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_recompute_leaves_inference_and_taps_alone():
    net = small_net("ResNet-20")
    randomise(net)
    x = input_for(net, batch=2)
    want = net(x, training=False).numpy()
    net.set_recompute(True)
    np.testing.assert_array_equal(net(x, training=False).numpy(), want)
    seen = []
    net(x, training=True, tap=lambda group, h: seen.append(group.key) or h)
    assert "stem" in seen
