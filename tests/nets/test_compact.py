"""Compact mode: a masked net computing on its kept channels only gives the masked outputs."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from tests.support.nets import assert_close_to_scale, input_for, lean_net, random_masks, randomise


def traced_with_widths(net):
    """`net(x, training)` traced, returning the logits and the channel count of every tapped
    activation (the `group` and `block` sites, where each group's activations are final); `keys[training]` lists
    the tapped groups, in order, once it has traced."""
    keys = {}

    @tf.function
    def forward(x, training):
        seen, widths = [], []

        def tap(site, h):
            if site.final:  # where the group's activations are final (EKG's gates)
                seen.append(site.group.key)
                widths.append(tf.shape(h)[-1])
            return h

        logits = net(x, training=training, tap=tap)
        keys[training] = seen
        return logits, tf.stack(widths)

    return forward, keys


def eager_with_widths(net, x, training):
    """`(logits, [(tapped group key, channel count)])` of an eager call."""
    seen = []
    logits = net(x, training=training,
                 tap=lambda site, h: (seen.append((site.group.key, h.shape[-1])) if site.final else None) or h)
    return logits, seen


# One net per kind of layer and group: CIFAR and bottleneck ResNets (residual streams, projection
# shortcuts), MobileNetV2 (depthwise groups), VGG-16 and LeNet-5 (dense layers, flattened maps), MLP.
# The deeper variants of each family run the same code paths, and so do the lean configs
# (tests/support/nets.py: VGG-16 at a quarter of its widths, MobileNetV2 on 16x16 inputs).
@pytest.mark.parametrize("arch", ["ResNet-8", "ResNet-50", "MobileNetV2", "VGG-16", "LeNet-5", "MLP"])
def test_compact_forward_equals_masked_forward(arch):
    # One bottleneck per stage: every code path of ResNet-50 (conv0, projections) at a quarter of its layers.
    config = dict(blocks=[1, 1, 1, 1]) if arch == "ResNet-50" else {}
    net = lean_net(arch, masked=True, **config)
    randomise(net)
    x = tf.constant(input_for(net, batch=3))
    net.options.set(renorm=True, freeze_bn=True)
    compact_net = lean_net(arch, masked=True, **config)
    compact_net.set_params(net.get_params())
    compact_net.options.set(renorm=True, freeze_bn=True, compact=True)
    # Compact mode is traced, as a search runs it (dynamic channel counts, no retracing); the
    # masked reference runs eagerly, which costs a deep net less than tracing it twice.
    compact_fn, compact_keys = traced_with_widths(compact_net)
    for seed in range(2):
        random_masks(net, seed=seed, single=list(net.prunable_groups())[seed % len(net.prunable_groups())])
        for key, group in net.prunable_groups().items():
            compact_net.groups[key].set_mask(group.mask_numpy())
        for training in (False, True):
            want, full = eager_with_widths(net, x, training)
            got, kept = compact_fn(x, training)
            what = f"{arch} seed={seed} training={training}"
            assert_close_to_scale(got.numpy(), want.numpy(), err_msg=what)
            # What compact mode is for: activations carry exactly the kept channels, where the
            # masked net carries every channel (the masked ones zero).
            assert full and compact_keys[training] == [key for key, _ in full], what
            assert [width for _, width in full] == [net.groups[key].size for key, _ in full], what
            assert list(kept.numpy()) == [compact_net.groups[key].active() for key, _ in full], what
    # Masks change, channel counts change, and nothing retraces (once per `training` value).
    assert compact_fn.experimental_get_tracing_count() == 2


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
