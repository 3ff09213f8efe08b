"""Small helpers shared by the nets tests."""

import numpy as np

import nets

# Test-sized configs: ImageNet nets at 64x64 keep the structure (every stride) but run fast.
SMALL = {
    "ResNet-18": dict(input_size=64, num_classes=7),
    "ResNet-34": dict(input_size=64, num_classes=7),
    "ResNet-50": dict(input_size=64, num_classes=7),
    "MobileNetV2-ImageNet": dict(input_size=64, num_classes=7),
}


def small_net(arch, **kwargs):
    return nets.build(arch, **{**SMALL.get(arch, {}), **kwargs})


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
    """Random masks on every prunable group; `single` keeps only one channel of that group."""
    rng = np.random.default_rng(seed)
    for key, group in net.prunable_groups().items():
        if key == single:
            keep = [int(rng.integers(group.size))]
        else:
            count = int(rng.integers(1, group.size + 1))
            keep = rng.choice(group.size, size=count, replace=False)
        group.keep(keep)
