"""ResNet specifics: complexity figures, groups, reference pickle, BN options, strategy/XLA."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

import nets
from op_utils.strategy import make_strategy
from tests.support.nets import assert_close_to_scale, input_for, randomise, small_net, tiny_resnet
from utils.errors import ConfigError, ParamsError
from utils.params_io import load_params

SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_resnet56_complexity_ekg_convention():
    cost = nets.build("ResNet-56", masked=False).cost()
    assert cost.ekg_flops == pytest.approx(126.84e6, rel=1e-3)
    assert cost.ekg_params == pytest.approx(0.860e6, rel=2e-3)
    assert "EKG convention" in cost.describe() and "MMACs" in cost.describe()


def test_resnet20_complexity_ekg_convention():
    cost = nets.build("ResNet-20", masked=False).cost()
    assert cost.ekg_flops == pytest.approx(41.21e6, rel=1e-3)
    assert cost.ekg_params == pytest.approx(0.274e6, rel=3e-3)


def test_resnet50_plain_macs_and_params():
    cost = nets.build("ResNet-50", masked=False).cost()
    assert cost.macs == pytest.approx(4.09e9, rel=0.01)
    assert cost.params == pytest.approx(25.56e6, rel=0.005)


def test_resnet56_groups_follow_the_residual_streams():
    net = nets.build("ResNet-56", masked=False)
    groups = net.prunable_groups()
    assert len(groups) == 30  # 1 stem stream + 2 projection streams + 27 block-internal
    writers = {}
    for layer in net.layers.values():
        if isinstance(layer, nets.layers.Conv2d):
            writers.setdefault(layer.out_group.key, []).append(layer.key)
    # Stage 0's stream is the stem's output: the stem conv and all nine conv2 write into it.
    assert writers["stem"] == ["conv"] + [f"BasicBlock0.{j}/conv2" for j in range(9)]
    assert writers["stage1"] == ["BasicBlock1.0/conv3"] + [f"BasicBlock1.{j}/conv2" for j in range(9)]
    assert net.layers["fc"].in_group is groups["stage2"]


def test_reference_names_and_shapes():
    shapes = nets.build("ResNet-56", masked=False).param_shapes()
    assert shapes["BasicBlock0.0/conv1/kernel:0"] == (3, 3, 16, 16)
    assert shapes["bn/moving_mean:0"] == (1, 1, 1, 16)
    assert shapes["fc/biases:0"] == (1, 10)
    assert shapes["BasicBlock2.0/conv3/kernel:0"] == (1, 1, 32, 64)


def test_params_for_another_architecture_are_named():
    net = nets.build("ResNet-20", masked=False)
    params = nets.build("ResNet-32", masked=False).get_params()
    with pytest.raises(ParamsError) as err:
        net.set_params(params)
    message = str(err.value)
    assert "\n" not in message and "unexpected" in message and "BasicBlock0.3" in message


def test_bad_width_spec():
    with pytest.raises(ConfigError, match="outside"):
        nets.build("ResNet-20", widths={"stem": 99})
    with pytest.raises(ConfigError, match="unknown group"):
        nets.build("ResNet-20", widths={"nope": 3})
    with pytest.raises(ConfigError, match="unknown --arch"):
        nets.build("ResNet-7")


def test_freeze_bn_keeps_moving_statistics():
    net = small_net("ResNet-20")
    randomise(net)
    before = net.get_params()
    net.options.set(freeze_bn=True)
    net(input_for(net), training=True)
    after = net.get_params()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    net.options.set(freeze_bn=False)
    net(input_for(net), training=True)
    moved = net.get_params()
    assert not np.array_equal(before["bn/moving_mean:0"], moved["bn/moving_mean:0"])


def test_mask_keeps_at_least_one_channel():
    net = small_net("ResNet-20")
    with pytest.raises(ValueError, match="at least one"):
        net.groups["stem"].set_mask(np.zeros(16))


def test_masked_net_under_mirrored_strategy_with_xla():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        net = tiny_resnet(seed=3)  # each kind of block once (tests/support/nets.py), a short XLA compile
    x = input_for(net, batch=4)

    def replica_forward(images):
        # One XLA function per replica: a single jit function object shared by the replicas
        # reuses replica 0's variable handles and fails with "Trying to access resource".
        return tf.function(lambda x: net(x, training=True), jit_compile=True)(images)

    @tf.function
    def step(images):
        return strategy.run(replica_forward, args=(images,))

    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[ctx.replica_id_in_sync_group * 2:(ctx.replica_id_in_sync_group + 1) * 2])
    outputs = strategy.experimental_local_results(step(dist))
    small = nets.slim(net)
    for replica, out in enumerate(outputs):
        assert_close_to_scale(out, small(x[replica * 2:(replica + 1) * 2], training=True), err_msg=f"replica {replica}")


@pytest.mark.shared
def test_reference_pickle_gives_93_5_percent():
    pkl = SHARED / "pretrained" / "res56_cifar10.pkl"
    test_batch = SHARED / "cifar-10-batches-py" / "test_batch"
    if not pkl.exists() or not test_batch.exists():
        pytest.skip(f"needs the real data in {SHARED} (absent on this machine)")
    import pickle
    with open(test_batch, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official file; trusted, read-only data
    images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32)
    labels = np.asarray(batch[b"labels"])
    images = (images - np.array([113.9, 123.0, 125.3])) / np.array([66.7, 62.1, 63.0])
    net = nets.build("ResNet-56")
    net.set_params(load_params(pkl))
    # One trace for every batch, the last (shorter) one too.
    forward = tf.function(lambda x: net(x, training=False), input_signature=[tf.TensorSpec([None, 32, 32, 3])])
    logits = np.concatenate([forward(tf.constant(images[i:i + 256], tf.float32)) for i in range(0, len(images), 256)])
    assert len(labels) == 1017
    assert (logits.argmax(1) == labels).mean() == pytest.approx(0.935, abs=0.001)


def test_masked_channels_keep_their_moving_statistics():
    net = small_net("ResNet-20")
    randomise(net)
    net.groups["stem"].keep([0, 1])
    before = net.get_params()["bn/moving_variance:0"].copy()
    net(input_for(net), training=True)
    after = net.get_params()["bn/moving_variance:0"]
    np.testing.assert_array_equal(after[..., 2:], before[..., 2:])
    assert not np.allclose(after[..., :2], before[..., :2])
