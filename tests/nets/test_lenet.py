"""LeNet-5 and the 32x32 LeNets of data-free knowledge distillation: the papers' layer shapes."""

import numpy as np
import pytest

import nets
from nets.sites import Record
from tests.support.nets import input_for, randomise
from utils.errors import ConfigError


def shapes(conv1, conv2, fc1_in, classes=10):
    return {"conv1/kernel:0": (5, 5, 1, conv1), "conv1/biases:0": (1, 1, 1, conv1),
            "conv2/kernel:0": (5, 5, conv1, conv2), "conv2/biases:0": (1, 1, 1, conv2),
            "fc1/kernel:0": (fc1_in, 120), "fc1/biases:0": (1, 120),
            "fc2/kernel:0": (120, 84), "fc2/biases:0": (1, 84),
            "fc3/kernel:0": (84, classes), "fc3/biases:0": (1, classes)}


def act_shapes(net):
    """The shapes of the conv groups' final activations (after ReLU and max-pool) on one image."""
    record = Record({"conv1:act", "conv2:act"})
    net(input_for(net, batch=1), tap=record)
    return {name: tuple(value.shape) for name, value in record.values.items()}


@pytest.mark.parametrize("arch, size, conv1, conv2, fc1_in, params, macs", [
    # 28x28, conv1 SAME: 28x28x6 -> 14x14 -> conv2 10x10x16 -> 5x5x16 = 400 (as before the options existed).
    ("LeNet-5", 28, 6, 16, 400, 61706, 416520),
    # LeCun's 32x32, conv1 VALID: 28x28x6 -> 14x14 -> the same 10x10x16 -> 400; the same layers and cost.
    ("LeNet-5-32", 32, 6, 16, 400, 61706, 416520),
    # Lopes et al.'s student: half the conv channels, 5x5x8 = 200 into 120-84-10.
    ("LeNet-5-half", 32, 3, 8, 200, 35820, 153720),
])
def test_registered_lenets_have_the_papers_layer_shapes(arch, size, conv1, conv2, fc1_in, params, macs):
    net = nets.build(arch)
    assert net.config["input_size"] == size
    assert net.param_shapes() == shapes(conv1, conv2, fc1_in)
    assert (net.conv1.out_hw, net.conv2.out_hw) == ((28, 28), (10, 10))
    assert act_shapes(net) == {"conv1:act": (1, 14, 14, conv1), "conv2:act": (1, 5, 5, conv2)}
    cost = net.cost()
    assert (cost.params, cost.macs) == (params, macs)
    assert net(input_for(net, batch=3)).shape == (3, 10)


def test_lenet5_keeps_its_defaults_and_an_old_spec_rebuilds_it():
    net = nets.build("LeNet-5")
    assert net.config == dict(num_classes=10, input_size=28, channels=1, filters=[6, 16], padding="SAME")
    randomise(net)
    # A spec saved before `filters` and `padding` existed names neither: the defaults are LeNet-5's.
    old = nets.build_from_spec({"arch": "LeNet-5", "config": dict(num_classes=10, input_size=28, channels=1),
                                "widths": net.widths()})
    old.set_params(net.get_params())
    x = input_for(net, batch=2)
    np.testing.assert_array_equal(old(x).numpy(), net(x).numpy())


def test_filters_and_padding_survive_slimming_and_the_spec():
    net = nets.build("LeNet-5-half")
    net.groups["conv2"].keep([0, 3, 5])
    small = nets.slim(net)
    assert small.config["filters"] == [3, 8] and small.config["padding"] == "VALID"
    assert small.widths()["conv2"] == 3 and small.param_shapes()["fc1/kernel:0"] == (75, 120)
    assert nets.build_from_spec(small.spec()).param_shapes() == small.param_shapes()


@pytest.mark.parametrize("config, message", [
    (dict(padding="FULL"), "padding must be SAME or VALID"),
    (dict(filters=[6]), "filters must be two positive channel counts"),
    (dict(filters=[6, 0]), "filters must be two positive channel counts"),
])
def test_bad_options_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        nets.build("LeNet-5", **config)


def test_the_32x32_lenets_refuse_another_input_size_in_one_line():
    with pytest.raises(ConfigError, match=r"LeNet-5-32 takes LeCun's 32x32 inputs, got 28x28 \(MNIST: give "
                                          r"--image_size 32\)"):
        nets.build("LeNet-5-32", input_size=28)
