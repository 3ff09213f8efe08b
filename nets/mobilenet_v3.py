"""MobileNetV3-Small and MobileNetV3-Large (Howard et al., 2019), built from masked layers.

The block tables are the paper's (Tables 1 and 2) as Keras applications builds them
(`keras.applications.MobileNetV3Small/Large`, not minimalistic). Each row is a bottleneck block
(k, exp, c, SE, NL, s) = (depthwise kernel, expanded width, output channels, squeeze-excite,
nonlinearity RE = ReLU or HS = hard-swish, stride), at width multiplier 1:

    Small: (3, 16, 16, SE, RE, 2),                                   stage 0
           (3, 72, 24, -, RE, 2), (3, 88, 24, -, RE, 1),              stage 1
           (5, 96, 40, SE, HS, 2), (5, 240, 40, SE, HS, 1) x 2,       stage 2
           (5, 120, 48, SE, HS, 1), (5, 144, 48, SE, HS, 1),          stage 3
           (5, 288, 96, SE, HS, 2), (5, 576, 96, SE, HS, 1) x 2;      stage 4
    Large: (3, 16, 16, -, RE, 1),                                     stage 0
           (3, 64, 24, -, RE, 2), (3, 72, 24, -, RE, 1),              stage 1
           (5, 72, 40, SE, RE, 2), (5, 120, 40, SE, RE, 1) x 2,       stage 2
           (3, 240, 80, -, HS, 2), (3, 200, 80, -, HS, 1),
           (3, 184, 80, -, HS, 1) x 2,                                stage 3
           (3, 480, 112, SE, HS, 1), (3, 672, 112, SE, HS, 1),        stage 4
           (5, 672, 160, SE, HS, 2), (5, 960, 160, SE, HS, 1) x 2.    stage 5

A stage is a run of rows with the same output width (it shares one residual stream). Around
the blocks: a 3x3 stem conv to 16 channels (stride 2) - BN - hard-swish; after them a 1x1 conv
to 576 (Small) / 960 (Large) channels - BN - hard-swish, global average pooling, a dense layer
(Keras's 1x1 conv on the pooled map, with bias, no BN) to 1024 / 1280 units - hard-swish, and
the dense classifier. A block is expand 1x1 conv - BN - NL (absent in the first block, whose
expanded width is its input width: Keras builds no expand conv there), depthwise k x k conv
(carries the stride) - BN - NL, the squeeze-excite where the table has SE, project 1x1 conv -
BN (linear), plus the block's input when the table's stride is 1 and its input and output
widths are equal. Convs have no bias and every conv is followed by BN. Hard-swish is
`x * relu6(x + 3) / 6`, hard-sigmoid `relu6(x + 3) / 6`.

Squeeze-excite (as Keras's `_se_block`): global average pool of the depthwise output, dense
layer with bias to `make_divisible(expanded / 4)` units, ReLU, dense layer with bias back to
the expanded width, hard-sigmoid, times the depthwise output. Masks multiply parameters, so a
removed expanded channel is 0 at the depthwise output, its excite unit is hard-sigmoid(0) = 1/2,
and the product stays exactly 0; a removed squeeze unit is ReLU(0) = 0 and reaches no excite
unit. The masked net therefore computes the slimmed net's outputs. Both SE dense layers count in
`cost()` (the pooling and the products, like every elementwise op, do not).

Widths (`alpha`, as Keras): every block's output width is `make_divisible(c * alpha)`, its
expanded width `make_divisible(input width * exp / c_prev)` (Keras's expansion ratios: 72/16,
88/24, 4, 6, ... of the previous row's output c_prev), where `make_divisible(v)` rounds to the
nearest multiple of 8, at least 8 and not below 90% of v. The stem stays at 16 channels, the last
conv has `make_divisible(6 * last block width)` and the dense layer 1024 / 1280 units unless
alpha > 1 (then `make_divisible(1024 * alpha)` / `make_divisible(1280 * alpha)`).

`change_stride_layers = N` gives the first N stride-2 layers of the net, counting the stem,
stride 1 (ShuntConnector's `modify_model`: Small's stem and block 0, Large's stem and block 1
for N = 2). As there, only the strides change: the net keeps the table's topology, so a block
whose table stride is 2 gains no residual add (Small's block 0, 16 -> 16) and the CIFAR and
ImageNet variants have the same layers, groups and parameter shapes.

Registered variants (all at alpha 1):
* `MobileNetV3-Small-ImageNet`, `MobileNetV3-Large-ImageNet`: 224x224 inputs, 1000 classes,
  no stride changed: 2.54 M params and 56.5 M MACs (Small), 5.48 M params and 216.6 M MACs
  (Large) in the plain convention, exactly Keras's model (tests/nets/test_mobilenet_v3.py; the
  paper rounds them to 2.5 M / 56 M and 5.4 M / 219 M);
* `MobileNetV3-Small`, `MobileNetV3-Large`: CIFAR, 32x32 inputs, 10 classes,
  `change_stride_layers` 2 (as ShuntConnector's CIFAR configuration), so the 32x32 map is
  downsampled three times (to 4x4) instead of five.

Not built: Keras's dropout (rate 0.2) before the classifier, its input rescaling layer and its
BN hyper-parameters (momentum 0.999, epsilon 1e-3): BatchNorm keeps the toolkit's reference
settings, as in MobileNetV2.

Channel groups, declared below:
* `stem`: the stem's output. Block 0 has no expand conv, so its depthwise conv, its SE excite
  output and its project input are this group too; in Large, block 0 (16 -> 16, stride 1, when
  0.56 <= alpha < 1.25) also adds into it, so the stem's stream is Large's stage-0 stream;
* `block{k}/expand` (k >= 1): a block's expanded channels - the expand conv's output, the
  depthwise conv's input and output, the SE excite layer's output and the project conv's input
  are the same channels;
* `block{k}/squeeze`: the squeeze units of block k's SE (blocks with SE only);
* `stage{i}`: the output stream of stage i. The stage's first block (which adds no residual)
  opens it, and every later block of the stage writes into it through its project conv and BN
  and adds it residually, so they are kept or removed together. Large at alpha 1 has no
  `stage0` (see `stem`); with a small alpha two stages can have equal widths, and then a stage whose
  first block has stride 1 continues the previous stream instead of opening its own;
* `head`: the 576 / 960 channels of the last 1x1 conv;
* `head_fc`: the 1024 / 1280 units of the dense layer after the pooling.

Sites: `stem`, `block{k}` (linear: a block ends in its project BN or a residual add) and `head`
are block sites; group sites follow every activation: `block{k}/expand_bn:act`,
`block{k}/dw_bn:act` (before the SE), `block{k}/squeeze:act` (the SE's ReLU),
`block{k}/excite:act` (the SE's product: the expanded channels the project conv reads) and
`head_fc:act`. Hard-swish sites are not marked linear: hard-swish is a ReLU6 times its input,
>= -3/8 everywhere (an activation quantizer's range covers its small negative part).
"""

from __future__ import annotations

import math

import tensorflow as tf

from nets import shunt
from nets.base import Net
from nets.layers import conv_bn
from nets.registry import register
from utils.errors import ConfigError

# (kernel k, expanded width exp, output channels c, squeeze-excite, nonlinearity, stride s) at alpha 1.
_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
TABLES = {"small": _SMALL, "large": _LARGE}
_HEAD_FC = {"small": 1024, "large": 1280}
_STEM = 16
_SE_RATIO = 0.25
_LAST_CONV_RATIO = 6


def make_divisible(v: float, divisor: int = 8) -> int:
    """`v` rounded to the nearest multiple of `divisor`, at least `divisor` and not below 90% of
    `v` (Keras's and TF-slim's `_depth`)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def hard_sigmoid(x):
    return tf.nn.relu6(x + 3.0) * (1.0 / 6.0)


def hard_swish(x):
    return x * hard_sigmoid(x)


_ACTIVATIONS = {"RE": tf.nn.relu, "HS": hard_swish}


def _glorot_std(fan_in: int, fan_out: int) -> float:
    # Keras's default kernel initialiser of the SE and head 1x1 convs (Glorot), as a normal's stddev.
    return math.sqrt(2.0 / (fan_in + fan_out))


class MobileNetV3(Net):
    """MobileNetV3-Small or -Large with masked channel groups.

    Args:
        arch: registry name.
        variant: `"small"` or `"large"` (the block table).
        alpha: width multiplier (> 0), applied as Keras applies it (module docstring).
        change_stride_layers: how many of the net's first stride-2 layers (the stem counts)
            get stride 1, from 0 to the five the tables have.
        num_classes, input_size: classifier width and the (square) input size.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, variant="large", alpha=1.0, change_stride_layers=0, num_classes=1000,
                 input_size=224, shunts=(), widths=None, masked=True):
        variant = str(variant).lower()
        if variant not in TABLES:
            raise ConfigError(f"{arch}: variant must be one of {', '.join(TABLES)}, got {variant!r}")
        alpha = float(alpha)
        if not alpha > 0:
            raise ConfigError(f"{arch}: width multiplier alpha must be > 0, got {alpha}")
        table = TABLES[variant]
        table_strides = [2] + [row[5] for row in table]  # the stem's, then each block's
        change = int(change_stride_layers)
        if not 0 <= change <= table_strides.count(2):
            raise ConfigError(f"{arch}: change_stride_layers must be in 0..{table_strides.count(2)}, got {change}")
        config = dict(variant=variant, alpha=alpha, change_stride_layers=change, num_classes=num_classes,
                      input_size=input_size)
        if shunts:
            config["shunts"] = [dict(entry) for entry in shunts]
        super().__init__(arch, config, widths, masked)
        splicer = shunt.Splicer(self, shunt.plan(arch, [f"block{k}" for k in range(len(table))], shunts))
        strides = list(table_strides)
        for index in [i for i, s in enumerate(table_strides) if s == 2][:change]:
            strides[index] = 1

        # === Stem ===
        hw = (input_size, input_size)
        image = self.group("input", 3, prunable=False)
        stream = self.group("stem", _STEM)
        self.stem = self.conv("conv", image, stream, 3, hw, strides=strides[0])
        hw = self.stem.out_hw
        self.stem_bn = self.bn("bn", stream, hw)

        # === Bottleneck blocks ===
        self.blocks = []
        in_depth, in_ref = _STEM, _STEM  # full width of `stream`, and the table's (alpha 1) input width
        stage = 0
        for k, ((kernel, exp, out_ref, se, nl, table_stride), stride) in enumerate(zip(table, strides[1:])):
            name = f"block{k}/"
            if k > 0 and out_ref != table[k - 1][2]:
                stage += 1
            depth = make_divisible(out_ref * alpha)
            residual = table_stride == 1 and in_depth == depth
            if splicer.replaces(k):  # no layer, no group of its own
                stream, hw, made = splicer.skip(k, stream, hw, stride, residual, f"stage{stage}", depth)
                if made is not None:
                    self.blocks.append({"name": f"block{k}", "shunt": made})
                in_depth, in_ref = depth, out_ref
                continue
            self.block_table.append(shunt.BlockInfo(f"block{k}", residual, hw, shunt.out_hw(hw, stride)))
            block = {"name": f"block{k}", "residual": residual, "activation": nl}
            out_group = stream if block["residual"] else self.group(f"stage{stage}", depth)
            if exp == in_ref:
                inner, expanded = stream, in_depth  # no expand conv: the depthwise conv filters the input itself
            else:
                expanded = make_divisible(in_depth * (exp / in_ref))  # Keras's ratio exp / c_prev: 72/16, 88/24, ...
                inner = self.group(name + "expand", expanded)
                block["expand"] = self.conv(name + "expand", stream, inner, 1, hw)
                block["expand_bn"] = self.bn(name + "expand_bn", inner, hw)
            block["dw"] = self.dwconv(name + "dw", inner, kernel, hw, strides=stride)
            hw = block["dw"].out_hw
            block["dw_bn"] = self.bn(name + "dw_bn", inner, hw)
            if se:
                units = make_divisible(expanded * _SE_RATIO)
                squeeze = self.group(name + "squeeze", units)
                block["squeeze"] = self.fc(name + "squeeze", inner, squeeze, stddev=_glorot_std(expanded, units))
                block["excite"] = self.fc(name + "excite", squeeze, inner, stddev=_glorot_std(units, expanded))
            block["project"] = self.conv(name + "project", inner, out_group, 1, hw)
            block["project_bn"] = self.bn(name + "project_bn", out_group, hw)
            self.blocks.append(block)
            stream, in_depth, in_ref = out_group, depth, out_ref

        # === Head ===
        last = make_divisible(in_depth * _LAST_CONV_RATIO)
        head = self.group("head", last)
        self.head = self.conv("head", stream, head, 1, hw)
        self.head_bn = self.bn("head_bn", head, hw)
        units = _HEAD_FC[variant]
        units = make_divisible(units * alpha) if alpha > 1.0 else units
        self.head_fc = self.fc("head_fc", head, self.group("head_fc", units), stddev=_glorot_std(last, units))
        self.fc_layer = self.fc("fc", self.head_fc.out_group, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    def forward(self, x, training, tap=None):
        # BN folded into its conv at inference (`conv_bn`), as in MobileNetV2.
        x = hard_swish(conv_bn(self.stem, self.stem_bn, x, training))
        x = self.site(tap, "stem", x, self.stem.out_group, block=True)
        for block in self.blocks:
            if "shunt" in block:
                x = block["shunt"].as_block(self, block["name"], x, training, tap)
                continue
            act = _ACTIVATIONS[block["activation"]]
            y = x
            if "expand" in block:
                y = act(conv_bn(block["expand"], block["expand_bn"], y, training))
                y = self.site(tap, block["expand_bn"].key + ":act", y, block["expand"].out_group)
            y = act(conv_bn(block["dw"], block["dw_bn"], y, training))
            y = self.site(tap, block["dw_bn"].key + ":act", y, block["dw"].group)
            if "squeeze" in block:
                s = tf.nn.relu(block["squeeze"](tf.reduce_mean(y, [1, 2])))
                s = self.site(tap, block["squeeze"].key + ":act", s, block["squeeze"].out_group)
                y = y * hard_sigmoid(block["excite"](s))[:, None, None, :]
                y = self.site(tap, block["excite"].key + ":act", y, block["excite"].out_group)
            y = conv_bn(block["project"], block["project_bn"], y, training)
            x = x + y if block["residual"] else y  # linear bottleneck: no activation after the add
            x = self.site(tap, block["name"], x, block["project"].out_group, block=True, linear=True)
        x = hard_swish(conv_bn(self.head, self.head_bn, x, training))
        x = self.site(tap, "head", x, self.head.out_group, block=True)
        x = hard_swish(self.head_fc(tf.reduce_mean(x, [1, 2])))
        x = self.site(tap, "head_fc:act", x, self.head_fc.out_group)
        return self.fc_layer(x)


register("MobileNetV3-Small", MobileNetV3, variant="small", alpha=1.0, change_stride_layers=2, num_classes=10,
         input_size=32)
register("MobileNetV3-Large", MobileNetV3, variant="large", alpha=1.0, change_stride_layers=2, num_classes=10,
         input_size=32)
register("MobileNetV3-Small-ImageNet", MobileNetV3, variant="small", alpha=1.0, change_stride_layers=0,
         num_classes=1000, input_size=224)
register("MobileNetV3-Large-ImageNet", MobileNetV3, variant="large", alpha=1.0, change_stride_layers=0,
         num_classes=1000, input_size=224)
