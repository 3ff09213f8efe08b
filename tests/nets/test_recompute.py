"""Net.set_recompute: training with recomputed segments equals training without, in every engine mode."""

import contextlib

import numpy as np
import pytest

from nets.layers import ForwardState
from tests.support.nets import input_for, tiny_resnet, train_steps, trainable_keys


@pytest.fixture
def replays(monkeypatch):
    """The segments whose forward pass was run again for a gradient (counted when traced).

    `Net.__call__` enters its `ForwardState.replay()` exactly around `op_utils.recompute`'s second
    run of a segment, which is also where BatchNorm takes its no-update branch.
    """
    seen = []
    real = ForwardState.replay

    @contextlib.contextmanager
    def counting(self):
        with real(self):
            seen.append(1)
            yield

    monkeypatch.setattr(ForwardState, "replay", counting)
    return seen


def train(remat, replicas, accum, xla, steps=2):
    def build():
        net = tiny_resnet()
        net.set_recompute(remat)
        return net

    return train_steps(build, steps=steps, replicas=replicas, accum=accum, xla=xla)


@pytest.fixture(scope="module")
def plain():
    return {(replicas, accum): train(False, replicas, accum, xla=False) for replicas, accum in [(2, 2), (1, 1)]}


@pytest.mark.parametrize("replicas,accum,xla", [(2, 2, False), (1, 1, True)])
def test_recomputed_training_equals_plain_training(plain, replays, replicas, accum, xla):
    # The reference is always plain training without XLA: XLA on and off agree on their own
    # (test_xla.py), so one XLA compilation suffices here.
    _, _, want_losses, initial, want = plain[(replicas, accum)]
    net, trainer, losses, _, got = train(True, replicas, accum, xla)
    # Recomputation really ran: every segment replayed once per traced gradient (once per
    # replica), so a no-op `set_recompute` cannot pass by matching plain training.
    segments = len(net.segments())
    assert segments == 4 and len(replays) == segments * trainer.grad_trace_count > 0
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for key, value in want.items():
        # Moving statistics included: updated once per micro-batch, as without recomputation.
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    # ... and the comparison is not one of untrained nets: every trainable param moved.
    unmoved = [key for key in trainable_keys(net) if np.array_equal(got[key], initial[key])]
    assert not unmoved


def test_recompute_leaves_inference_and_taps_alone(replays):
    net = tiny_resnet()
    x = input_for(net, batch=2)
    want = net(x, training=False).numpy()
    net.set_recompute(True)
    np.testing.assert_array_equal(net(x, training=False).numpy(), want)
    seen = []
    net(x, training=True, tap=lambda site, h: seen.append(site.name) or h)
    assert "stem" in seen
    assert not replays  # no gradient, no second run
