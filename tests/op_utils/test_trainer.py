"""The train step: accumulation, replicas and XLA give the same update; hooks and checks."""
import numpy as np
import pytest
import tensorflow as tf

from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.task import Classify
from op_utils.trainer import Trainer
from tests.support.toy import MLP, toy_data
from utils.errors import ConfigError

BATCH = 16
STEPS = 3


def run_mlp(replicas=1, accum=1, xla=False, steps=STEPS, lr=0.1, **task_kwargs):
    """Trains a fresh MLP for ``steps`` steps; returns (losses, weights, trainer)."""
    strategy = make_strategy(num_replicas=replicas)
    with strategy.scope():
        model = MLP()
    trainer = Trainer(strategy, Classify(model, **task_kwargs), SGD(lr, momentum=0.9, weight_decay=1e-3),
                      global_batch_size=BATCH, accum=accum, xla=xla)
    x, y = toy_data(BATCH * steps)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    losses = [float(trainer.train_step(b)["loss"])
              for b in strategy.experimental_distribute_dataset(ds)]
    return losses, [v.numpy() for v in model.trainable_variables], trainer


def assert_same_run(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def reference():
    """One replica, no accumulation, no XLA."""
    return run_mlp()


def test_first_loss_is_the_mean_cross_entropy_of_the_global_batch(reference):
    model = MLP()
    x, y = toy_data(BATCH * STEPS)
    logits = model(x[:BATCH]).numpy().astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert reference[0][0] == pytest.approx(-logp[np.arange(BATCH), y[:BATCH]].mean(), rel=1e-5)
    # The weights did move (the losses of two batches would differ without an update): every
    # variable changed, and the first batch's loss went down.
    initial = [v.numpy() for v in model.trainable_variables]
    assert all(not np.allclose(a, b) for a, b in zip(reference[1], initial, strict=True))
    for var, value in zip(model.trainable_variables, reference[1], strict=True):
        var.assign(value)
    logits = model(x[:BATCH]).numpy()
    after = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y[:BATCH], logits=logits).numpy().mean()
    assert after < reference[0][0] - 0.1


@pytest.mark.parametrize("xla", [False, True])
def test_accumulation_equals_one_step_on_the_whole_batch(xla, reference):
    whole = reference if not xla else run_mlp(xla=True)
    accumulated = run_mlp(accum=4, xla=xla)
    assert_same_run(accumulated, whole)
    assert accumulated[2].grad_trace_count == 1


def test_two_replicas_equal_one(reference):
    two = run_mlp(replicas=2)
    assert_same_run(two, reference)
    assert two[2].grad_trace_count == 2  # traced once per replica


def test_xla_with_replicas_and_accumulation_matches_and_never_retraces(reference):
    losses, weights, trainer = run_mlp(replicas=2, accum=2, xla=True)
    assert_same_run((losses, weights), reference)
    # Three steps: the per-replica gradient function was traced once per replica and
    # the outer step once.
    assert trainer.grad_trace_count == 2
    assert trainer._train_fn.experimental_get_tracing_count() == 1


def _normalise(grads, variables):
    del variables
    norm = tf.linalg.global_norm(grads)
    return [g / norm for g in grads]


def test_grad_transform_acts_on_the_summed_gradients(reference):
    # Dividing by the global norm is non-linear: applied per replica before the sum, two
    # replicas would differ from one.
    one = run_mlp(grad_transform=_normalise)
    two = run_mlp(replicas=2, grad_transform=_normalise)
    assert_same_run(two, one)
    # And it really changed the update (`reference` is the same run without the transform).
    assert not np.allclose(one[1][0], reference[1][0], rtol=1e-3)


def test_extras_are_reported_as_means():
    def loss_fn(model, batch, training):
        x, y = batch
        logits = model(x, training=training)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        return loss, logits, {"first_feature": x[:, 0], "three": tf.constant(3.0)}

    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
    trainer = Trainer(strategy, Classify(model, loss_fn), SGD(0.1), global_batch_size=BATCH, accum=2)
    x, y = toy_data(BATCH)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    out = trainer.train_step(next(iter(strategy.experimental_distribute_dataset(ds))))
    assert float(out["first_feature"]) == pytest.approx(x[:, 0].mean(), rel=1e-5)
    assert float(out["three"]) == pytest.approx(3.0)
    assert float(out["top1"]) in [k / BATCH for k in range(BATCH + 1)]
    assert trainer.metrics()["loss"] == pytest.approx(float(out["loss"]), rel=1e-6)
    assert int(trainer.global_step.numpy()) == 1
    trainer.reset_metrics()
    assert np.isnan(trainer.metrics()["loss"])


def test_running_metrics_average_over_steps(reference):
    trainer = reference[2]
    assert int(trainer.example_count.numpy()) == BATCH * STEPS
    assert trainer.metrics()["loss"] == pytest.approx(np.mean(reference[0]), rel=1e-6)


@pytest.mark.parametrize("batch, accum", [(10, 2), (15, 1), (8, 3)])
def test_batch_must_split_into_replicas_and_micro_batches(batch, accum):
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        model = MLP()
    with pytest.raises(ConfigError) as err:
        Trainer(strategy, Classify(model), SGD(0.1), global_batch_size=batch, accum=accum)
    message = str(err.value)
    assert f"batch size {batch}" in message and "2 replica" in message
    assert f"{accum} micro-batch" in message


def test_model_must_be_built_in_the_strategy_scope():
    strategy = make_strategy(num_replicas=2)
    with pytest.raises(ConfigError, match="strategy.scope"):
        Trainer(strategy, Classify(MLP()), SGD(0.1), global_batch_size=BATCH)
