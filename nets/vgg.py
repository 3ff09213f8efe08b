"""VGG for CIFAR (Simonyan & Zisserman, with BatchNorm), built from masked layers.

VGG-16: thirteen 3x3 convs in five stages of 64, 64 | 128, 128 | 256, 256, 256 |
512, 512, 512 | 512, 512, 512 channels, each conv (no bias) followed by BN and ReLU and each
stage by a 2x2/2 max-pool; the final map (1x1x512 for 32x32 inputs) is flattened channel-last
into a dense layer of 512 units with ReLU and a dense classifier. No dropout.

Channel groups, declared below (VGG has no residual streams, so no channels are tied):
* `conv{i}` (i = 1..13): the output of the i-th conv, which is only read by the next conv
  (or, for conv13, by `fc1` through the flattened map);
* `fc1`: the hidden units of the first dense layer.
"""

from __future__ import annotations

import math

import tensorflow as tf

from nets.base import Net
from nets.registry import register

_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(Net):
    """VGG with BatchNorm for small inputs.

    Args:
        arch: registry name.
        stages: conv widths of each stage; a 2x2 max-pool follows every stage.
        hidden: units of the hidden dense layer.
        num_classes, input_size: classifier width and the (square) input size.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, stages=_VGG16, hidden=512, num_classes=10, input_size=32, widths=None,
                 masked=True):
        stages = [[int(d) for d in stage] for stage in stages]
        config = dict(stages=stages, hidden=int(hidden), num_classes=num_classes, input_size=input_size)
        super().__init__(arch, config, widths, masked)

        hw = (input_size, input_size)
        x_group = self.group("input", 3, prunable=False)
        self.convs = []  # (conv, bn, pool after it)
        i = 0
        for stage in stages:
            for j, depth in enumerate(stage):
                i += 1
                out_group = self.group(f"conv{i}", depth)
                conv = self.conv(f"conv{i}", x_group, out_group, 3, hw)
                bn = self.bn(f"bn{i}", out_group, hw)
                pool = j == len(stage) - 1
                self.convs.append((conv, bn, pool))
                x_group = out_group
            hw = tuple(s // 2 for s in hw)  # 2x2/2 max-pool, VALID padding
        if min(hw) < 1:
            raise ValueError(f"{arch}: input size {input_size} is too small for {len(stages)} max-pools")

        spatial = hw[0] * hw[1]
        hidden_group = self.group("fc1", hidden)
        self.fc1 = self.fc("fc1", x_group, hidden_group, spatial=spatial,
                           stddev=math.sqrt(2.0 / (x_group.size * spatial)))  # He init
        self.fc2 = self.fc("fc2", hidden_group, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    def forward(self, x, training, tap=None):
        stage = 0
        for conv, bn, pool in self.convs:
            x = tf.nn.relu(bn(conv(x), training))
            if pool:
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
                stage += 1
            # What the next layer reads; a stage ends with its max-pool.
            x = self.site(tap, f"stage{stage}" if pool else bn.key + ":act", x, conv.out_group, block=pool)
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        x = self.site(tap, "fc1:act", tf.nn.relu(self.fc1(x)), self.fc1.out_group)
        return self.fc2(x)


register("VGG-16", VGG, stages=[list(s) for s in _VGG16], hidden=512, num_classes=10, input_size=32)
