"""`StepContext.optim_for_steps`: a step count longer than an epoch runs over several epochs of data."""

import types

import pytest

from codebase.config import OptimConfig
from codebase.context import StepContext


def step_context(tmp_path, steps_per_epoch):
    optim = OptimConfig()
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(run=types.SimpleNamespace(train_path=str(tmp_path))),
                                steps_per_epoch=lambda cfg: cfg.steps_per_epoch or steps_per_epoch)
    step = types.SimpleNamespace(name="1-x", options=None, optim=optim)
    return StepContext(ctx, step, 1, None, None, False)


@pytest.mark.parametrize("steps, epoch, want", [(10000, 390, (26, 385)), (39, 40, (1, 39)), (80, 40, (2, 40)),
                                                (81, 40, (3, 27)), (1, 40, (1, 1))])
def test_steps_become_epochs_no_longer_than_the_data_s(tmp_path, steps, epoch, want):
    optim = step_context(tmp_path, epoch).optim_for_steps(steps, optimizer="adam", learning_rate=1e-3)
    assert (optim.train_epoch, optim.steps_per_epoch) == want
    assert steps <= optim.train_epoch * optim.steps_per_epoch < steps + optim.train_epoch
    assert optim.steps_per_epoch <= epoch and optim.optimizer == "adam" and optim.learning_rate == 1e-3
