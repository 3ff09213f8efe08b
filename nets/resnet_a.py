"""CIFAR ResNet-20/32/44/56 with option-A shortcuts, as in akamaster/pytorch_resnet_cifar10.

3x3 stem conv to 16 channels - BN - ReLU, three stages of n basic blocks (16/32/64 channels,
strides 1/2/2), global average pooling, a dense classifier with bias. A block is conv1 (carries
the stride) - BN - ReLU - conv2 - BN - add shortcut - ReLU; convs have no bias, BN epsilon is
1e-5 and gamma starts at 1 (PyTorch's defaults). The differences to `nets.resnet`'s option-B
ResNets are PyTorch's:

* padding: every 3x3 conv pads one pixel on every side, the stride-2 ones too (TensorFlow's
  "SAME" pads a stride-2 conv on an even map by 0 before and 1 after, which gives other
  outputs). The convs pad explicitly, `tf.nn.conv2d`'s explicit padding (zeros, then a VALID
  convolution), and are declared with the padded input size, from which `Conv2d` computes the
  VALID output size: output sizes and complexity are PyTorch's. A `tf.pad` before each VALID
  conv computes the same, but its traced inference graph (pad, conv with the folded BN,
  residual add, ReLU) crashed TF 2.21's CPU runtime with a segmentation fault in 6 of 8
  processes that ran 20 batch-1 forward passes of six ResNet-32As; with oneDNN off, without
  the fold, or with the conv's own padding (as here) none of 10 did;
* shortcut "option A", parameter-free: where the stride is 2, the even rows and columns of the
  block's input, zero-padded by planes/4 channels on both sides (16 -> 32: 8 before, 8 after).

Channel groups, declared below:
* `stem`, `stage1`, `stage2`: the residual streams of the three stages (16, 32, 64 channels),
  declared `prunable=False`. Option A couples them in a way a group cannot express: stage i's
  stream sits in the middle of stage i+1's (channels 8..23 of `stage1` add `stem`'s, subsampled),
  so removing a channel from one stream would leave a channel of the next one without its
  shortcut rather than remove it;
* `BasicBlock{i}.{j}/conv1`: a block's internal width, the only prunable groups.

Activation sites: `<bn1 key>:act` after each block's bn1 + ReLU, where its conv1 group is final;
the block outputs (`stem`, `BasicBlock1.2`, after their ReLU), whose streams are fixed, so a
search gates nothing there; and every layer's input and output.

Input: the weights expect RGB in [0, 1] normalised with the ImageNet mean and std. The config
value `input_affine` (`[scale, shift]`, 3 floats each; None = identity) is applied as
`x * scale + shift` before anything else, so a net fed the data loader's normalisation computes
on exactly the input the weights were trained on; `import_arrays` sets it from the loader's
statistics (`input_affine`).

PyTorch's arrays (a `.npz` of its state dict: `conv1.weight` OIHW, `bn1.{weight,bias,
running_mean,running_var}`, `layer{s}.{b}.conv{1,2}.weight`, `layer{s}.{b}.bn{1,2}.*`,
`linear.{weight,bias}`) become this net's params with `params_from_pytorch`.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import tensorflow as tf

from nets.base import Net
from nets.resnet import residual_segments
from nets.layers import conv_bn
from nets.registry import register
from utils.errors import ConfigError, ParamsError

DEPTHS, STRIDES = (16, 32, 64), (1, 2, 2)
# The normalisation of the PyTorch weights, on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


# PyTorch's `padding=1` as `tf.nn.conv2d`'s explicit padding: one zero pixel on every side.
_TORCH_PADDING = ((0, 0), (1, 1), (1, 1), (0, 0))


def _padded(hw):
    """The input size a conv with `_TORCH_PADDING` convolves (what `Conv2d` counts from)."""
    return tuple(s + 2 for s in hw)


def _check_affine(value):
    """`input_affine` as plain `[[3 floats], [3 floats]]` (JSON), or None."""
    if value is None:
        return None
    try:
        scale, shift = (np.asarray(v, np.float64) for v in value)
        ok = scale.shape == shift.shape == (3,) and np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"input_affine must be None or [scale, shift] of 3 finite floats each, got {value!r}")
    return [scale.tolist(), shift.tolist()]


def input_affine(data_mean, data_std, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    """`[scale, shift]` mapping the loader's input to the weights' one, per RGB channel.

    The loader feeds `x = (p - data_mean) / data_std` of 0..255 pixels `p`; the weights expect
    `(p / 255 - mean) / std`, which is `x * data_std / (255 std) + (data_mean / 255 - mean) / std`.
    """
    data_mean, data_std = np.asarray(data_mean, np.float64), np.asarray(data_std, np.float64)
    if data_mean.shape != (3,) or data_std.shape != (3,):
        raise ConfigError(f"option-A ResNets take RGB images; the data has {data_mean.size} channel(s)")
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return [(data_std / (255.0 * std)).tolist(), ((data_mean / 255.0 - mean) / std).tolist()]


def _pytorch_layers(blocks) -> list:
    """`(PyTorch module, param scope, kind)` of every layer, in this net's declaration order."""
    layers = [("conv1", "conv", "conv"), ("bn1", "bn", "bn")]
    for i, count in enumerate(blocks):
        for j in range(count):
            for k in (1, 2):
                layers += [(f"layer{i + 1}.{j}.conv{k}", f"BasicBlock{i}.{j}/conv{k}", "conv"),
                           (f"layer{i + 1}.{j}.bn{k}", f"BasicBlock{i}.{j}/bn{k}", "bn")]
    return layers + [("linear", "fc", "fc")]


def _blocks_in(keys) -> list:
    """Blocks per stage that PyTorch keys hold (`layer{s}.{b}.conv1.weight`)."""
    counts = [0, 0, 0]
    for key in keys:
        m = re.fullmatch(r"layer([123])\.(\d+)\.conv1\.weight", key)
        if m:
            stage = int(m.group(1)) - 1
            counts[stage] = max(counts[stage], int(m.group(2)) + 1)
    return counts


def params_from_pytorch(arrays, blocks, what: str = "ResNet-A") -> dict:
    """This net's params (`{"scope/var:0": ndarray}`) from PyTorch's state-dict arrays.

    Kernels OIHW -> HWIO, the linear weight [out, in] -> [in, out], its bias -> [1, C], BN
    tensors -> [1, 1, 1, C]; `num_batches_tracked` counters are ignored.

    Args:
        arrays: PyTorch name -> array (for example a `numpy.load`ed `.npz`).
        blocks: blocks per stage of the net (3, 3, 3 for ResNet-20A).
        what: the net's name, for the error message.

    Raises:
        ParamsError: arrays of another net (another depth): one line naming the first missing
            and the first unexpected key.
    """
    layers = _pytorch_layers(blocks)
    suffixes = {"conv": ("weight",), "bn": tuple(_BN), "fc": ("weight", "bias")}
    expected = [f"{module}.{s}" for module, _, kind in layers for s in suffixes[kind]]
    have = [k for k in arrays if not k.endswith("num_batches_tracked")]
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(set(have) - set(expected), key=have.index)
    if missing or unexpected:
        problems = [f"{len(missing)} missing (first: {missing[0]})"] if missing else []
        problems += [f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else []
        found, ours = _blocks_in(have), list(blocks)
        depth = "" if not any(found) or found == ours else \
            f" (they hold {', '.join(map(str, found))} blocks per stage; {what} has {', '.join(map(str, ours))})"
        raise ParamsError(f"PyTorch arrays do not fit {what}{depth}: " + ", ".join(problems))

    def array(key, ndim):
        value = np.asarray(arrays[key], np.float32)
        if value.ndim != ndim:
            raise ParamsError(f"PyTorch arrays do not fit {what}: {key} has {value.ndim} dimensions, expected {ndim}")
        return value

    params = {}
    for module, scope, kind in layers:
        if kind == "conv":
            params[f"{scope}/kernel:0"] = array(f"{module}.weight", 4).transpose(2, 3, 1, 0)
        elif kind == "bn":
            for name, ours in _BN.items():
                params[f"{scope}/{ours}:0"] = array(f"{module}.{name}", 1).reshape(1, 1, 1, -1)
        else:
            params[f"{scope}/kernel:0"] = array(f"{module}.weight", 2).T
            params[f"{scope}/biases:0"] = array(f"{module}.bias", 1).reshape(1, -1)
    return params


class ResNetA(Net):
    """Option-A CIFAR ResNet (see the module docstring).

    Args:
        arch: registry name.
        blocks: number of blocks per stage.
        num_classes, input_size: classifier width and the (square) input size.
        input_affine: `[scale, shift]` (3 floats each) applied to the input first, or None.
        widths, masked: see `Net`.
    """

    def __init__(self, arch, blocks, num_classes=10, input_size=32, input_affine=None, widths=None, masked=True):
        affine = _check_affine(input_affine)
        config = dict(blocks=list(blocks), num_classes=num_classes, input_size=input_size, input_affine=affine)
        super().__init__(arch, config, widths, masked)
        self.affine = None if affine is None else tuple(np.asarray(v, np.float32) for v in affine)

        # === Stem ===
        hw = (input_size, input_size)
        image = self.group("input", 3, prunable=False)
        stream = self.group("stem", DEPTHS[0], prunable=False)
        self.stem = self.conv("conv", image, stream, 3, _padded(hw), padding=_TORCH_PADDING)
        hw = self.stem.out_hw
        self.stem_bn = self.bn("bn", stream, hw)

        # === Stages ===
        self.blocks, self.shortcut_pads, self.block_names = [], [], []
        for i, (count, depth, stride) in enumerate(zip(blocks, DEPTHS, STRIDES)):
            for j in range(count):
                name = f"BasicBlock{i}.{j}/"
                s = stride if j == 0 else 1
                new_stream = self.group(f"stage{i}", depth, prunable=False) if s > 1 else stream
                inner = self.group(name + "conv1", depth)
                block = {"conv1": self.conv(name + "conv1", stream, inner, 3, _padded(hw), strides=s,
                                            padding=_TORCH_PADDING)}
                out_hw = block["conv1"].out_hw
                block["bn1"] = self.bn(name + "bn1", inner, out_hw)
                block["conv2"] = self.conv(name + "conv2", inner, new_stream, 3, _padded(out_hw),
                                           padding=_TORCH_PADDING)
                block["bn2"] = self.bn(name + "bn2", new_stream, out_hw)
                self.blocks.append(block)
                self.block_names.append(name.rstrip("/"))
                self.shortcut_pads.append(depth // 4 if s > 1 else 0)  # option A: planes/4 on both sides
                stream, hw = new_stream, out_hw

        # === Head ===
        self.fc_layer = self.fc("fc", stream, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    @classmethod
    def import_arrays(cls, arch, arrays, data_stats, config) -> tuple:
        """PyTorch's arrays as `(params, config changes)` (the import protocol of `codebase.artifacts`).

        Args:
            arch: the registered name.
            arrays: the `.npz`'s arrays, PyTorch names.
            data_stats: `(mean, std)` of 0..255 pixels with which the data loader normalises
                the images the net will be fed (`DatasetInfo.mean`, `.std`).
            config: the net's config (registered defaults and overrides).

        Returns:
            The params, and `{"input_affine": ...}` mapping the loader's normalisation to the
            ImageNet one the weights expect.
        """
        if data_stats is None:
            raise ConfigError(f"{arch}: importing PyTorch weights needs the data's mean and std, to map its "
                              "normalisation to the ImageNet one the weights expect")
        params = params_from_pytorch(arrays, config["blocks"], what=arch)
        return params, {"input_affine": input_affine(*data_stats)}

    def _stem(self, x, training, tap=None):
        if self.affine is not None:
            x = x * self.affine[0] + self.affine[1]  # before the conv's padding: PyTorch pads the normalised image
        x = tf.nn.relu(self.stem_bn(self.stem(x), training))
        return self.site(tap, "stem", x, self.stem.out_group, block=True)

    def _block(self, name, block, pad, x, training, tap=None):
        shortcut = x
        if pad:
            shortcut = tf.pad(x[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [pad, pad]])
        y = tf.nn.relu(block["bn1"](block["conv1"](x), training))
        y = self.site(tap, block["bn1"].key + ":act", y, block["conv1"].out_group)
        # Folded where the residual add follows, as in `nets.resnet` (see `conv_bn`).
        y = conv_bn(block["conv2"], block["bn2"], y, training)
        return self.site(tap, name, tf.nn.relu(y + shortcut), block["conv2"].out_group, block=True)

    def _head(self, x, training, tap=None):
        return self.fc_layer(tf.reduce_mean(x, [1, 2]))

    def segments(self):
        return residual_segments(self, lambda i: functools.partial(
            self._block, self.block_names[i], self.blocks[i], self.shortcut_pads[i]))

    def forward(self, x, training, tap=None):
        for segment in self.segments():
            x = segment.fn(x, training, tap)
        return x


for _depth in (20, 32, 44, 56):
    register(f"ResNet-{_depth}A", ResNetA, blocks=[(_depth - 2) // 6] * 3)
