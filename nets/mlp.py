"""The fully connected MNIST nets of the distillation papers (Hinton et al.; Lopes et al.).

784 inputs (a flattened 28x28x1 image) - dense 1200 - ReLU - dense 1200 - ReLU - dense to the
classes. Dense layers have biases; there is no BatchNorm. A masked dense layer masks its bias
with its output units, so a removed unit is exactly zero after ReLU.

Registered:
* `MLP`: hidden [1200, 1200], no dropout;
* `hinton-1200`: Hinton et al.'s (2015) teacher, hidden [1200, 1200] with dropout [0.2, 0.5]
  (keep 0.8 of the inputs and 0.5 of the hidden units in training);
* `hinton-800`: Hinton et al.'s student, hidden [800, 800], no dropout. Lopes et al. (2017)
  distil the first into the second without the training data.

Dropout (`dropout` = `[input_rate, hidden_rate]`) is inverted dropout (`tf.nn.dropout`: kept
values are scaled by 1 / (1 - rate)) in training calls only: at `input_rate` on the flattened
input of the first dense layer, at `hidden_rate` on the input of every later one (after its
ReLU). It applies before the layer's `<layer key>:in` site, so a tap there sees what the layer
reads; `dropout_sites()` names those sites. Inference calls drop nothing. Its masks come from
TensorFlow's stateful random generator (seeded by the run seed), which a checkpoint does not
save: a resumed training run draws other masks than an uninterrupted one.

The input may be an NHWC image batch or a batch of flat vectors; it is flattened channel-last.
The `input` group holds the image *channels* (1), like every other net's `input` group, and
the first dense layer reads the flattened input_size x input_size map of it.

Channel groups, declared below (no units are tied):
* `fc{i}` (i = 1..len(hidden)): the units of the i-th hidden dense layer.
"""

from __future__ import annotations

import math

import tensorflow as tf

from nets.base import Net
from nets.registry import register
from utils.errors import ConfigError


class MLP(Net):
    """Multi-layer perceptron with ReLU hidden layers and optional dropout.

    Args:
        arch: registry name.
        hidden: units of each hidden layer.
        num_classes: classifier width.
        input_size, channels: the (square) image the flat input comes from.
        dropout: `[input_rate, hidden_rate]`, each in [0, 1): the dropout rate of the first dense
            layer's input and of every later dense layer's input, in training calls.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, hidden=(1200, 1200), num_classes=10, input_size=28, channels=1, dropout=(0.0, 0.0),
                 widths=None, masked=True):
        hidden = [int(h) for h in hidden]
        dropout = [float(rate) for rate in dropout]
        if len(dropout) != 2 or not all(0.0 <= rate < 1.0 for rate in dropout):
            raise ConfigError(f"{arch}: dropout must be [input_rate, hidden_rate], each in [0, 1), got {dropout}")
        config = dict(hidden=hidden, num_classes=num_classes, input_size=input_size, channels=channels,
                      dropout=dropout)
        super().__init__(arch, config, widths, masked)

        x_group = self.group("input", channels, prunable=False)
        spatial = input_size * input_size
        self.hidden_layers = []
        for i, units in enumerate(hidden, start=1):
            out_group = self.group(f"fc{i}", units)
            fan_in = x_group.size * spatial
            self.hidden_layers.append(self.fc(f"fc{i}", x_group, out_group, spatial=spatial,
                                              stddev=math.sqrt(2.0 / fan_in)))
            x_group, spatial = out_group, 1
        self.logits = self.fc("logits", x_group, self.group("logits", num_classes, prunable=False),
                              spatial=spatial)
        self._check_widths_used()

    def dropout_sites(self) -> dict:
        """`{"<dense layer key>:in": rate}` of every dense layer whose input a training call drops
        out, in forward order (the first layer at the input rate, the later ones at the hidden rate)."""
        input_rate, hidden_rate = self.config["dropout"]
        dense = [*self.hidden_layers, self.logits]
        rates = [input_rate] + [hidden_rate] * (len(dense) - 1)
        return {f"{layer.key}:in": rate for layer, rate in zip(dense, rates) if rate > 0}

    def forward(self, x, training, tap=None):
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        rates = self.dropout_sites() if training else {}

        def dropped(x, layer):
            rate = rates.get(f"{layer.key}:in")
            return x if rate is None else tf.nn.dropout(x, rate)

        for layer in self.hidden_layers:
            x = self.site(tap, layer.key + ":act", tf.nn.relu(layer(dropped(x, layer))), layer.out_group)
        return self.logits(dropped(x, self.logits))


register("MLP", MLP, hidden=[1200, 1200], num_classes=10, input_size=28, channels=1)
register("hinton-1200", MLP, hidden=[1200, 1200], num_classes=10, input_size=28, channels=1, dropout=[0.2, 0.5])
register("hinton-800", MLP, hidden=[800, 800], num_classes=10, input_size=28, channels=1)
