"""The fully connected MNIST net of the distillation papers (Hinton et al.; Lopes et al.).

784 inputs (a flattened 28x28x1 image) - dense 1200 - ReLU - dense 1200 - ReLU - dense to the
classes. Dense layers have biases; there is no BatchNorm and no dropout. A masked dense layer
masks its bias with its output units, so a removed unit is exactly zero after ReLU.

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


class MLP(Net):
    """Multi-layer perceptron with ReLU hidden layers.

    Args:
        arch: registry name.
        hidden: units of each hidden layer.
        num_classes: classifier width.
        input_size, channels: the (square) image the flat input comes from.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, hidden=(1200, 1200), num_classes=10, input_size=28, channels=1,
                 widths=None, masked=True):
        hidden = [int(h) for h in hidden]
        config = dict(hidden=hidden, num_classes=num_classes, input_size=input_size, channels=channels)
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

    def forward(self, x, training, tap=None):
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        for layer in self.hidden_layers:
            x = self.site(tap, layer.key + ":act", tf.nn.relu(layer(x)), layer.out_group)
        return self.logits(x)


register("MLP", MLP, hidden=[1200, 1200], num_classes=10, input_size=28, channels=1)
