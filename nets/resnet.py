"""ResNets with the EKG reference's variable names, shapes and conventions.

CIFAR ResNet-8/20/32/56/110: 3x3 stem to 16 channels, three stages of basic blocks (16/32/64,
strides 1/2/2). ImageNet ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks, x4): 7x7/2 stem
and 3x3/2 max-pool. Every block is conv1 (carries the stride) - BN - ReLU - conv2 - BN (gamma
initialised to 0) - add shortcut - ReLU; bottlenecks put a 1x1 conv0 - BN - ReLU in front.
The shortcut is a 1x1 projection conv + BN ("option B") whenever the stride or the width changes.

Channel groups, declared below:
* `stem`: the stem's output, which is also the residual stream of every stage that starts
  without a projection (stage 0 of the CIFAR nets and of ResNet-18/34);
* `stage{i}`: the residual stream that stage i's projection shortcut opens; every block's
  last conv and BN of that stage write into it, so they are kept or removed together;
* `BasicBlock{i}.{j}/conv1` (and `/conv0`): a block's internal widths.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from nets import shunt
from nets.base import Net, Segment
from nets.layers import conv_bn
from nets.registry import register

_CIFAR = {"depths": (16, 32, 64), "strides": (1, 2, 2)}
_IMAGENET = {"depths": (64, 128, 256, 512), "strides": (1, 2, 2, 2)}


class ResNet(Net):
    """ResNet of the EKG reference.

    Args:
        arch: registry name.
        blocks: number of blocks per stage.
        bottleneck: use 1x1-3x3-1x1 blocks with expansion 4 (ResNet-50).
        imagenet_stem: 7x7/2 conv and 3x3/2 max-pool instead of a 3x3 conv.
        num_classes, input_size: classifier width and the (square) input size.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, blocks, bottleneck=False, imagenet_stem=False, num_classes=10,
                 input_size=32, shunts=(), widths=None, masked=True):
        config = dict(blocks=list(blocks), bottleneck=bottleneck, imagenet_stem=imagenet_stem,
                      num_classes=num_classes, input_size=input_size)
        if shunts:
            config["shunts"] = [dict(entry) for entry in shunts]
        super().__init__(arch, config, widths, masked)
        splicer = shunt.Splicer(self, shunt.plan(arch, [f"BasicBlock{i}.{j}" for i, n in enumerate(blocks)
                                                       for j in range(n)], shunts), relu_out=True)
        self.shunt_at = {}  # index in self.blocks -> the Shunt that replaces a run ending there
        plan = _IMAGENET if imagenet_stem else _CIFAR
        expansion = 4 if bottleneck else 1
        self.imagenet_stem = imagenet_stem

        # === Stem ===
        hw = (input_size, input_size)
        image = self.group("input", 3, prunable=False)
        stream = self.group("stem", plan["depths"][0])
        self.stem = self.conv("conv", image, stream, 7 if imagenet_stem else 3, hw,
                              strides=2 if imagenet_stem else 1)
        hw = self.stem.out_hw
        self.stem_bn = self.bn("bn", stream, hw)
        if imagenet_stem:
            hw = tuple((s + 1) // 2 for s in hw)  # 3x3/2 max-pool, SAME padding

        # === Stages ===
        self.blocks, self.block_names = [], []
        in_depth, k = plan["depths"][0], -1
        for i, (count, depth, stride) in enumerate(zip(blocks, plan["depths"], plan["strides"])):
            for j in range(count):
                name = f"BasicBlock{i}.{j}/"
                s = stride if j == 0 else 1
                k += 1
                projects = s > 1 or depth * expansion != in_depth
                if splicer.replaces(k):  # no layer, no group of its own
                    stream, hw, made = splicer.skip(k, stream, hw, s, not projects, f"stage{i}", depth * expansion)
                    if made is not None:
                        self.shunt_at[len(self.blocks)] = made
                        self.blocks.append(made.layers)
                        self.block_names.append(made.run.last)
                    in_depth = depth * expansion
                    continue
                self.block_table.append(shunt.BlockInfo(name.rstrip("/"), not projects, hw, shunt.out_hw(hw, s)))
                block = {}
                # Full widths decide the structure; a width spec only shrinks groups.
                if projects:
                    new_stream = self.group(f"stage{i}", depth * expansion)
                    block["conv3"] = self.conv(name + "conv3", stream, new_stream, 1, hw, strides=s)
                    block["bn3"] = self.bn(name + "bn3", new_stream, block["conv3"].out_hw)
                else:
                    new_stream = stream
                x_group, x_hw = stream, hw
                if bottleneck:
                    inner0 = self.group(name + "conv0", depth)
                    block["conv0"] = self.conv(name + "conv0", x_group, inner0, 1, x_hw)
                    block["bn0"] = self.bn(name + "bn0", inner0, x_hw)
                    x_group = inner0
                inner = self.group(name + "conv1", depth)
                block["conv1"] = self.conv(name + "conv1", x_group, inner, 3, x_hw, strides=s)
                out_hw = block["conv1"].out_hw
                block["bn1"] = self.bn(name + "bn1", inner, out_hw)
                block["conv2"] = self.conv(name + "conv2", inner, new_stream, 1 if bottleneck else 3, out_hw)
                block["bn2"] = self.bn(name + "bn2", new_stream, out_hw, gamma_init=0.0)
                self.blocks.append(block)
                self.block_names.append(name.rstrip("/"))
                stream, hw, in_depth = new_stream, out_hw, depth * expansion

        # === Head ===
        self.fc_layer = self.fc("fc", stream, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    def _stem(self, x, training, tap=None):
        x = tf.nn.relu(self.stem_bn(self.stem(x), training))
        if self.imagenet_stem:
            x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        return self.site(tap, "stem", x, self.stem.out_group, block=True)

    def _block(self, name, block, x, training, tap=None):
        if "conv3" in block:
            shortcut = block["bn3"](block["conv3"](x), training)
        else:
            shortcut = x
        y = x
        if "conv0" in block:
            y = tf.nn.relu(block["bn0"](block["conv0"](y), training))
            y = self.site(tap, block["bn0"].key + ":act", y, block["conv0"].out_group)
        y = tf.nn.relu(block["bn1"](block["conv1"](y), training))
        y = self.site(tap, block["bn1"].key + ":act", y, block["conv1"].out_group)
        # Folded (see `conv_bn`) where the residual add follows, which then fuses into the conv;
        # elsewhere grappler already fuses conv + BN + ReLU without touching the kernel.
        y = conv_bn(block["conv2"], block["bn2"], y, training)
        return self.site(tap, name, tf.nn.relu(y + shortcut), block["conv2"].out_group, block=True)

    def _head(self, x, training, tap=None):
        return self.fc_layer(tf.reduce_mean(x, [1, 2]))

    def segments(self):
        def block_fn(i):
            if i in self.shunt_at:
                return functools.partial(self.shunt_at[i].as_block, self, self.block_names[i])
            return functools.partial(self._block, self.block_names[i], self.blocks[i])

        return residual_segments(self, block_fn)

    def forward(self, x, training, tap=None):
        for segment in self.segments():
            x = segment.fn(x, training, tap)
        return x


def residual_segments(net, block_fn) -> list:
    """The segments of a ResNet-like net: its `_stem`, each block (`block_fn(i)` runs block i of
    `net.blocks`, a dict of its layers), its `_head`; each with the groups its layers touch."""
    def keys(*layers):
        return frozenset(g.key for layer in layers for g in layer.groups())

    segments = [Segment(net._stem, keys(net.stem))]
    segments += [Segment(block_fn(i), keys(*block.values())) for i, block in enumerate(net.blocks)]
    return segments + [Segment(net._head, keys(net.fc_layer))]

for _depth in (8, 20, 32, 56, 110):
    register(f"ResNet-{_depth}", ResNet, blocks=[(_depth - 2) // 6] * 3)
register("ResNet-18", ResNet, blocks=[2, 2, 2, 2], imagenet_stem=True, num_classes=1000, input_size=224)
register("ResNet-34", ResNet, blocks=[3, 4, 6, 3], imagenet_stem=True, num_classes=1000, input_size=224)
register("ResNet-50", ResNet, blocks=[3, 4, 6, 3], bottleneck=True, imagenet_stem=True, num_classes=1000,
         input_size=224)
