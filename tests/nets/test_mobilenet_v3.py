"""MobileNetV3-Small/-Large: Keras applications' widths, topology and complexity, the changed strides,
and the squeeze-excite under masks. (tests/nets/test_nets.py runs the properties every registered net
has; the ImageNet-size nets here are built unmasked and never run: cost() needs no forward pass.)"""

import numpy as np
import pytest
import tensorflow as tf

import nets
from nets.mobilenet_v3 import hard_sigmoid, hard_swish, make_divisible
from nets.sites import Record
from tests.support.nets import Pristine, assert_close_to_scale, input_for, lean_net, randomise
from utils.errors import ConfigError

# Keras applications' MobileNetV3Small/Large(weights=None, input_shape=(224, 224, 3), alpha=a), read
# once with Keras 3.15 (building them here would take seconds): per block the expanded width (the
# expand conv's filters; block 0 has none and filters its 16 input channels), the SE squeeze conv's
# filters (0: no SE) and the project conv's filters; the filters of the last conv (conv_1) and of the
# 1x1 conv on the pooled map (conv_2); the blocks that end in an Add; the model's trainable weights,
# its non-trainable ones (the BN moving statistics), and the multiply-accumulates of its Conv2D and
# DepthwiseConv2D layers (output pixels times kernel volume: the SE and head 1x1 convs included).
# Alpha 0.35 makes Small's block 6 residual (40 -> 48 channels become 16 -> 16), alpha 1.25 takes
# Large's block 0 residual away (16 -> 24) and widens conv_2 (alpha > 1).
KERAS = {
    ("small", 1.0): dict(
        expanded=[16, 72, 88, 96, 240, 240, 120, 144, 288, 576, 576],
        squeeze=[8, 0, 0, 24, 64, 64, 32, 40, 72, 144, 144],
        out=[16, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96], head=576, head_fc=1024, residual=[2, 4, 5, 7, 9, 10],
        trainable=2_542_856, moving=12_112, macs=56_510_400),
    ("large", 1.0): dict(
        expanded=[16, 64, 72, 72, 120, 120, 240, 200, 184, 184, 480, 672, 672, 960, 960],
        squeeze=[0, 0, 0, 24, 32, 32, 0, 0, 0, 0, 120, 168, 168, 240, 240],
        out=[16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 160, 160, 160], head=960, head_fc=1280,
        residual=[0, 2, 4, 5, 7, 8, 9, 11, 13, 14], trainable=5_483_032, moving=24_400, macs=216_589_760),
    ("small", 0.35): dict(
        expanded=[16, 40, 32, 32, 96, 96, 48, 48, 96, 192, 192], squeeze=[8, 0, 0, 8, 24, 24, 16, 16, 24, 48, 48],
        out=[8, 8, 8, 16, 16, 16, 16, 16, 32, 32, 32], head=192, head_fc=1024, residual=[2, 4, 5, 6, 7, 9, 10],
        trainable=1_350_344, moving=4_336, macs=15_931_232),
    ("large", 1.25): dict(
        expanded=[16, 96, 96, 96, 144, 144, 288, 264, 240, 240, 624, 864, 864, 1200, 1200],
        squeeze=[0, 0, 0, 24, 40, 40, 0, 0, 0, 0, 160, 216, 216, 304, 304],
        out=[24, 32, 32, 48, 48, 48, 104, 104, 104, 104, 144, 144, 200, 200, 200], head=1200, head_fc=1600,
        residual=[2, 4, 5, 7, 8, 9, 11, 13, 14], trainable=8_255_784, moving=30_976, macs=349_904_800),
}
# The published figures at alpha 1, 224x224: the paper's Tables 3 and 4 (Large 219 M MAdds, 5.4 M
# params; Small 56 M, 2.5 M); Keras's docs table gives Large 217 M, 5.4 M (its Small row, 66 M and
# 2.9 M, is the TF-slim checkpoint's and matches neither the paper nor Keras's own model).
PUBLISHED = {"small": (2.5e6, 56e6), "large": (5.4e6, 219e6)}
# Layers (index 0: the stem, k + 1: block k) whose table stride is 2.
STRIDE_2 = {"small": [0, 1, 2, 4, 9], "large": [0, 2, 4, 7, 13]}


def _arch(variant, imagenet=True):
    return f"MobileNetV3-{variant.title()}" + ("-ImageNet" if imagenet else "")


@pytest.fixture(scope="module")
def imagenet():
    """`imagenet(variant, alpha)`: the unmasked 224x224 net, built once per module."""
    built = {}

    def get(variant, alpha=1.0):
        if (variant, alpha) not in built:
            built[variant, alpha] = nets.build(_arch(variant), alpha=alpha, masked=False)
        return built[variant, alpha]

    return get


@pytest.fixture(scope="module")
def tiny():
    """Small on 16x16 inputs at alpha 0.75 (its lean config, tests/support/nets.py): every kind of
    block, SE on the stem's group (block 0) and on expanded groups, randomised."""
    net = lean_net("MobileNetV3-Small")
    randomise(net)
    return Pristine(net)


def test_make_divisible_hard_sigmoid_and_hard_swish():
    # Keras's _depth: nearest multiple of 8, at least 8, never 10% below the value.
    assert [make_divisible(v) for v in (3, 12, 18, 20, 30, 147.2, 184)] == [8, 16, 24, 24, 32, 144, 184]
    x = tf.constant([-4.0, -3.0, -1.0, 0.0, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(hard_sigmoid(x), [0, 0, 1 / 3, 1 / 2, 2 / 3, 1, 1], atol=1e-7)
    np.testing.assert_allclose(hard_swish(x), [0, 0, -1 / 3, 0, 2 / 3, 3, 4], atol=1e-7)


@pytest.mark.parametrize("variant, alpha", sorted(KERAS))
def test_widths_and_residual_adds_are_keras_applications(imagenet, variant, alpha):
    net, want = imagenet(variant, alpha), KERAS[variant, alpha]
    blocks = net.blocks
    assert [b["dw"].group.size for b in blocks] == want["expanded"]
    assert [b["squeeze"].out_group.size if "squeeze" in b else 0 for b in blocks] == want["squeeze"]
    assert [b["project"].out_group.size for b in blocks] == want["out"]
    assert (net.head.out_group.size, net.head_fc.out_group.size) == (want["head"], want["head_fc"])
    assert [k for k, b in enumerate(blocks) if b["residual"]] == want["residual"]
    # Block 0 has no expand conv: its depthwise conv, SE and project conv read the stem's stream,
    # which Large's block 0 (16 -> 16, stride 1, at alpha 1) also writes into.
    stem = net.groups["stem"]
    assert net.stem.out_group.size == 16 and "expand" not in blocks[0] and blocks[0]["dw"].group is stem
    assert all("expand" in b for b in blocks[1:])
    assert (blocks[0]["project"].out_group is stem) == blocks[0]["residual"]
    # A residual block adds into its input's stream; the others open one.
    for k, block in enumerate(blocks[1:], 1):
        assert (block["project"].out_group is blocks[k - 1]["project"].out_group) == block["residual"], k


@pytest.mark.parametrize("variant, alpha", sorted(KERAS))
def test_complexity_is_keras_applications(imagenet, variant, alpha):
    # Exact: the same layers as Keras's model. Plain params are its trainable weights (BN gamma and
    # beta, the SE and head biases included); the EKG convention adds both moving statistics, which
    # are Keras's non-trainable weights; MACs are its convs' (SE and head layers as dense layers here).
    cost, want = imagenet(variant, alpha).cost(), KERAS[variant, alpha]
    assert (cost.params, cost.ekg_params - cost.params, cost.macs) == (want["trainable"], want["moving"], want["macs"])


@pytest.mark.parametrize("variant", ["small", "large"])
def test_imagenet_nets_are_close_to_the_published_figures(imagenet, variant):
    # 2%: the published figures have two significant digits (2.5 M is anything from 2.45 to 2.55 M,
    # +-2%), and their counting convention is unstated (219 M MAdds for Large in the paper, 217 M in
    # Keras's docs). Measured: Small 2.54 M params (+1.7%), 56.5 M MACs (+0.9%); Large 5.48 M (+1.5%),
    # 216.6 M (-1.1%; 217 M in Keras's docs). The exact check against Keras's model is above.
    cost = imagenet(variant).cost()
    params, macs = PUBLISHED[variant]
    assert cost.params == pytest.approx(params, rel=0.02) and cost.macs == pytest.approx(macs, rel=0.02)


# n = 2 is the registered CIFAR net's (32x32 inputs); 1 and 5 are set on the ImageNet net.
CHANGED = [(v, a, n) for v in ("small", "large") for a, n in ((_arch(v), 1), (_arch(v, False), 2), (_arch(v), 5))]


@pytest.mark.parametrize("variant, arch, n", CHANGED)
def test_change_stride_layers_gives_the_first_n_stride_2_layers_stride_1(imagenet, variant, arch, n):
    net = nets.build(arch, masked=False, **({} if n == 2 else {"change_stride_layers": n}))
    assert net.config["change_stride_layers"] == n  # the CIFAR nets are registered with 2
    strides = [net.stem.strides] + [b["dw"].strides for b in net.blocks]
    assert [i for i, s in enumerate(strides) if s == 2] == STRIDE_2[variant][n:]
    size = net.config["input_size"]
    assert net.head.out_hw == (size >> (5 - n),) * 2  # 32x32 CIFAR inputs end at 4x4
    # Only strides change (ShuntConnector's modify_model): the same residual adds, groups and
    # parameter shapes as the ImageNet net (whose classifier has 1000 classes).
    full = imagenet(variant)
    assert [b["residual"] for b in net.blocks] == [b["residual"] for b in full.blocks]
    assert net.full_sizes == {**full.full_sizes, "logits": net.groups["logits"].size}
    assert {k: s for k, s in net.param_shapes().items() if not k.startswith("fc/")} == \
        {k: s for k, s in full.param_shapes().items() if not k.startswith("fc/")}


def test_bad_configs_are_refused():
    for config in (dict(change_stride_layers=6), dict(change_stride_layers=-1), dict(alpha=0.0), dict(variant="tiny")):
        with pytest.raises(ConfigError):
            nets.build("MobileNetV3-Small", masked=False, **config)


def test_cost_counts_the_squeeze_excite_layers(imagenet):
    net = imagenet("small")
    expanded, squeeze = net.groups["block3/expand"].size, net.groups["block3/squeeze"].size
    assert (expanded, squeeze) == (96, 24)
    full, narrow = net.cost(), net.cost({"block3/squeeze": 8})
    # Two dense layers 96 -> squeeze -> 96, each with a bias.
    assert full.macs - narrow.macs == 2 * expanded * (squeeze - 8)
    assert full.params - narrow.params == (2 * expanded + 1) * (squeeze - 8)


def test_squeeze_excite_masked_equals_slimmed(tiny):
    net = tiny.restored()
    rng = np.random.default_rng(3)
    se_blocks = [k for k, b in enumerate(net.blocks) if "squeeze" in b]
    # Remove channels of every group an SE block touches: the expanded groups (the stem's, for
    # block 0) and the squeeze units.
    for k in se_blocks:
        for group in (net.blocks[k]["dw"].group, net.blocks[k]["squeeze"].out_group):
            group.keep(rng.choice(group.size, size=max(1, group.size // 2), replace=False))
    x = tf.constant(input_for(net, batch=4))
    record = Record(lambda site: site.name.endswith(("/squeeze:act", "/excite:act")))
    net(x, training=False, tap=record)
    for k in se_blocks:
        for name, group in ((f"block{k}/excite:act", net.blocks[k]["dw"].group),
                            (f"block{k}/squeeze:act", net.blocks[k]["squeeze"].out_group)):
            removed = np.flatnonzero(group.mask_numpy() == 0)
            value = record.values[name].numpy()
            assert removed.size and np.all(value[..., removed] == 0), name  # exactly zero after the multiply
        assert np.any(record.values[f"block{k}/excite:act"].numpy() != 0)
    # Inference only: tests/nets/test_nets.py compares training mode too, on random masks of every group.
    small = nets.slim(net)
    assert small.widths() == net.widths() and small.cost() == net.cost()
    assert_close_to_scale(small(x), net(x), err_msg="squeeze-excite masks")


def test_sites_name_every_block_and_activation(tiny):
    net = tiny.restored()
    sites = {s.name: s for s in net.sites() if s.final}
    blocks = [name for name, s in sites.items() if s.kind == "block"]
    assert blocks == ["stem"] + [f"block{k}" for k in range(11)] + ["head"]
    assert [name for name, s in sites.items() if s.linear] == blocks[1:-1]  # the blocks end in a linear BN or add
    stem = net.groups["stem"]
    assert sites["block0/excite:act"].group is stem and sites["block0/dw_bn:act"].group is stem
    assert sites["block0/squeeze:act"].group is net.groups["block0/squeeze"]
    assert "block0/expand_bn:act" not in sites and sites["block1/expand_bn:act"].group is net.groups["block1/expand"]
    assert sites["head_fc:act"].group is net.groups["head_fc"] and sites["head"].group is net.groups["head"]
