"""The transform harness: every registered transform kind, attached to a tiny net, must keep
masked == slimmed, survive save and reload, and never retrace when its settings change."""

import json

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.artifacts import load_net, save_net
from nets.compactor import Compactor
from nets.quantizers import ActivationQuantizer, NonUniformQuantizer, UniformQuantizer
from nets.sparsity import MagnitudeMask
from nets.transforms import _REGISTRY
from tests.support.nets import assert_close_to_scale, input_for, random_masks, randomise, small_net


def _compactor(net, rng):
    """A compactor on a residual stream: every BN writing into it applies it."""
    bns = [layer.key for layer in net.layers.values() if getattr(layer, "group", None) is net.groups["stage1"]
           and type(layer).__name__ == "BatchNorm"]
    compactor = net.attach(Compactor(net.groups["stage1"]), [f"{key}:out" for key in bns])
    size = compactor.group.size
    compactor.kernel.assign((np.eye(size) + 0.3 * rng.normal(size=(size, size)))[None, None].astype(np.float32))
    compactor.mask.assign((rng.random(size) > 0.3).astype(np.float32))
    return compactor


KERNEL = "BasicBlock1.0/conv1"  # a conv whose input and output groups are both prunable


def _on_kernel(make):
    def attach(net, rng):
        del rng
        return net.attach(make(), [f"{KERNEL}/kernel"])

    return attach


def _magnitude_mask(net, rng):
    mask = net.attach(MagnitudeMask(), [f"{KERNEL}/kernel"])
    mask.keep_largest(net.layers[KERNEL].kernel.numpy(), float(rng.uniform(0.3, 0.7)))
    return mask


def _activation_quantizer(net, rng):
    quantizer = net.attach(ActivationQuantizer(net.state, bits=3), ["BasicBlock1.0/bn1:act"])
    quantizer.high.assign(float(rng.uniform(1.0, 2.0)))
    quantizer.seen.assign(1.0)
    return quantizer


def _random(variable, rng, low=0.0, high=1.0):
    variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))


# Each registered transform kind: (net it is attached to, attach and randomise it, change its settings).
# ResNet-8 has one block per stage: an identity block, and projection blocks whose stream (stage1) two BNs
# write into, as in the deeper ResNets.
EXAMPLES = {
    "compactor": ("ResNet-8", _compactor,
                  lambda t, rng: t.kernel.assign(t.kernel + 0.1 * rng.normal(size=t.kernel.shape).astype(np.float32))),
    "magnitude_mask": ("ResNet-8", _magnitude_mask,
                       lambda t, rng: t.mask.assign((rng.random(t.mask.shape) > 0.5).astype(np.float32))),
    "uniform_quantizer": ("ResNet-8", _on_kernel(lambda: UniformQuantizer(3, "channel")),
                          lambda t, rng: None),
    "nonuniform_quantizer": ("ResNet-8", _on_kernel(lambda: NonUniformQuantizer(2, "channel")),
                             lambda t, rng: _random(t.centres, rng)),
    "activation_quantizer": ("ResNet-8", _activation_quantizer,
                             lambda t, rng: t.high.assign(float(rng.uniform(0.2, 2.0)))),
}
STATELESS = {"uniform_quantizer"}  # its settings are its config; its input (the kernel) changes instead


def test_every_registered_transform_kind_has_a_harness_example():
    assert set(EXAMPLES) == set(_REGISTRY), "add the new transform to EXAMPLES so the harness covers it"


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_masked_equals_slimmed_with_the_transform(kind):
    arch, attach, _ = EXAMPLES[kind]
    rng = np.random.default_rng(0)
    net = small_net(arch, masked=True, input_size=8)
    randomise(net)
    attach(net, rng)
    random_masks(net, seed=3)
    small = nets.slim(net)
    assert [t.kind for t, _ in small.attachments()] == [kind]
    x = input_for(net, batch=3)
    for training in (False, True):
        assert_close_to_scale(small(x, training=training), net(x, training=training),
                              err_msg=f"{kind} training={training}")


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_save_and_reload_rebuilds_the_transform_and_its_state(kind, tmp_path):
    arch, attach, _ = EXAMPLES[kind]
    net = small_net(arch, masked=False, input_size=8)
    randomise(net)
    attach(net, np.random.default_rng(1))
    path = tmp_path / "net.pkl"
    save_net(net, str(path))
    assert (tmp_path / "net.state.npz").exists() == (kind not in STATELESS)
    assert set(net.get_params()) == {f"{layer.key}/{n}:0" for layer in net.layers.values() for n in layer.named}
    loaded = load_net(arch, str(path), input_size=8)
    assert loaded.spec() == net.spec()
    for key, value in net.transform_state().items():
        np.testing.assert_array_equal(loaded.transform_state()[key], value, err_msg=key)
    x = input_for(net, batch=2)
    np.testing.assert_array_equal(loaded(x).numpy(), net(x).numpy())


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_changing_the_transform_settings_never_retraces(kind):
    arch, attach, change = EXAMPLES[kind]
    rng = np.random.default_rng(2)
    net = small_net(arch, masked=True, input_size=8)
    transform = attach(net, rng)
    traces = []

    @tf.function
    def forward(x):
        traces.append(1)
        return net(x, training=False)

    x = tf.constant(input_for(net))
    outputs = []
    for seed in range(3):
        change(transform, rng)
        if kind in STATELESS:
            kernel = net.layers[KERNEL].kernel
            kernel.assign(kernel + 0.3 * rng.normal(size=kernel.shape).astype(np.float32))
        random_masks(net, seed=seed)
        outputs.append(forward(x).numpy())
    assert len(traces) == 1
    assert not np.allclose(outputs[0], outputs[1])  # the settings did change the output


def test_a_target_that_names_nothing_is_refused():
    net = small_net("ResNet-8", masked=False, input_size=8)
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="no layer output, parameter or activation site .nope/kernel."):
        net.attach(Compactor(net.groups["stem"]), ["nope/kernel"])


def test_importing_nets_alone_registers_every_saved_transform_kind():
    # export.py and test.py load saved nets without importing the methods: the kinds a spec may
    # name must be registered by `import nets` itself (a fresh process, so nothing else imported them).
    import subprocess
    import sys

    code = "import nets, json; from nets.transforms import _REGISTRY; print(json.dumps(sorted(_REGISTRY)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == sorted(_REGISTRY)
