"""LeNet-5 for MNIST (LeCun et al., 1998, with ReLU and max-pooling), built from masked layers.

input_size x input_size x 1 input - 5x5 conv to `filters[0]` channels (`padding`) - ReLU -
2x2/2 max-pool - 5x5 conv to `filters[1]` channels (VALID) - ReLU - 2x2/2 max-pool -
flatten channel-last - dense 120 - ReLU - dense 84 - ReLU - dense to the classes. Convs and
dense layers have biases and there is no BatchNorm: a masked conv's bias is masked with its
output channels, so a removed channel is exactly zero after ReLU and max-pooling.

Registered:
* `LeNet-5`: 28x28 MNIST, conv1 SAME (28x28x6, pooled 14x14), conv2 10x10x16 (pooled 5x5),
  fc1 reads 5x5x16 = 400;
* `LeNet-5-32`: LeCun's 32x32 input (MNIST resized: `--image_size 32`), conv1 VALID (28x28x6,
  pooled 14x14), then as LeNet-5: fc1 reads 5x5x16 = 400;
* `LeNet-5-half`: `LeNet-5-32` with half the conv channels (filters [3, 8]): fc1 reads
  5x5x8 = 200, then 120-84-classes.
The last two are the teacher and the student of data-free knowledge distillation's LeNet
experiment (Lopes et al., 2017).

Channel groups, declared below (no channels are tied):
* `conv1`, `conv2`: the output channels of the two convs (`conv2` is read by `fc1` through
  the flattened 5x5 map);
* `fc1`, `fc2`: the hidden units of the first two dense layers.
"""

from __future__ import annotations

import math

import tensorflow as tf

from nets.base import Net
from nets.registry import register
from utils.errors import ConfigError


class LeNet5(Net):
    """LeNet-5.

    Args:
        arch: registry name.
        num_classes, input_size: classifier width and the (square) input size.
        channels: image channels (1 for MNIST).
        filters: output channels of conv1 and conv2.
        padding: conv1's padding, "SAME" (the 28x28 variant) or "VALID" (LeCun's 32x32 one).
        widths, masked: see `Net`.
    """

    def __init__(self, arch, num_classes=10, input_size=28, channels=1, filters=(6, 16), padding="SAME",
                 widths=None, masked=True):
        filters = [int(f) for f in filters]
        padding = str(padding).upper()
        if len(filters) != 2 or min(filters) < 1:
            raise ConfigError(f"{arch}: filters must be two positive channel counts, got {filters}")
        if padding not in ("SAME", "VALID"):
            raise ConfigError(f"{arch}: padding must be SAME or VALID, got {padding}")
        if padding == "VALID" and input_size != 32:
            raise ConfigError(f"{arch} takes LeCun's 32x32 inputs, got {input_size}x{input_size} (MNIST: give "
                              "--image_size 32)")
        config = dict(num_classes=num_classes, input_size=input_size, channels=channels, filters=filters,
                      padding=padding)
        super().__init__(arch, config, widths, masked)

        hw = (input_size, input_size)
        image = self.group("input", channels, prunable=False)
        g1 = self.group("conv1", filters[0])
        self.conv1 = self.conv("conv1", image, g1, 5, hw, padding=padding, use_bias=True)
        hw = tuple(s // 2 for s in self.conv1.out_hw)  # 2x2/2 max-pool, VALID padding
        g2 = self.group("conv2", filters[1])
        self.conv2 = self.conv("conv2", g1, g2, 5, hw, padding="VALID", use_bias=True)
        hw = tuple(s // 2 for s in self.conv2.out_hw)
        if min(hw) < 1:
            raise ValueError(f"{arch}: input size {input_size} is too small")

        spatial = hw[0] * hw[1]
        g3 = self.group("fc1", 120)
        g4 = self.group("fc2", 84)
        self.fc1 = self.fc("fc1", g2, g3, spatial=spatial, stddev=math.sqrt(2.0 / (g2.size * spatial)))
        self.fc2 = self.fc("fc2", g3, g4, stddev=math.sqrt(2.0 / g3.size))
        self.fc3 = self.fc("fc3", g4, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    def forward(self, x, training, tap=None):
        x = tf.nn.max_pool2d(tf.nn.relu(self.conv1(x)), 2, 2, "VALID")
        x = self.site(tap, "conv1:act", x, self.conv1.out_group)
        x = tf.nn.max_pool2d(tf.nn.relu(self.conv2(x)), 2, 2, "VALID")
        x = self.site(tap, "conv2:act", x, self.conv2.out_group)  # before flattening: the last axis is channels
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        x = self.site(tap, "fc1:act", tf.nn.relu(self.fc1(x)), self.fc1.out_group)
        x = self.site(tap, "fc2:act", tf.nn.relu(self.fc2(x)), self.fc2.out_group)
        return self.fc3(x)


register("LeNet-5", LeNet5, num_classes=10, input_size=28, channels=1)
register("LeNet-5-32", LeNet5, num_classes=10, input_size=32, channels=1, padding="VALID")
register("LeNet-5-half", LeNet5, num_classes=10, input_size=32, channels=1, filters=[3, 8], padding="VALID")
