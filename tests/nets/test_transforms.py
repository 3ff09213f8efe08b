"""The transform harness: every registered transform kind, attached to a tiny net, must keep
masked == slimmed, survive save and reload, and never retrace when its settings change."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.artifacts import load_net, save_net
from nets.compactor import Compactor
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


# Each registered transform kind: (net it is attached to, attach and randomise it, change its settings).
EXAMPLES = {
    "compactor": ("ResNet-20", _compactor,
                  lambda t, rng: t.kernel.assign(t.kernel + 0.1 * rng.normal(size=t.kernel.shape).astype(np.float32))),
}


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
    assert (tmp_path / "net.state.npz").exists()
    assert not any("compactor" in key for key in net.get_params())  # transform state is not in the EKG dict
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
        random_masks(net, seed=seed)
        outputs.append(forward(x).numpy())
    assert len(traces) == 1
    assert not np.allclose(outputs[0], outputs[1])  # the settings did change the output


def test_a_target_that_names_nothing_is_refused():
    net = small_net("ResNet-20", masked=False, input_size=8)
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="no layer output or parameter 'nope/kernel'"):
        net.attach(Compactor(net.groups["stem"]), ["nope/kernel"])
