"""Small helpers shared by the nets tests."""

import numpy as np
import tensorflow as tf

import nets
from nets.base import Net
from nets.registry import lookup
from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.task import Classify
from op_utils.trainer import Trainer

# Test-sized configs: ImageNet nets at 64x64 keep the structure (every stride) but run fast.
SMALL = {
    "ResNet-18": dict(input_size=64, num_classes=7),
    "ResNet-34": dict(input_size=64, num_classes=7),
    "ResNet-50": dict(input_size=64, num_classes=7),
    "MobileNetV2-ImageNet": dict(input_size=64, num_classes=7),
    "MobileNetV3-Small-ImageNet": dict(input_size=64, num_classes=7),
    "MobileNetV3-Large-ImageNet": dict(input_size=64, num_classes=7),
}


# Lean configs for the heavy per-family tests (masked == slimmed, pickles, tracing, compact mode,
# compactors, padding, sites). Their cost is building, randomising and slimming the variables and
# running or tracing every layer; fewer blocks and narrower stages cut it, and every code path
# stays:
# * ResNet-20A: one block per stage (an identity block, two option-A stride-2 zero-padded shortcuts);
# * ResNet-18: one basic block per stage (stage 0's identity block, three projection blocks);
# * ResNet-50: two bottlenecks in stage 0 (a stride-1 projection and an identity bottleneck), one
#   in each later stage (stride-2 projections);
# * VGG-16: its thirteen convs, five max-pools and flattened classifier at a quarter of the widths;
# * MobileNetV2 (no depth setting): 16x16 inputs, as the ImageNet nets run at 64x64 in `SMALL`;
#   every stride still halves a map (the last one is 2x2).
# * MobileNetV3-Small/-Large (no depth setting either): as MobileNetV2, 16x16 inputs for the CIFAR
#   nets (whose first two stride-2 layers have stride 1) and `SMALL`'s 64x64 for the ImageNet ones,
#   so the last map is 2x2 (on 1x1 maps the batch statistics of 3-4 examples amplify round-off past
#   the tolerances), at alpha 0.75, the smallest width multiplier Keras has ImageNet weights for;
#   it keeps every residual add and group of alpha 1.
# Tests of registered depths and figures (output shapes, complexity, compactor counts) keep `small_net`.
# A net registered with dropout (hinton-1200) runs without it in its lean config (`lean_config`):
# these tests compare two training-mode forward passes (masked and slimmed, padded and slimmed),
# which random dropout masks would make differ; tests/nets/test_mlp.py tests the dropout itself.
LEAN = {
    "ResNet-20A": dict(blocks=[1, 1, 1]),
    "ResNet-18": dict(blocks=[1, 1, 1, 1]),
    "ResNet-50": dict(blocks=[2, 1, 1, 1]),
    "VGG-16": dict(stages=[[16, 16], [32, 32], [64, 64, 64], [128, 128, 128], [128, 128, 128]], hidden=128),
    "MobileNetV2": dict(input_size=16),
    "MobileNetV3-Small": dict(input_size=16, alpha=0.75),
    "MobileNetV3-Large": dict(input_size=16, alpha=0.75),
    "MobileNetV3-Small-ImageNet": dict(alpha=0.75),
    "MobileNetV3-Large-ImageNet": dict(alpha=0.75),
}


def family_representatives(archs=None):
    """The registered nets that the heavy per-net tests run on: one per family.

    A family is the registered names whose class and default config differ only in their block
    counts (ResNet-20/32/56/110; ResNet-18/34), or only in their strides, input size and classes
    (MobileNetV2 and MobileNetV2-ImageNet, MobileNetV3-Small and MobileNetV3-Small-ImageNet): a
    deeper or larger variant runs the same code, so only its shallowest, smallest member is kept.
    Everything else (ResNet-50's bottlenecks) is a family of its own, and a newly registered net is
    tested automatically.
    """
    same = {"blocks", "strides", "stem_stride", "change_stride_layers", "input_size", "num_classes"}
    families = {}
    for arch in nets.list_archs() if archs is None else archs:
        _, cls, defaults = lookup(arch)
        rest = {k: v for k, v in defaults.items() if k not in same}
        key = (cls, repr(sorted(rest.items())))
        size = (sum(defaults.get("blocks", ())), defaults.get("input_size", 0))
        if key not in families or size < families[key][0]:
            families[key] = (size, arch)
    return [arch for _, arch in families.values()]


def assert_close_to_scale(actual, expected, rtol=1e-4, floor=1e-4, err_msg=""):
    """Asserts that `actual` equals `expected` element by element, at `expected`'s own scale.

    Each element may differ by `rtol * |expected|` plus `floor * max|expected|`, the largest
    magnitude of this same output: random deep nets and renormalised one-channel groups reach
    logits of 1e4 to 1e7, float32 round-off grows with them, and small elements beside large ones
    need the absolute allowance. The scale is always the compared output's own (never, say, the
    inference logits' for a training-mode output), so a zero or otherwise wrong output cannot
    hide under it, and a reference that is all zero, which proves nothing, fails.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{err_msg}: shape {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, f"{err_msg}: the reference output is all zero"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=floor * scale, err_msg=err_msg)


def small_net(arch, **kwargs):
    return nets.build(arch, **{**SMALL.get(arch, {}), **kwargs})


def lean_config(arch):
    """The config overrides of `lean_net(arch)` (pass them to `nets.build_from_params`): `SMALL`,
    `LEAN`, and no dropout."""
    _, _, defaults = lookup(arch)
    no_dropout = {"dropout": [0.0] * len(defaults["dropout"])} if "dropout" in defaults else {}
    return {**SMALL.get(arch, {}), **LEAN.get(arch, {}), **no_dropout}


def lean_net(arch, **kwargs):
    """`small_net` with the `LEAN` config: same code paths, a fraction of the layers or widths."""
    return nets.build(arch, **{**lean_config(arch), **kwargs})


class Pristine:
    """A built net shared by several tests (a module-scoped fixture), with its state at hand.

    `restored()` gives the net back exactly as it was handed in: its params (moving statistics
    included), all masks open and the mask options off. It refuses a net with attached
    transforms or recomputation, which it cannot undo.
    """

    def __init__(self, net):
        self.net = net
        self.params = net.get_params()

    def restored(self):
        net = self.net
        assert not net.attachments() and not net._recompute, "Pristine cannot undo transforms or recomputation"
        net.set_params(self.params)
        net.reset_masks()
        if net.options is not None:
            net.options.set(renorm=False, freeze_bn=False, compact=False)
        return net


def input_for(net, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    size = net.config.get("input_size", 28)
    channels = net.groups["input"].size if "input" in net.groups else 1
    return rng.normal(size=(batch, size, size, channels)).astype(np.float32)


def randomise(net, seed=0):
    """Random but well-conditioned params (BN gammas, moving stats) so every path matters."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, value in net.get_params().items():
        if key.endswith("moving_variance:0"):
            params[key] = rng.uniform(0.5, 1.5, value.shape)
        elif key.endswith("gamma:0"):
            params[key] = rng.uniform(0.5, 1.5, value.shape)
        elif key.endswith(("beta:0", "moving_mean:0", "biases:0")):
            params[key] = rng.normal(0, 0.1, value.shape)
        else:
            fan_in = int(np.prod(value.shape[:-1])) or 1
            params[key] = rng.normal(0, 1.0 / np.sqrt(fan_in), value.shape)
    net.set_params(params)


def random_masks(net, seed=0, single=None):
    """Random masks on every prunable group; `single` (a group key, or several) keeps only one
    channel of each such group."""
    rng = np.random.default_rng(seed)
    singles = {single} if isinstance(single, str) else set(single or ())
    for key, group in net.prunable_groups().items():
        if key in singles:
            keep = [int(rng.integers(group.size))]
        else:
            count = int(rng.integers(1, group.size + 1))
            keep = rng.choice(group.size, size=count, replace=False)
        group.keep(keep)


def tiny_resnet(renorm=False, seed=2):
    """A masked CIFAR ResNet of two stages of one block on 8x8 inputs, random params and masks.

    It keeps every code path of the deeper ResNets (a stem, an identity block on the stem's
    stream, a stride-2 projection block opening a new stream, the head: four segments) at a
    fraction of their trace and XLA compile time; a third stage would repeat the second's code
    (and cost a quarter more to trace and compile).
    """
    net = small_net("ResNet-20", blocks=[1, 1], input_size=8)
    randomise(net)
    random_masks(net, seed=seed)
    net.options.set(renorm=renorm)
    return net


def train_steps(net_fn, steps=2, batch=8, replicas=1, accum=1, xla=False, seed=1):
    """Trains a net through `op_utils.trainer.Trainer` (SGD with momentum) on fixed random data.

    Args:
        net_fn: builds the net; called inside the strategy's scope.
        steps, batch: optimizer steps of `batch` examples each.
        replicas, accum, xla: the engine's modes.
        seed: of the data.

    Returns:
        `(net, trainer, the losses of the steps, params before training, params after)`.
    """
    strategy = make_strategy(num_replicas=replicas)
    with strategy.scope():
        net = net_fn()
    before = net.get_params()
    trainer = Trainer(strategy, Classify(net), SGD(0.05, momentum=0.9, weight_decay=1e-4), global_batch_size=batch,
                      accum=accum, xla=xla)
    x = input_for(net, batch=batch * steps, seed=seed)
    y = np.arange(batch * steps) % net.groups["logits"].size
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    losses = [float(trainer.train_step(b)["loss"]) for b in strategy.experimental_distribute_dataset(ds)]
    return net, trainer, losses, before, net.get_params()


def trainable_keys(net):
    """The param keys of the variables an optimizer updates."""
    return [key for key, var in net.param_vars().items() if var.trainable]


class TwoConvBN(Net):
    """conv - BN - ReLU - conv - BN - ReLU - mean - dense, with a gate site (`bn1:act`, `bn2:act`)
    after each BN like the registered nets: the smallest net with two prunable groups, for tests that
    trace it often or compute its statistics by hand (1x1 kernels)."""

    def __init__(self, arch="TwoConvBN", widths=None, masked=True, kernel=3, channels=(8, 6), input_size=8,
                 num_classes=4):
        config = dict(kernel=kernel, channels=list(channels), input_size=input_size, num_classes=num_classes)
        super().__init__(arch, config, widths, masked)
        hw = (input_size, input_size)
        image, a, b = self.group("input", 3, prunable=False), self.group("a", channels[0]), self.group("b", channels[1])
        self.conv1 = self.conv("conv1", image, a, kernel, hw)
        self.bn1 = self.bn("bn1", a, hw)
        self.conv2 = self.conv("conv2", a, b, kernel, hw)
        self.bn2 = self.bn("bn2", b, hw)
        self.head = self.fc("fc", b, self.group("logits", num_classes, prunable=False))
        self._check_widths_used()

    def forward(self, x, training, tap=None):
        x = self.site(tap, "bn1:act", tf.nn.relu(self.bn1(self.conv1(x), training)), self.bn1.group)
        x = self.site(tap, "bn2:act", tf.nn.relu(self.bn2(self.conv2(x), training)), self.bn2.group)
        return self.head(tf.reduce_mean(x, [1, 2]))
