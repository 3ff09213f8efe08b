"""Learning-rate schedules: values at known steps, in-graph use and argument checks."""
import math

import numpy as np
import pytest
import tensorflow as tf

from op_utils.schedules import Cosine, StepDecay
from utils.errors import ConfigError


def test_step_decay_values_at_the_ekg_boundaries():
    schedule = StepDecay(1.0, 100)  # x0.2 at 30, 60, 80
    expected = {0: 1.0, 29: 1.0, 30: 0.2, 59: 0.2, 60: 0.04, 79: 0.04, 80: 0.008, 99: 0.008}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


def test_step_decay_with_warmup_ramps_linearly():
    schedule = StepDecay(0.5, 100, decay_points=(0.5,), decay_rate=0.1, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(0.05)
    assert float(schedule(4)) == pytest.approx(0.25)
    assert float(schedule(9)) == pytest.approx(0.5)
    assert float(schedule(49)) == pytest.approx(0.5)
    assert float(schedule(50)) == pytest.approx(0.05)


def test_cosine_values():
    schedule = Cosine(1.0, 100, final_lr=0.1)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(25)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert float(schedule(50)) == pytest.approx(0.55)
    assert float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(150)) == pytest.approx(0.1)  # stays at final_lr
    warm = Cosine(1.0, 100, warmup_steps=10)
    assert float(warm(0)) == pytest.approx(0.1)
    assert float(warm(10)) == pytest.approx(1.0)
    assert float(warm(55)) == pytest.approx(0.5)  # halfway through the 90 cosine steps


def test_schedules_work_in_graph_with_a_step_variable():
    step = tf.Variable(0, dtype=tf.int64)
    decay, cosine = StepDecay(1.0, 10, decay_points=(0.5,)), Cosine(2.0, 10)

    @tf.function
    def rates():
        return decay(step), cosine(step)

    seen = []
    for _ in range(10):
        seen.append([float(v) for v in rates()])
        step.assign_add(1)
    np.testing.assert_allclose([s[0] for s in seen], [1.0] * 5 + [0.2] * 5, rtol=1e-6)
    np.testing.assert_allclose(
        [s[1] for s in seen], [1.0 + math.cos(math.pi * k / 10) for k in range(10)], rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(decay_points=(0.6, 0.3)),
    dict(decay_points=(0.3, 0.3)),
    dict(decay_points=(0.0, 0.5)),
    dict(decay_points=(0.5, 1.0)),
    dict(decay_rate=0.0),
    dict(decay_rate=1.5),
    dict(warmup_steps=100),
    dict(warmup_steps=-1),
])
def test_step_decay_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        StepDecay(0.1, 100, **kwargs)


@pytest.mark.parametrize("args", [(0.0, 100), (0.1, 0), (0.1, 10.5), (-1.0, 10)])
def test_bad_base_rate_or_length(args):
    with pytest.raises(ConfigError):
        Cosine(*args)
    with pytest.raises(ConfigError):
        StepDecay(*args)


def test_cosine_final_rate_must_not_exceed_base():
    with pytest.raises(ConfigError):
        Cosine(0.1, 10, final_lr=0.2)
