"""MobileNetV2 (Sandler et al., 2018), width multiplier 1.0, built from masked layers.

A 3x3 stem conv to 32 channels, seventeen inverted residual blocks in seven stages given by
(t, c, n, s) = (expansion, output channels, blocks, stride of the first block):
(1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1);
then a 1x1 conv to 1280 channels, global average pooling and a dense classifier. A block is
expand 1x1 conv - BN - ReLU6 (absent when t = 1), depthwise 3x3 conv (carries the stride) -
BN - ReLU6, project 1x1 conv - BN (linear), plus the block's input when its stride is 1 and
its input and output widths are equal. Convs have no bias; every conv is followed by BN.

Registered variants:
* `MobileNetV2-ImageNet`: 224x224 inputs, 1000 classes, stem stride 2 (about 300 M MACs and
  3.5 M params in the plain convention);
* `MobileNetV2`: CIFAR, 32x32 inputs, 10 classes. As usual for CIFAR the stem has stride 1
  *and* the (6,24,2,2) stage has stride 1 instead of 2, so the 32x32 map is downsampled only
  three times (to 4x4) instead of five.

Channel groups, declared below:
* `stem`: the stem's output. Block 0 has t = 1, so its depthwise conv works directly on this
  group: the stem output is also block 0's "expanded" group;
* `block{k}/expand` (k >= 1): a block's expanded channels - the expand conv's output, the
  depthwise conv's input and output and the project conv's input are the same channels;
* `stage{i}`: the output stream of stage i. The stage's first block (which never adds a
  residual here) opens it, and every later block of the stage writes into it through its
  project conv and BN and adds it residually, so they are kept or removed together;
* `head`: the 1280 channels of the last 1x1 conv.
"""

from __future__ import annotations

import tensorflow as tf

from nets import shunt
from nets.base import Net
from nets.layers import conv_bn
from nets.registry import register

# (expansion t, output channels c, blocks n); the strides s are a config argument.
_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
_STEM, _HEAD = 32, 1280
_IMAGENET_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_CIFAR_STRIDES = (1, 1, 2, 2, 1, 2, 1)  # the (6,24,2,2) stage keeps the 32x32 map


class MobileNetV2(Net):
    """MobileNetV2 with masked channel groups.

    Args:
        arch: registry name.
        strides: stride of the first block of each of the seven stages.
        stem_stride: stride of the 3x3 stem conv (2 on ImageNet, 1 on CIFAR).
        num_classes, input_size: classifier width and the (square) input size.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, strides=_IMAGENET_STRIDES, stem_stride=2, num_classes=1000,
                 input_size=224, shunts=(), widths=None, masked=True):
        strides = [int(s) for s in strides]
        if len(strides) != len(_STAGES):
            raise ValueError(f"{arch}: expected {len(_STAGES)} stage strides, got {len(strides)}")
        config = dict(strides=strides, stem_stride=int(stem_stride), num_classes=num_classes,
                      input_size=input_size)
        if shunts:
            config["shunts"] = [dict(entry) for entry in shunts]
        super().__init__(arch, config, widths, masked)
        splicer = shunt.Splicer(self, shunt.plan(arch, [f"block{k}" for k in range(sum(n for _, _, n in _STAGES))],
                                                 shunts))

        # === Stem ===
        hw = (input_size, input_size)
        image = self.group("input", 3, prunable=False)
        stream = self.group("stem", _STEM)
        self.stem = self.conv("conv", image, stream, 3, hw, strides=stem_stride)
        hw = self.stem.out_hw
        self.stem_bn = self.bn("bn", stream, hw)

        # === Inverted residual blocks ===
        self.blocks = []
        in_depth = _STEM  # full width of `stream`: the structure never depends on a width spec
        k = 0
        for i, ((t, depth, count), stride) in enumerate(zip(_STAGES, strides)):
            for j in range(count):
                name = f"block{k}/"
                s = stride if j == 0 else 1
                residual = s == 1 and in_depth == depth
                if splicer.replaces(k):  # no layer, no group of its own
                    stream, hw, made = splicer.skip(k, stream, hw, s, residual, f"stage{i}", depth)
                    if made is not None:
                        self.blocks.append({"name": f"block{k}", "shunt": made})
                    in_depth, k = depth, k + 1
                    continue
                block = {"name": f"block{k}", "residual": residual}
                self.block_table.append(shunt.BlockInfo(f"block{k}", residual, hw, shunt.out_hw(hw, s)))
                if block["residual"]:
                    out_group = stream
                else:
                    out_group = self.group(f"stage{i}", depth)
                if t == 1:
                    inner = stream  # no expand conv: the depthwise conv filters the input itself
                else:
                    inner = self.group(name + "expand", in_depth * t)
                    block["expand"] = self.conv(name + "expand", stream, inner, 1, hw)
                    block["expand_bn"] = self.bn(name + "expand_bn", inner, hw)
                block["dw"] = self.dwconv(name + "dw", inner, 3, hw, strides=s)
                hw = block["dw"].out_hw
                block["dw_bn"] = self.bn(name + "dw_bn", inner, hw)
                block["project"] = self.conv(name + "project", inner, out_group, 1, hw)
                block["project_bn"] = self.bn(name + "project_bn", out_group, hw)
                self.blocks.append(block)
                stream, in_depth, k = out_group, depth, k + 1

        # === Head ===
        head = self.group("head", _HEAD)
        self.head = self.conv("head", stream, head, 1, hw)
        self.head_bn = self.bn("head_bn", head, hw)
        self.fc_layer = self.fc("fc", head, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    def forward(self, x, training, tap=None):
        # Every BN folded into its conv (`conv_bn`): grappler fuses a conv with a FusedBatchNorm
        # followed by ReLU, not by ReLU6, a residual add or after a depthwise conv.
        x = tf.nn.relu6(conv_bn(self.stem, self.stem_bn, x, training))
        x = self.site(tap, "stem", x, self.stem.out_group, block=True)
        for block in self.blocks:
            if "shunt" in block:
                x = block["shunt"].as_block(self, block["name"], x, training, tap)
                continue
            y = x
            if "expand" in block:
                y = tf.nn.relu6(conv_bn(block["expand"], block["expand_bn"], y, training))
                y = self.site(tap, block["expand_bn"].key + ":act", y, block["expand"].out_group)
            # The expanded group is final twice: after the expand conv and after the depthwise.
            y = tf.nn.relu6(conv_bn(block["dw"], block["dw_bn"], y, training))
            y = self.site(tap, block["dw_bn"].key + ":act", y, block["dw"].group)
            y = conv_bn(block["project"], block["project_bn"], y, training)
            x = x + y if block["residual"] else y  # linear bottleneck: no ReLU after the add
            x = self.site(tap, block["name"], x, block["project"].out_group, block=True, linear=True)
        x = tf.nn.relu6(conv_bn(self.head, self.head_bn, x, training))
        x = self.site(tap, "head", x, self.head.out_group, block=True)
        x = tf.reduce_mean(x, [1, 2])
        return self.fc_layer(x)


register("MobileNetV2", MobileNetV2, strides=list(_CIFAR_STRIDES), stem_stride=1, num_classes=10,
         input_size=32)
register("MobileNetV2-ImageNet", MobileNetV2, strides=list(_IMAGENET_STRIDES), stem_stride=2,
         num_classes=1000, input_size=224)
