"""ResRep compactors on every registered net: identity start, names, and exact folding."""

import numpy as np
import pytest

import nets
from nets.compactor import fold
from tests.support.nets import (assert_close_to_scale, family_representatives, input_for, lean_net, randomise,
                                small_net)

# One net per family: the deeper variants repeat the same blocks (tests/support/nets.py); the
# folding test runs each in its lean config (same code paths).
FAMILIES = family_representatives()
# Groups that get a compactor: every prunable group written by conv + BN and not filtered by a
# depthwise conv (MobileNetV2's expanded groups and its stem are); none without BatchNorm.
EXPECTED = {"ResNet-8": 6, "ResNet-20": 12, "ResNet-56": 30, "ResNet-50": 37, "MobileNetV2": 8, "VGG-16": 13,
            "LeNet-5": 0, "MLP": 0}


def compactor_net(arch, seed=0):
    net = small_net(arch, masked=False)
    randomise(net, seed=seed)
    net.add_compactors()
    return net


def random_compactors(net, seed=0):
    rng = np.random.default_rng(seed)
    for c in net.compactors.values():
        n = c.group.size
        c.kernel.assign((np.eye(n) + rng.normal(0, 0.3 / np.sqrt(n), (n, n)))[None, None].astype(np.float32))


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_compactors_go_to_the_groups_written_by_conv_and_batchnorm(arch):
    added = small_net(arch, masked=False).add_compactors()
    assert len(added) == EXPECTED[arch]


@pytest.mark.parametrize("arch", FAMILIES)
def test_compactors_start_as_identity_and_fold_exactly(arch):
    net = lean_net(arch, masked=False)
    randomise(net)
    x = input_for(net)
    names = list(net.param_vars())
    before = net(x).numpy()
    added = net.add_compactors()
    assert list(net.compactors) == list(added)
    # Rounding only: without compactors inference BN is folded into the convs (`conv_bn`).
    assert_close_to_scale(net(x).numpy(), before, err_msg=arch)
    # The EKG params are untouched (a reference pickle still loads); each compactor's kernel and mask
    # are transform state, saved beside them, and the kernel is trained.
    assert list(net.param_vars()) == names
    assert sorted(net.transform_state()) == sorted(f"t{i}/{v}" for i in range(len(added)) for v in ("kernel", "mask"))
    assert all(c.kernel.trainable and not c.mask.trainable for c in added.values())
    assert {v.ref() for c in added.values() for v in (c.kernel,)} <= {v.ref() for v in net.trainable_variables}

    # Mixing compactors; half of them close half of their rows. The slimmed net equals the
    # trained net with the closed rows zeroed (the other compactors fold with every row open).
    random_compactors(net)
    rng = np.random.default_rng(2)
    for c in list(net.compactors.values())[::2]:
        mask = np.ones(c.group.size, np.float32)
        mask[rng.choice(c.group.size, c.group.size // 2, replace=False)] = 0.0
        c.mask.assign(mask)
    small = nets.slim(fold(net))
    assert not small.masked and not small.compactors
    assert small.widths() == {k: (int(net.compactors[k].mask.numpy().sum()) if k in net.compactors else w)
                              for k, w in net.widths().items()}
    for c in net.compactors.values():
        c.kernel.assign(c.kernel.numpy() * c.mask.numpy())
    assert_close_to_scale(small(x).numpy(), net(x).numpy(), err_msg=arch)


def test_fold_without_closed_rows_is_the_trained_net_in_both_modes():
    net = compactor_net("ResNet-8", seed=3)  # a compactor on each kind of block and stream
    x = input_for(net, batch=4)
    folded = fold(net)  # identity compactors: the folded BN statistics are exact
    assert folded.cost() == net.cost()  # compactors are folded away: no FLOPs of their own
    assert_close_to_scale(folded(x).numpy(), net(x).numpy(), err_msg="identity compactors")
    assert_close_to_scale(folded(x, training=True).numpy(), net(x, training=True).numpy(), rtol=1e-3, floor=1e-3,
                          err_msg="identity compactors, training=True")
    # Mixing compactors: the inference function stays exact (the training-mode statistics of the
    # folded BNs are then approximate: see nets/compactor.fold).
    random_compactors(net)
    assert_close_to_scale(fold(net)(x).numpy(), net(x).numpy(), err_msg="mixing compactors")


def test_one_compactor_serves_a_residual_stream():
    net = compactor_net("ResNet-20")
    stream = net.compactors["stage1"]
    users = [bn.key for conv, bn in net.compacted_pairs() if bn.compactor is stream]
    assert users == ["BasicBlock1.0/bn3", "BasicBlock1.0/bn2", "BasicBlock1.1/bn2", "BasicBlock1.2/bn2"]
    [entry] = [t for t in net.spec()["transforms"] if t["config"] == {"group": "stage1"}]
    assert entry["kind"] == "compactor" and entry["targets"] == [f"{key}:out" for key in users]
    assert [t["config"]["group"] for t in net.spec()["transforms"]] == list(net.compactors)
    assert "transforms" not in small_net("ResNet-20").spec()


def test_compactors_need_an_unmasked_net_and_are_added_once():
    with pytest.raises(ValueError, match="masked=False"):
        small_net("ResNet-20").add_compactors()
    net = compactor_net("ResNet-20")
    with pytest.raises(ValueError, match="already"):
        net.add_compactors()
