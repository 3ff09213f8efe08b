"""Learning-rate schedules: values at known steps, in-graph use and argument checks."""
import math

import numpy as np
import pytest
import tensorflow as tf

from op_utils.schedules import Cosine, Plateau, Poly, StepDecay
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


def test_poly_decays_by_whole_epochs_to_the_last_epochs_rate():
    schedule = Poly(0.01, total_steps=40, steps_per_epoch=10, power=0.9)
    rates = [float(schedule(step)) for step in range(0, 45, 5)]
    expected = [0.01 * (1 - e / 4) ** 0.9 for e in (0, 0, 1, 1, 2, 2, 3, 3, 3)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_plateau_cuts_the_rate_after_patience_epochs_without_improvement_and_saves_its_state(tmp_path):
    schedule = Plateau(0.1, factor=0.1, patience=2, min_lr=2e-4)
    cuts = [schedule.update(loss) for loss in (1.0, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85, 0.9, 0.9, 0.9, 0.9)]
    assert cuts == [False, False, False, True, False, False, True, False, True, False, False]
    assert float(schedule(123)) == pytest.approx(2e-4)  # 0.1 -> 0.01 -> 0.001 -> the floor
    path = tf.train.Checkpoint(schedule=schedule).write(str(tmp_path / "ckpt"))
    again = Plateau(0.1, factor=0.1, patience=2, min_lr=2e-4)
    tf.train.Checkpoint(schedule=again).read(path).assert_consumed()
    assert float(again(0)) == pytest.approx(2e-4) and float(again.best.numpy()) == pytest.approx(0.8)
    assert not again.update(float("nan"))
