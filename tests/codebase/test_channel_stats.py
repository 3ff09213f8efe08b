"""Channel pruning's measurements: which groups it prunes, and the sampled statistics it solves on."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.channel_stats import Sampler, patches_at, problems, values_at, _positions
from codebase.lasso import normal_least_squares
from nets.sites import Record
from tests.support.nets import randomise
from utils.errors import ConfigError


def test_problems_are_the_groups_read_only_by_convs_with_every_reader_and_shortcut():
    net = nets.build("ResNet-8", masked=True)
    found = {p.group: p for p in problems(net)}
    # The classifier reads stage2: kept, as in PocketFlow. The image is not prunable.
    assert list(found) == ["stem", "BasicBlock0.0/conv1", "BasicBlock1.0/conv1", "stage1", "BasicBlock2.0/conv1"]
    # A stream: every conv reading it (the next stage's projection too) and the identity shortcut of its block.
    assert found["stem"].convs == ("BasicBlock0.0/conv1", "BasicBlock1.0/conv3", "BasicBlock1.0/conv1")
    assert found["stem"].shortcuts == ("stem",)
    assert found["BasicBlock0.0/conv1"].convs == ("BasicBlock0.0/conv2",) and not found["BasicBlock0.0/conv1"].shortcuts
    assert found["stem"].writers == ("conv", "BasicBlock0.0/conv2") and found["stem"].stream
    assert found["stage1"].stream and not found["BasicBlock1.0/conv1"].stream
    # PocketFlow's scope: the groups inside blocks only.
    assert [p.group for p in problems(net, streams=False)] == ["BasicBlock0.0/conv1", "BasicBlock1.0/conv1",
                                                               "BasicBlock2.0/conv1"]
    # MobileNetV2: an expansion group is read through its depthwise conv by the projection.
    mobile = {p.group: p for p in problems(nets.build("MobileNetV2", masked=True))}
    assert mobile["block1/expand"].convs == ("block1/project",)


def test_a_net_with_no_group_read_by_convs_only_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="MLP has no channel group read only by convolutions"):
        problems(nets.build("MLP", masked=True))


@pytest.mark.parametrize("arch, key", [("ResNet-8", "BasicBlock1.0/conv1"),  # 3x3, stride 2, SAME
                                       ("ResNet-8", "BasicBlock1.0/conv3"),  # 1x1, stride 2
                                       ("ResNet-20A", "BasicBlock1.0/conv1")])  # explicit (PyTorch) padding
def test_patches_times_the_kernel_are_the_conv_outputs_at_the_sampled_positions(arch, key):
    net = nets.build(arch, masked=True)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    record = Record()
    net(x, training=False, tap=record)
    conv, inputs, outputs = net.layers[key], record.values[f"{key}:in"], record.values[f"{key}:out"]
    positions = _positions(0, key, 0, [3, outputs.shape[1], outputs.shape[2]], 7)
    predicted = tf.einsum("bphwc,hwco->bpo", patches_at(conv, inputs, outputs.shape, positions), conv.kernel)
    np.testing.assert_allclose(predicted, values_at(outputs, positions), atol=1e-5)


def test_statistics_sum_to_the_outputs_and_give_back_the_kernel():
    net = nets.build("ResNet-8", masked=True)
    randomise(net)
    chosen = problems(net)[:2]
    batches = [np.random.default_rng(i).normal(size=(4, 32, 32, 3)).astype(np.float32) for i in range(3)]
    stats = Sampler(net, net, points=64, seed=0).collect(chosen, batches)
    for problem in chosen:
        group = stats[problem.group]
        for key, conv in group.convs.items():
            # The channels' contributions sum to the output: 1^T G 1 = 1^T b = ||y||^2.
            assert conv.count == 3 * 4 * 64
            np.testing.assert_allclose([conv.gram.sum(), conv.lin.sum()], [conv.yy, conv.yy], rtol=1e-5)
            # Nothing pruned: the least squares of the sampled normal equations is the kernel itself.
            kernel = net.layers[key].kernel.numpy()
            np.testing.assert_allclose(normal_least_squares(conv.xx, conv.xy).reshape(kernel.shape), kernel,
                                       atol=2e-4 * np.abs(kernel).max())
    # The stem's identity shortcut: the stream's energy per channel, target and input being the same net.
    stem = stats["stem"]
    assert stem.shortcut_count == 3 * 4 * 64
    np.testing.assert_allclose(stem.shortcut_gram, stem.shortcut_lin)
    gram, lin = stem.lasso_terms()
    # Every reader counts as the mean over its own samples: three convs and the shortcut, summed.
    expected = sum(c.gram / (c.count * c.c_out) for c in stem.convs.values()) + np.diag(stem.shortcut_gram) / (
        stem.shortcut_count * 16)
    assert len(stem.convs) == 3
    np.testing.assert_allclose(gram, expected)
    np.testing.assert_allclose(lin, sum(c.lin / (c.count * c.c_out) for c in stem.convs.values())
                               + stem.shortcut_lin / (stem.shortcut_count * 16))


def test_positions_depend_on_seed_conv_and_batch_only():
    a = _positions(0, "x", 3, [2, 8, 8], 5).numpy()
    np.testing.assert_array_equal(a, _positions(0, "x", 3, [2, 8, 8], 5).numpy())
    assert not np.array_equal(a, _positions(1, "x", 3, [2, 8, 8], 5).numpy())
    assert not np.array_equal(a, _positions(0, "y", 3, [2, 8, 8], 5).numpy())
    assert not np.array_equal(a, _positions(0, "x", 4, [2, 8, 8], 5).numpy())
    assert a.min() >= 0 and a.max() < 8
