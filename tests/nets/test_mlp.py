"""The MLPs of the distillation papers: registered shapes, dropout in training calls only, its sites."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from nets.sites import Record
from tests.support.nets import randomise
from utils.errors import ConfigError


@pytest.mark.parametrize("arch, hidden", [("MLP", 1200), ("hinton-1200", 1200), ("hinton-800", 800)])
def test_registered_mlps_have_the_papers_layer_shapes(arch, hidden):
    assert nets.build(arch).param_shapes() == {
        "fc1/kernel:0": (784, hidden), "fc1/biases:0": (1, hidden),
        "fc2/kernel:0": (hidden, hidden), "fc2/biases:0": (1, hidden),
        "logits/kernel:0": (hidden, 10), "logits/biases:0": (1, 10)}


def test_dropout_sites_name_the_dropped_layer_inputs_in_forward_order():
    net = nets.build("hinton-1200")
    sites = net.dropout_sites()
    assert sites == {"fc1:in": 0.2, "fc2:in": 0.5, "logits:in": 0.5}
    layer_in = [s.name for s in net.sites() if s.kind == "layer_in"]
    assert list(sites) == [name for name in layer_in if name in sites]
    assert nets.build("MLP").dropout_sites() == {} and nets.build("hinton-800").dropout_sites() == {}
    assert nets.build("LeNet-5").dropout_sites() == {}  # the base Net's: no dropout
    # Only rates > 0; the first layer gets the input rate, every later one the hidden rate.
    small = dict(hidden=[5, 4, 3], input_size=2)
    assert nets.build("MLP", dropout=[0.0, 0.3], **small).dropout_sites() == \
        {"fc2:in": 0.3, "fc3:in": 0.3, "logits:in": 0.3}
    assert nets.build("MLP", dropout=[0.1, 0.0], **small).dropout_sites() == {"fc1:in": 0.1}
    assert nets.build("MLP", dropout=[0.1, 0.3], hidden=[], input_size=2).dropout_sites() == {"logits:in": 0.1}


def recorded(net, x, training):
    record = Record()
    logits = net(x, training=training, tap=record)
    return logits.numpy(), {name: value.numpy() for name, value in record.values.items()}


def test_dropout_is_inverted_dropout_in_training_and_absent_in_inference():
    net = nets.build("hinton-1200", hidden=[300, 200], input_size=8)  # the registered rates, small layers
    randomise(net)
    x = np.ones([64, 8, 8, 1], np.float32)
    logits, values = recorded(net, x, training=False)
    # Inference: every layer reads what the previous one gave, and two calls agree.
    np.testing.assert_array_equal(values["fc1:in"], x.reshape(64, -1))
    np.testing.assert_array_equal(values["fc2:in"], values["fc1:act"])
    np.testing.assert_array_equal(values["logits:in"], values["fc2:act"])
    np.testing.assert_array_equal(net(x).numpy(), logits)

    train_logits, values = recorded(net, x, training=True)
    for site, before, rate in [("fc1:in", x.reshape(64, -1), 0.2), ("fc2:in", values["fc1:act"], 0.5),
                               ("logits:in", values["fc2:act"], 0.5)]:
        dropped = values[site]
        kept = dropped != 0
        # Kept inputs are scaled by 1 / (1 - rate), the others are zero ...
        np.testing.assert_allclose(dropped[kept], before[kept] / (1 - rate), rtol=1e-6, err_msg=site)
        # ... and about `rate` of the non-zero inputs are dropped (thousands of them: +-0.05 is > 5 sd).
        live = before != 0
        assert live.sum() > 2000, site
        assert abs(1 - kept[live].mean() - rate) < 0.05, site
    assert not np.allclose(train_logits, logits)
    assert not np.allclose(net(x, training=True).numpy(), train_logits)  # new masks every call


def test_without_dropout_training_and_inference_agree():
    net = nets.build("hinton-1200", hidden=[30, 20], input_size=4, dropout=[0.0, 0.0])
    randomise(net)
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 1)).astype(np.float32)
    np.testing.assert_array_equal(net(x, training=True).numpy(), net(x).numpy())  # no BatchNorm, no dropout


def test_dropout_is_traced_and_kept_by_slimming_and_the_spec():
    net = nets.build("hinton-1200", hidden=[30, 20], input_size=4)
    net.groups["fc1"].keep(range(10))
    small = nets.slim(net)
    rebuilt = nets.build_from_spec(small.spec())
    assert small.config["dropout"] == rebuilt.config["dropout"] == [0.2, 0.5]
    assert rebuilt.dropout_sites() == net.dropout_sites()
    train = tf.function(lambda x: rebuilt(x, training=True))
    out = train(tf.ones([256, 4, 4, 1])).numpy()
    assert out.shape == (256, 10) and len({tuple(row) for row in out.round(5)}) > 1  # per-example masks


@pytest.mark.parametrize("dropout", [[0.5], [0.2, 1.0], [-0.1, 0.5]])
def test_bad_dropout_is_a_config_error(dropout):
    with pytest.raises(ConfigError, match="dropout must be"):
        nets.build("MLP", dropout=dropout, hidden=[3], input_size=2)
