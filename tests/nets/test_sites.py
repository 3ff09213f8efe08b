"""Activation sites: every net names them, a Record keeps them in one trace, a Replace changes them."""

import numpy as np
import pytest
import tensorflow as tf

from nets.sites import Record, Replace
from tests.support.nets import family_representatives, input_for, lean_net, randomise, small_net


@pytest.mark.parametrize("arch", family_representatives())
def test_sites_are_unique_and_cover_every_layer_and_group(arch):
    net = lean_net(arch)  # every kind of block (tests/support/nets.py)
    sites = net.sites()
    names = [s.name for s in sites]
    assert len(names) == len(set(names))
    for key in net.layers:
        assert f"{key}:in" in names and f"{key}:out" in names
    final = {s.group.key for s in sites if s.final and s.group.prunable}
    assert final == set(net.prunable_groups()), "every prunable group must be final somewhere (EKG gates it)"


def test_layer_sites_are_the_convolutions_input_and_output():
    net = small_net("ResNet-20", input_size=8)
    randomise(net)
    x = tf.constant(input_for(net, batch=2))
    record = Record({"BasicBlock1.0/conv1:in", "BasicBlock1.0/conv1:out"})
    net(x, training=False, tap=record)
    conv = net.layers["BasicBlock1.0/conv1"]
    got = record.values["BasicBlock1.0/conv1:out"]
    np.testing.assert_allclose(got, tf.nn.conv2d(record.values["BasicBlock1.0/conv1:in"], conv.kernel, 2, "SAME"),
                               rtol=1e-5, atol=1e-6)
    assert record.sites["BasicBlock1.0/conv1:out"].layer is conv


def test_one_traced_forward_records_every_block_and_a_replace_changes_the_logits():
    net = small_net("ResNet-8", input_size=8)  # an identity and two projection blocks
    randomise(net)
    x = tf.constant(input_for(net, batch=2))
    traces = []

    @tf.function
    def blocks(x):
        traces.append(1)
        record = Record("block")
        logits = net(x, training=False, tap=record)
        return logits, record.values

    logits, values = blocks(x)
    assert list(values) == ["stem", "BasicBlock0.0", "BasicBlock1.0", "BasicBlock2.0"] and len(traces) == 1
    np.testing.assert_allclose(logits, net(x, training=False), rtol=1e-5, atol=1e-6)
    # Zeroing the last block's output leaves the logits at the classifier's bias.
    replace = Replace({"BasicBlock2.0": tf.zeros_like})
    zeroed = net(x, training=False, tap=replace)
    assert replace.seen == {"BasicBlock2.0"}
    np.testing.assert_allclose(zeroed, np.broadcast_to(net.fc_layer.biases.numpy(), zeroed.shape), atol=1e-6)


def test_a_tap_that_only_observes_adds_no_op():
    # Training mode: at inference a tap keeps conv_bn from folding BN into the conv, so that every
    # layer site sees exactly its layer's output; in training both graphs are the same ops.
    net = small_net("ResNet-8", input_size=8)
    x = tf.constant(input_for(net))
    plain = tf.function(lambda x: net(x, training=True)).get_concrete_function(x)
    observed = tf.function(lambda x: net(x, training=True, tap=lambda site, t: t)).get_concrete_function(x)
    assert len(plain.graph.get_operations()) == len(observed.graph.get_operations())
