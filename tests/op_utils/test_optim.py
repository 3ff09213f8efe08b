"""Optimizers against hand computations, eagerly and under a 2-replica strategy."""
import numpy as np
import pytest
import tensorflow as tf

from op_utils.optim import SGD, Adam
from op_utils.schedules import StepDecay
from op_utils.strategy import make_strategy
from utils.errors import ConfigError

# Two steps of Nesterov SGD on one weight, worked out by hand:
# lr=0.1, momentum=0.9, wd=0.01, w0=1, gradients 0.5 then -0.2.
#   g1 = 0.5 + 0.01*1 = 0.51;  v1 = -0.051;  w1 = 1 + 0.9*(-0.051) - 0.051 = 0.9031
#   g2 = -0.2 + 0.01*0.9031 = -0.190969;  v2 = 0.9*(-0.051) + 0.0190969 = -0.0268031
#   w2 = 0.9031 + 0.9*(-0.0268031) + 0.0190969 = 0.89807411
SGD_W = [0.9031, 0.89807411]
SGD_V = [-0.051, -0.0268031]


def test_sgd_nesterov_weight_decay_matches_hand_computation():
    w = tf.Variable([1.0])
    opt = SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt.build([w])
    for grad, want_w, want_v in zip([0.5, -0.2], SGD_W, SGD_V, strict=True):
        opt.apply([(tf.constant([grad]), w)])
        np.testing.assert_allclose(w.numpy(), [want_w], rtol=1e-6)
        np.testing.assert_allclose(opt.slots[0][0].numpy(), [want_v], rtol=1e-6)
    assert int(opt.iterations.numpy()) == 2


def test_sgd_plain_momentum_and_no_momentum():
    w = tf.Variable([1.0])
    heavy_ball = SGD(0.1, momentum=0.9, nesterov=False)
    heavy_ball.build([w])
    heavy_ball.apply([(tf.constant([0.5]), w)])
    heavy_ball.apply([(tf.constant([0.5]), w)])
    # v1 = -0.05, w1 = 0.95; v2 = -0.045 - 0.05 = -0.095, w2 = 0.855
    np.testing.assert_allclose(w.numpy(), [0.855], rtol=1e-6)
    u = tf.Variable([1.0])
    plain = SGD(0.1, momentum=0.0)
    plain.build([u])
    assert plain.slots == [[]]
    plain.apply([(tf.constant([0.5]), u)])
    np.testing.assert_allclose(u.numpy(), [0.95], rtol=1e-6)


def _adam_reference(w, grads, lr, b1, b2, eps, wd):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        out.append(w)
    return out


def test_adam_matches_hand_computation():
    w = tf.Variable([1.0, -2.0])
    opt = Adam(0.1, weight_decay=0.01)
    opt.build([w])
    grads = [np.array([0.5, 0.3]), np.array([-0.2, 0.1]), np.array([0.4, -0.6])]
    want = _adam_reference(np.array([1.0, -2.0]), grads, 0.1, 0.9, 0.999, 1e-7, 0.01)
    for g, expected in zip(grads, want, strict=True):
        opt.apply([(tf.constant(g, tf.float32), w)])
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)
    # Adam's first step moves each weight by about lr against its gradient's sign.
    assert want[0] == pytest.approx([0.9, -2.1], abs=1e-4)


def test_learning_rate_schedule_is_driven_by_the_update_count():
    w = tf.Variable([0.0])
    opt = SGD(StepDecay(1.0, 4, decay_points=(0.5,), decay_rate=0.5), momentum=0.0)
    opt.build([w])
    for _ in range(4):
        opt.apply([(tf.constant([1.0]), w)])
    np.testing.assert_allclose(w.numpy(), [-(1.0 + 1.0 + 0.5 + 0.5)], rtol=1e-6)


def test_update_under_two_replicas_matches_hand_computation_on_every_copy():
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        w = tf.Variable([1.0])
        opt = SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
        opt.build([w])

    @tf.function
    def step(grad):
        # Gradients handed to apply() are already summed over replicas.
        strategy.run(lambda: opt.apply([(tf.identity(grad), w)]))

    for grad, want_w in zip([0.5, -0.2], SGD_W, strict=True):
        step(tf.constant([grad]))
        for copy in w.values:
            np.testing.assert_allclose(copy.numpy(), [want_w], rtol=1e-6)
    assert [int(c.numpy()) for c in opt.iterations.values] == [2, 2]
    assert len(opt.slots[0][0].values) == 2


def test_checkpoint_holds_slots_and_step(tmp_path):
    w = tf.Variable([1.0])
    opt = SGD(0.1, weight_decay=0.01)
    opt.build([w])
    opt.apply([(tf.constant([0.5]), w)])
    path = tf.train.Checkpoint(w=w, opt=opt).save(str(tmp_path / "c"))
    w2 = tf.Variable([0.0])
    opt2 = SGD(0.1, weight_decay=0.01)
    opt2.build([w2])
    tf.train.Checkpoint(w=w2, opt=opt2).restore(path).assert_existing_objects_matched()
    assert opt2.slots[0][0].numpy() == pytest.approx(SGD_V[0])
    assert int(opt2.iterations.numpy()) == 1


@pytest.mark.parametrize("make", [
    lambda: SGD(0.0), lambda: SGD(-1.0), lambda: SGD(0.1, momentum=1.0),
    lambda: SGD(0.1, weight_decay=-1e-4), lambda: Adam(0.1, beta_1=1.0),
    lambda: Adam(0.1, epsilon=0.0), lambda: SGD("0.1"),
])
def test_bad_arguments(make):
    with pytest.raises(ConfigError):
        make()


def test_apply_requires_build_and_known_variables():
    w, other = tf.Variable([1.0]), tf.Variable([2.0])
    opt = SGD(0.1)
    with pytest.raises(ConfigError, match="built"):
        opt.apply([(tf.constant([1.0]), w)])
    opt.build([w])
    with pytest.raises(ConfigError, match="not given to build"):
        opt.apply([(tf.constant([1.0]), other)])
