"""Stages shared by the methods: BatchNorm re-estimation after slimming."""

import numpy as np
import pytest
import tensorflow as tf

from codebase.stages import recalibrate_bn
from tests.support.nets import TwoConvBN, randomise


def two_bn():
    """1x1 conv - BN - ReLU - 1x1 conv - BN - ReLU - mean - dense: statistics computable by hand."""
    return TwoConvBN(masked=False, kernel=1, channels=(4, 5), input_size=4, num_classes=2)


def batch_statistics(params, x, eps=1e-5):
    """Per BN, the batch mean and biased variance of its input in a training-mode pass, by hand."""
    h1 = x @ params["conv1/kernel:0"][0, 0]
    m1, v1 = h1.mean((0, 1, 2)), h1.var((0, 1, 2))
    y1 = np.maximum(params["bn1/gamma:0"].ravel() * (h1 - m1) / np.sqrt(v1 + eps) + params["bn1/beta:0"].ravel(), 0)
    h2 = y1 @ params["conv2/kernel:0"][0, 0]
    return {"bn1": (m1, v1), "bn2": (h2.mean((0, 1, 2)), h2.var((0, 1, 2)))}


@pytest.mark.parametrize("max_batches, used", [(20, 4), (2, 2)])
def test_recalibrate_bn_sets_the_mean_of_the_batch_statistics_and_leaves_the_momentum(max_batches, used):
    net = two_bn()
    randomise(net)  # moving statistics far from the batch statistics
    params = net.get_params()
    rng = np.random.default_rng(1)
    # Batches of unequal size (a short last one): each counts once, whatever its size.
    batches = [(rng.normal(1.0, 2.0, size=(n, 4, 4, 3)).astype(np.float32), np.zeros(n, np.int32))
               for n in (6, 6, 6, 3)]
    assert recalibrate_bn(net, batches, max_batches=max_batches) == used
    stats = [batch_statistics(params, x) for x, _ in batches[:used]]
    for name in ("bn1", "bn2"):
        bn = net.layers[name]
        mean = np.mean([s[name][0] for s in stats], axis=0)
        var = np.mean([s[name][1] for s in stats], axis=0)
        np.testing.assert_allclose(bn.moving_mean.numpy().ravel(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy().ravel(), var, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.9 and bn.update_rate is None  # later training moves with the momentum again
    # Only the moving statistics change.
    assert all(np.array_equal(v, params[k]) for k, v in net.get_params().items() if "moving" not in k)


def test_recalibrate_bn_restores_the_update_rule_when_a_batch_fails():
    net = two_bn()
    net.bn2.momentum = 0.99

    def batches():
        yield np.ones((2, 4, 4, 3), np.float32), np.zeros(2, np.int32)
        raise OSError("unreadable shard")

    with pytest.raises(OSError, match="unreadable"):
        recalibrate_bn(net, batches())
    assert (net.bn1.momentum, net.bn2.momentum) == (0.9, 0.99)
    assert net.bn1.update_rate is None and net.bn2.update_rate is None


def test_recalibrate_bn_traces_once_for_every_batch_size_and_equals_the_eager_cumulative_mean():
    # One compiled function for every batch, the short last one included; the same values as the
    # eager version it replaced (momentum i / (i + 1) at batch i).
    net, eager = two_bn(), two_bn()
    randomise(net)
    eager.set_params(net.get_params())
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(n, 4, 4, 3)).astype(np.float32), np.zeros(n, np.int32)) for n in (5, 5, 2)]
    traces = []
    real = tf.function

    def counting(fn, **kwargs):
        def traced(x):
            traces.append(1)
            return fn(x)
        return real(traced, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf, "function", counting)
        recalibrate_bn(net, batches)
    assert len(traces) == 1
    for i, (x, _) in enumerate(batches):
        for bn in (eager.bn1, eager.bn2):
            bn.momentum = i / (i + 1)
        eager(x, training=True)
    for key, value in eager.get_params().items():
        np.testing.assert_allclose(net.get_params()[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_net_without_batchnorm_is_left_as_it_is():
    from codebase.stages import recalibrate_bn as recalibrate
    import nets

    lenet = nets.build("LeNet-5", masked=False)
    before = lenet.get_params()
    assert recalibrate(lenet, [(np.zeros((2, 28, 28, 1), np.float32), np.zeros(2))]) == 0
    assert all(np.array_equal(v, before[k]) for k, v in lenet.get_params().items())


def test_recalibrating_many_nets_in_one_process_never_warns_of_retracing(caplog):
    """A run re-estimates BN after every pruning, and a process runs many steps (a chain, a test
    session): each call's function is its own, so TensorFlow's "5 out of the last N calls ...
    triggered tf.function retracing" warning (which the run's log would hold) never fires."""
    batches = [(np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32),)]
    with caplog.at_level("WARNING", logger="tensorflow"):
        for seed in range(7):
            net = TwoConvBN()
            randomise(net, seed=seed)
            recalibrate_bn(net, batches)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
