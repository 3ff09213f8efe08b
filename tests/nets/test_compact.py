"""Compact mode: a masked net computing on its kept channels only gives the masked outputs."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from tests.nets.helpers import input_for, random_masks, randomise, small_net


# One net per kind of layer and group: CIFAR and bottleneck ResNets (residual streams, projection
# shortcuts), MobileNetV2 (depthwise groups), VGG-16 and LeNet-5 (dense layers, flattened maps), MLP.
# The deeper variants of each family run the same code paths.
@pytest.mark.parametrize("arch", ["ResNet-20", "ResNet-50", "MobileNetV2", "VGG-16", "LeNet-5", "MLP"])
def test_compact_forward_equals_masked_forward(arch):
    net = small_net(arch, masked=True)
    randomise(net)
    x = tf.constant(input_for(net, batch=3))
    net.options.set(renorm=True, freeze_bn=True)
    masked_fn = tf.function(lambda x, training: net(x, training=training))
    compact_net = small_net(arch, masked=True)
    compact_net.set_params(net.get_params())
    compact_net.options.set(renorm=True, freeze_bn=True, compact=True)
    compact_fn = tf.function(lambda x, training: compact_net(x, training=training))
    for seed in range(2):
        random_masks(net, seed=seed, single=list(net.prunable_groups())[seed % len(net.prunable_groups())])
        for key, group in net.prunable_groups().items():
            compact_net.groups[key].set_mask(group.mask_numpy())
        for training in (False, True):
            want = masked_fn(x, training).numpy()
            scale = max(1.0, float(np.abs(want).max()))  # deep random nets reach large logits
            np.testing.assert_allclose(compact_fn(x, training).numpy() / scale, want / scale, atol=1e-4,
                                       err_msg=f"{arch} training={training}")
    # Masks change, channel counts change, and nothing retraces (once per `training` value).
    assert len(compact_fn._list_all_concrete_functions()) == 2


def test_compact_batch_statistics_update_only_kept_channels():
    net = nets.build("ResNet-20", input_size=8, num_classes=4, masked=True)
    randomise(net)
    net.options.set(compact=True)
    group = net.layers["bn"].group
    group.keep([0, 2, 5])
    bn = net.layers["bn"]
    before = bn.moving_mean.numpy().copy()
    net(tf.constant(input_for(net, batch=4)), training=True)
    after = bn.moving_mean.numpy()
    changed = np.flatnonzero(np.abs(after - before).reshape(-1) > 0)
    assert list(changed) == [0, 2, 5]
