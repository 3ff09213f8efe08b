"""Per-variable optimizer hyperparameters (`overrides`) against hand computations."""
import numpy as np
import pytest
import tensorflow as tf

from op_utils.optim import SGD, Adam
from op_utils.strategy import make_strategy
from utils.errors import ConfigError


def nesterov_steps(w, grads, lr, momentum, wd):
    """Nesterov SGD with L2 weight decay, as op_utils.optim.SGD documents it."""
    v = 0.0
    for g in grads:
        g = g + wd * w
        v = momentum * v - lr * g
        w = w + momentum * v - lr * g
    return w


@pytest.mark.parametrize("replicas", [1, 2])
def test_overridden_variable_gets_its_own_momentum_and_no_weight_decay(replicas):
    strategy = make_strategy(num_replicas=replicas)
    with strategy.scope():
        plain, special = tf.Variable([1.0]), tf.Variable([2.0])
        opt = SGD(0.1, momentum=0.9, weight_decay=0.01,
                  overrides=lambda v: {"momentum": 0.99, "weight_decay": 0.0} if v is special else None)
        opt.build([plain, special])
    grads = [0.5, -0.2, 0.3]

    @tf.function
    def step(g):
        strategy.run(lambda: opt.apply([(g, plain), (g, special)]))

    for g in grads:
        step(tf.constant([g]))
    np.testing.assert_allclose(plain.numpy(), [nesterov_steps(1.0, grads, 0.1, 0.9, 0.01)], rtol=1e-6)
    np.testing.assert_allclose(special.numpy(), [nesterov_steps(2.0, grads, 0.1, 0.99, 0.0)], rtol=1e-6)


def test_momentum_slot_only_where_a_variable_has_momentum():
    a, b = tf.Variable([1.0]), tf.Variable([1.0])
    opt = SGD(0.1, momentum=0.0, overrides=lambda v: {"momentum": 0.5} if v is b else {})
    opt.build([a, b])
    assert [len(s) for s in opt.slots] == [0, 1]
    opt.apply([(tf.constant([1.0]), a), (tf.constant([1.0]), b)])
    opt.apply([(tf.constant([1.0]), a), (tf.constant([1.0]), b)])
    np.testing.assert_allclose(a.numpy(), [0.8], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [nesterov_steps(1.0, [1.0, 1.0], 0.1, 0.5, 0.0)], rtol=1e-6)


def test_bad_overrides_are_config_errors():
    w = tf.Variable([1.0])
    with pytest.raises(ConfigError, match="cannot override 'momentum'"):
        Adam(0.1, overrides=lambda v: {"momentum": 0.9}).build([w])
    with pytest.raises(ConfigError, match="momentum"):
        SGD(0.1, overrides=lambda v: {"momentum": 1.5}).build([w])
    with pytest.raises(ConfigError, match="weight_decay"):
        SGD(0.1, overrides=lambda v: {"weight_decay": -1.0}).build([w])
