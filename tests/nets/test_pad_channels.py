"""`nets.pad_channels`: widths rounded up to a multiple with inert channels, outputs unchanged."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from tests.support.nets import assert_close_to_scale, input_for, lean_net, random_masks, randomise, small_net


# In their lean configs (tests/support/nets.py): every code path of ResNet-50, VGG-16 and MobileNetV2.
@pytest.mark.parametrize("arch", ["ResNet-8", "ResNet-50", "MobileNetV2", "VGG-16", "LeNet-5", "MLP"])
def test_padded_net_computes_the_slimmed_outputs(arch):
    masked = lean_net(arch, masked=True)
    randomise(masked)
    random_masks(masked, seed=1)
    slimmed = nets.slim(masked)
    padded = nets.pad_channels(slimmed, 8)

    # The full widths: the masked net is built without a width spec (a mask never resizes a group).
    full = {k: g.size for k, g in masked.prunable_groups().items()}
    for key, width in padded.widths().items():
        assert width == min(-(-slimmed.widths()[key] // 8) * 8, full[key]), key
    assert padded.cost().ekg_flops >= slimmed.cost().ekg_flops
    x = tf.constant(input_for(masked, batch=3))
    # Batch statistics too: a new channel is 0 before and after its BN. Wider GEMMs sum in another
    # order, and batch statistics of 3 tiny maps amplify round-off, hence the looser tolerance there.
    for training, tolerance in ((False, 1e-5), (True, 1e-4)):
        assert_close_to_scale(padded(x, training=training).numpy(), slimmed(x, training=training).numpy(),
                              rtol=tolerance, floor=tolerance, err_msg=f"{arch} training={training}")


def test_padding_a_masked_net_slims_it_first_and_checks_its_arguments():
    net = small_net("ResNet-8", masked=True)
    randomise(net)
    random_masks(net, seed=2)
    x = tf.constant(input_for(net, batch=2))
    padded = nets.pad_channels(net, 4)
    assert all(w % 4 == 0 or w == net.groups[k].size for k, w in padded.widths().items())
    np.testing.assert_allclose(padded(x).numpy(), nets.slim(net)(x).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        nets.pad_channels(net, 0)
    plain = small_net("ResNet-8", masked=False)
    plain.add_compactors()
    with pytest.raises(ValueError, match="compactors"):
        nets.pad_channels(plain, 8)
