"""A masked net trains the same through `op_utils.trainer.Trainer` with XLA on and off."""

import numpy as np

from tests.support.nets import tiny_resnet, train_steps, trainable_keys


def test_xla_train_steps_of_a_masked_resnet_equal_the_plain_steps():
    # Random masks with the EKG renormalisation on put every mask op on the compiled path. A
    # MobileNetV2 (depthwise convs) would cover more, but compiling its gradient takes over a
    # minute here; the ResNet's takes seconds.
    def build():
        return tiny_resnet(renorm=True, seed=3)

    _, _, want_losses, initial, want = train_steps(build, xla=False)
    net, trainer, losses, _, got = train_steps(build, xla=True)
    assert trainer.xla and trainer.grad_trace_count == 1
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for key, value in want.items():
        # Moving statistics included.
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    unmoved = [key for key in trainable_keys(net) if np.array_equal(got[key], initial[key])]
    assert not unmoved
