"""Shunted nets (`nets.shunt`): strides and channels at both ends, a shunt equal to the blocks it replaces,
masked equals slimmed, the spec round trip, and bad placements as one line naming the blocks and the net."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.artifacts import load_net, save_net
from nets import shunt
from tests.support.nets import assert_close_to_scale, random_masks, randomise
from utils.errors import ConfigError

X = tf.random.stateless_normal([2, 16, 16, 3], seed=[1, 2])
SMALL = {"input_size": 16}  # the CIFAR nets at 16x16: the same halvings (the last map 2x2), a quarter of the work


def block_outputs(net, x):
    outputs = {}

    def tap(site, y):
        if site.kind == "block":
            outputs[site.name] = y
        return y

    net(x, training=False, tap=tap)
    return outputs


@pytest.mark.parametrize("arch, first, last, kind, halvings", [
    ("MobileNetV2", "block1", "block2", 4, 0),   # 16x16 -> 16x16, 16 -> 24 channels
    ("MobileNetV2", "block3", "block5", 1, 1),   # 16x16 -> 8x8, 24 -> 32 channels
    ("MobileNetV2", "block3", "block10", 1, 2),  # 16x16 -> 4x4, 24 -> 96 channels
    ("MobileNetV2", "block2", "block16", 5, 3),  # 16x16 -> 2x2, 24 -> 320 channels
    ("MobileNetV3-Small", "block3", "block8", 1, 2),  # 8x8 -> 2x2, squeeze-excite blocks inside
    ("ResNet-20", "BasicBlock0.1", "BasicBlock2.0", 1, 2),
    ("ResNet-20", "BasicBlock1.1", "BasicBlock1.2", 4, 0),
])
def test_the_shunt_matches_the_shapes_at_both_ends_with_strides_derived_from_them(arch, first, last, kind, halvings):
    original = nets.build(arch, masked=False, **SMALL)
    shunted = nets.build(arch, masked=False, shunts=[shunt.entry(first, last, kind, expand=24, bottleneck=8)], **SMALL)
    before, after = block_outputs(original, X), block_outputs(shunted, X)
    assert after[last].shape == before[last].shape
    names = [s.name for s in shunted.sites() if s.kind == "block"]
    assert first not in names or first == last
    replaced, = shunted.shunt_list
    strides = [stage["dw"].strides for stage in replaced.stages]
    assert len(strides) == shunt.STAGES[kind]
    assert sum(s == 2 for s in strides) == halvings and strides == sorted(strides, reverse=True)
    assert shunted(X).shape == original(X).shape


def test_a_shunt_built_like_the_block_it_replaces_computes_the_same_outputs():
    # MobileNetV2's block1 (CIFAR strides) is expand 16 -> 96, depthwise 3x3 stride 1, project -> 24 with
    # no residual add: exactly a one-stage shunt (arch 4) of expand 96. Given the block's weights, the
    # shunted net must compute what the original computes, at every later block and at the logits.
    original = nets.build("MobileNetV2", masked=False, **SMALL)
    randomise(original, seed=3)
    shunted = nets.build("MobileNetV2", masked=False, shunts=[shunt.entry("block1", "block1", 4, expand=96)], **SMALL)
    params = original.get_params()
    rename = {"shunt0/expand0": "block1/expand", "shunt0/expand0_bn": "block1/expand_bn", "shunt0/dw0": "block1/dw",
              "shunt0/dw0_bn": "block1/dw_bn", "shunt0/project0": "block1/project",
              "shunt0/project0_bn": "block1/project_bn"}
    own = {}
    for key in shunted.get_params():
        scope, _, name = key.rpartition("/")
        own[key] = params[f"{rename.get(scope, scope)}/{name}"]
    shunted.set_params(own)
    before, after = block_outputs(original, X), block_outputs(shunted, X)
    for name in ("block1", "block2", "block16", "head"):
        np.testing.assert_allclose(after[name].numpy(), before[name].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(shunted(X).numpy(), original(X).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, first, last", [("MobileNetV2", "block2", "block6"),
                                               ("MobileNetV3-Large", "block4", "block9"),
                                               ("ResNet-8", "BasicBlock0.0", "BasicBlock1.0")])
def test_a_masked_shunted_net_equals_its_slimmed_net_and_its_spec_rebuilds_it(arch, first, last, tmp_path):
    entry = shunt.entry(first, last, 1, expand=16, bottleneck=8)
    net = nets.build(arch, masked=True, shunts=[entry], **SMALL)
    randomise(net, seed=1)
    random_masks(net, seed=2)
    small = nets.slim(net)
    assert small.widths()["shunt0/expand0"] < 16 or small.widths()["shunt0/project0"] < 8 or \
        small.widths()["shunt0/expand1"] < 16
    assert_close_to_scale(small(X), net(X))
    save_net(small, str(tmp_path / "net.pkl"))
    again = load_net(arch, str(tmp_path / "net.pkl"), **SMALL)
    assert again.spec() == small.spec() and again.config["shunts"][0]["first"] == first
    np.testing.assert_allclose(again(X).numpy(), small(X).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, runs, message", [
    ("MobileNetV2", [("block1", "block99", 1)], "MobileNetV2: shunt block1..block99 names no block 'block99'"),
    ("MobileNetV2", [("block6", "block2", 1)], "MobileNetV2: shunt block6..block2 is not a contiguous run"),
    ("MobileNetV2", [("block1", "block6", 1), ("block5", "block8", 1)], "shunt block5..block8 overlaps"),
    ("MobileNetV2", [("block3", "block10", 4)], "MobileNetV2: shunt block3..block10 halves the map 2 times; shunt "
                                                "arch 4 makes at most 1"),
    ("ResNet-20", [("BasicBlock0.0", "BasicBlock9.9", 1)], "ResNet-20: shunt BasicBlock0.0..BasicBlock9.9 names no"),
])
def test_bad_placements_are_one_line_naming_the_blocks_and_the_net(arch, runs, message):
    entries = [shunt.entry(a, b, kind) for a, b, kind in runs]
    with pytest.raises(ConfigError, match=message):
        nets.build(arch, masked=False, shunts=entries)


def test_the_block_table_lists_every_block_with_its_residual_flag():
    table = nets.build("MobileNetV2", masked=False).block_table
    assert [b.name for b in table] == [f"block{k}" for k in range(17)]
    assert [b.name for b in table if b.residual] == ["block2", "block4", "block5", "block7", "block8", "block9",
                                                    "block11", "block12", "block14", "block15"]
    small = nets.build("MobileNetV3-Small", masked=False).block_table
    assert [b.name for b in small if b.residual] == ["block2", "block4", "block5", "block7", "block9", "block10"]
    resnet = nets.build("ResNet-20", masked=False).block_table
    assert [b.name for b in resnet if not b.residual] == ["BasicBlock1.0", "BasicBlock2.0"]
    shunted = nets.build("ResNet-20", masked=False, shunts=[shunt.entry("BasicBlock0.1", "BasicBlock0.2")])
    assert [b.name for b in shunted.block_table][:2] == ["BasicBlock0.0", "BasicBlock1.0"]
