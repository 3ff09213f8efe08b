"""Option-A ResNets: PyTorch weights imported through `load_net` compute PyTorch's forward pass.

The reference below is written from the facts of `../shared/data/README.md` alone, in PyTorch's
NCHW layout on the raw OIHW arrays, in float64 numpy: padding 1 on every side, option-A
shortcuts, BatchNorm with moving statistics, average pooling, linear with bias; the input is
`p / 255` normalised with the ImageNet statistics. The weights are random, on 8x8 images.
"""

import json
import re

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.artifacts import load_net, save_net
from dataloader.cifar import CIFAR10_MEAN, CIFAR10_STD
from nets.resnet_a import IMAGENET_MEAN, IMAGENET_STD, input_affine
from tests.support.data import write_cifar10
from tests.support.nets import assert_close_to_scale
from utils.errors import ConfigError, ParamsError
from utils.params_io import load_params

STATS = (CIFAR10_MEAN, CIFAR10_STD)
SIZE = 8


def pytorch_arrays(blocks, seed=0, classes=10):
    """A random state dict of akamaster's option-A ResNet, PyTorch names and layouts."""
    rng = np.random.default_rng(seed)
    arrays = {}

    def conv(name, cin, cout):
        arrays[f"{name}.weight"] = rng.normal(0, 1 / np.sqrt(9 * cin), (cout, cin, 3, 3))

    def bn(name, c):
        arrays.update({f"{name}.weight": rng.uniform(0.5, 1.5, c), f"{name}.bias": rng.normal(0, 0.1, c),
                       f"{name}.running_mean": rng.normal(0, 0.1, c), f"{name}.running_var": rng.uniform(0.5, 1.5, c),
                       f"{name}.num_batches_tracked": np.array(7)})

    conv("conv1", 3, 16)
    bn("bn1", 16)
    cin = 16
    for s, (count, planes) in enumerate(zip(blocks, (16, 32, 64)), start=1):
        for b in range(count):
            conv(f"layer{s}.{b}.conv1", cin, planes)
            bn(f"layer{s}.{b}.bn1", planes)
            conv(f"layer{s}.{b}.conv2", planes, planes)
            bn(f"layer{s}.{b}.bn2", planes)
            cin = planes
    arrays["linear.weight"] = rng.normal(0, 1 / 8, (classes, 64))
    arrays["linear.bias"] = rng.normal(0, 0.1, classes)
    return {k: v if k.endswith("num_batches_tracked") else v.astype(np.float32) for k, v in arrays.items()}


def write_npz(path, arrays):
    np.savez(path, **arrays)
    return str(path)


def reference_logits(arrays, blocks, pixels):
    """PyTorch's forward pass (eval mode) on 0..255 RGB `pixels` [N, H, W, 3]."""
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    x = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    x = x.transpose(0, 3, 1, 2)  # NCHW

    def conv(x, name, stride=1):
        w = a[f"{name}.weight"]
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        oh, ow = (x.shape[2] - 3) // stride + 1, (x.shape[3] - 3) // stride + 1
        taps = ((i, j, x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]) for i in range(3) for j in range(3))
        return sum(np.einsum("nchw,oc->nohw", window, w[:, :, i, j]) for i, j, window in taps)

    def bn(x, name):
        shape = (1, -1, 1, 1)
        mean, var = a[f"{name}.running_mean"].reshape(shape), a[f"{name}.running_var"].reshape(shape)
        return (x - mean) / np.sqrt(var + 1e-5) * a[f"{name}.weight"].reshape(shape) + a[f"{name}.bias"].reshape(shape)

    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    x = relu(bn(conv(x, "conv1"), "bn1"))
    for s, (count, planes) in enumerate(zip(blocks, (16, 32, 64)), start=1):
        for b in range(count):
            stride = 2 if s > 1 and b == 0 else 1
            name = f"layer{s}.{b}"
            out = relu(bn(conv(x, f"{name}.conv1", stride), f"{name}.bn1"))
            out = bn(conv(out, f"{name}.conv2"), f"{name}.bn2")
            shortcut = x
            if stride != 1:
                p = planes // 4
                shortcut = np.pad(x[:, :, ::2, ::2], ((0, 0), (p, p), (0, 0), (0, 0)))
            x = relu(out + shortcut)
    return x.mean(axis=(2, 3)) @ a["linear.weight"].T + a["linear.bias"]


def loader_input(pixels):
    """What the toolkit's CIFAR-10 loader feeds the net: `(p - mean) / std`."""
    return ((pixels - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)).astype(np.float32)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3)).astype(np.float64)


def test_imported_weights_compute_pytorchs_forward_pass(tmp_path, pixels):
    arrays = pytorch_arrays([3, 3, 3])
    path = write_npz(tmp_path / "resnet20.npz", arrays)
    net = load_net("ResNet-20A", path, data_stats=STATS, input_size=SIZE)
    assert net.arch == "ResNet-20A" and not net.masked
    expected = reference_logits(arrays, [3, 3, 3], pixels)
    assert_close_to_scale(net(loader_input(pixels)), expected, rtol=1e-4, floor=1e-5)
    # Traced, grappler fuses convs, folded BNs, residual adds and ReLUs (as in every evaluation).
    compiled = tf.function(lambda x: net(x, training=False))
    assert_close_to_scale(compiled(loader_input(pixels)), expected, rtol=1e-4, floor=1e-5)
    # The import path of RunContext and test.py (data_stats), and the saved spec, rebuild the same net.
    save_net(net, tmp_path / "imported.pkl")
    again = load_net(None, tmp_path / "imported.pkl", input_size=SIZE)
    assert again.config["input_affine"] == net.config["input_affine"]
    np.testing.assert_allclose(again(loader_input(pixels)), net(loader_input(pixels)), rtol=1e-6, atol=1e-6)


def test_the_input_affine_maps_the_loaders_normalisation_to_imagenets(pixels):
    scale, shift = input_affine(CIFAR10_MEAN, CIFAR10_STD)
    # By hand for the red channel: p = x * 66.7 + 113.9, and (p / 255 - 0.485) / 0.229.
    assert scale[0] == pytest.approx(66.7 / 255 / 0.229) and shift[0] == pytest.approx((113.9 / 255 - 0.485) / 0.229)
    theirs = (pixels / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(loader_input(pixels) * scale + shift, theirs, rtol=1e-5, atol=1e-5)
    # The ImageNet statistics themselves in 0..255 units need no affine map.
    identity = input_affine(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255)
    np.testing.assert_allclose(identity, [[1, 1, 1], [0, 0, 0]], atol=1e-12)


def test_input_affine_is_checked_and_none_is_the_identity(pixels):
    with pytest.raises(ConfigError, match="input_affine must be None or"):
        nets.build("ResNet-20A", input_affine=[[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ConfigError, match="RGB"):
        input_affine((33.3,), (78.5,))
    x = loader_input(pixels)
    plain = nets.build("ResNet-20A", input_size=SIZE, masked=False)
    shifted = nets.build("ResNet-20A", input_size=SIZE, masked=False, input_affine=[[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]])
    shifted.set_params(plain.get_params())
    np.testing.assert_allclose(shifted(x), plain(x * 2 + 0.5), rtol=1e-5, atol=1e-5)


def test_complexity_is_the_pytorch_nets():
    net = nets.build("ResNet-20A", masked=False)
    cost = net.cost()
    # akamaster's ResNet-20: 269,722 params (no projection shortcuts); 40.55 M conv and linear MACs.
    trainable = sum(v.size for k, v in pytorch_arrays([3, 3, 3]).items() if k.endswith(("weight", "bias")))
    assert cost.params == trainable == 269_722
    assert cost.macs == 40_551_040
    assert list(net.prunable_groups()) == [f"BasicBlock{i}.{j}/conv1" for i in range(3) for j in range(3)]


@pytest.mark.parametrize("depth, arch, message", [
    (32, "ResNet-20A", "(they hold 5, 5, 5 blocks per stage; ResNet-20A has 3, 3, 3): 60 unexpected "
                       "(first: layer1.3.conv1.weight)"),
    (20, "ResNet-32A", "(they hold 3, 3, 3 blocks per stage; ResNet-32A has 5, 5, 5): 60 missing "
                       "(first: layer1.3.conv1.weight)"),
])
def test_weights_of_another_depth_stop_with_one_line_naming_a_key(tmp_path, depth, arch, message):
    path = write_npz(tmp_path / f"resnet{depth}.npz", pytorch_arrays([(depth - 2) // 6] * 3))
    with pytest.raises(ParamsError, match=re.escape(message)) as err:
        load_net(arch, path, data_stats=STATS)
    assert str(err.value).startswith(f"{path}: PyTorch arrays do not fit {arch}") and "\n" not in str(err.value)


def test_foreign_weights_need_an_arch_that_imports_them_and_the_datas_statistics(tmp_path):
    path = write_npz(tmp_path / "resnet20.npz", pytorch_arrays([3, 3, 3]))
    with pytest.raises(ConfigError, match="ResNet-20 cannot import foreign weights .*archs that can: ResNet-20A"):
        load_net("ResNet-20", path, data_stats=STATS)
    with pytest.raises(ConfigError, match="give --arch"):
        load_net(None, path, data_stats=STATS)
    with pytest.raises(ConfigError, match="needs the data's mean and std"):
        load_net("ResNet-20A", path)
    with pytest.raises(ParamsError, match="params do not fit ResNet-20A: .*mis-shaped .*fc/kernel:0"):
        load_net("ResNet-20A", path, data_stats=STATS, num_classes=100)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ParamsError, match="not a readable weights file"):
        load_net("ResNet-20A", str(tmp_path / "broken.npz"), data_stats=STATS)


def test_an_imported_net_pruned_in_a_block_slims_to_the_masked_outputs(tmp_path, pixels):
    path = write_npz(tmp_path / "resnet20.npz", pytorch_arrays([3, 3, 3], seed=2))
    net = load_net("ResNet-20A", path, masked=True, data_stats=STATS, input_size=SIZE)
    net.groups["BasicBlock1.0/conv1"].keep([0, 5, 9, 31])  # the stride-2 block with an option-A shortcut
    net.groups["BasicBlock2.2/conv1"].keep(np.arange(0, 64, 3))
    small = nets.slim(net)
    assert small.widths()["BasicBlock1.0/conv1"] == 4 and small.config == net.config
    assert small.cost() == net.cost() and small.cost().macs < nets.build("ResNet-20A", input_size=SIZE).cost().macs
    x = loader_input(pixels)
    assert_close_to_scale(small(x), net(x))
    assert_close_to_scale(small(x, training=True), net(x, training=True), rtol=1e-3)


# === Through the scripts: test.py and train_cifar.py take the .npz as --trained_param ===
def test_test_py_evaluates_the_npz_with_the_loaders_statistics(tmp_path, capsys):
    import test as test_script

    data = write_cifar10(tmp_path / "data", per_batch=2, num_test=16)
    arrays = pytorch_arrays([3, 3, 3], seed=3)
    path = write_npz(tmp_path / "resnet20.npz", arrays)
    out = test_script.main(["--arch", "ResNet-20A", "--data_path", str(data.path), "--trained_param", path, "--json",
                            "--latency_runs", "1", "--val_batch_size", "8"])
    expected = reference_logits(arrays, [3, 3, 3], data.test.images.astype(np.float64))
    assert out["count"] == 16 and out["top1"] == pytest.approx(np.mean(expected.argmax(1) == data.test.labels))
    assert out["arch"] == "ResNet-20A" and out["macs"] == 40_551_040
    capsys.readouterr()


@pytest.mark.slow
def test_train_cifar_starts_from_the_npz_and_saves_the_input_affine(tmp_path):
    import train_cifar

    data = write_cifar10(tmp_path / "data", per_batch=4, num_test=8)
    arrays = pytorch_arrays([3, 3, 3], seed=4)
    run = tmp_path / "run"
    train_cifar.main(["--arch", "ResNet-20A", "--method", "none", "--data_path", str(data.path), "--train_path",
                      str(run), "--trained_param", write_npz(tmp_path / "resnet20.npz", arrays), "--train_epoch", "1",
                      "--steps_per_epoch", "1", "--batch_size", "8", "--val_batch_size", "8",
                      "--learning_rate", "1e-9"])
    spec = json.loads((run / "trained_params.arch.json").read_text())
    assert spec["config"]["input_affine"] == input_affine(*STATS)
    trained = load_params(run / "trained_params.pkl")
    np.testing.assert_allclose(trained["conv/kernel:0"], arrays["conv1.weight"].transpose(2, 3, 1, 0), atol=1e-6)
