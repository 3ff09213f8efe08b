"""Hinton KD: the loss against a hand computation, and the Distill task's frozen teacher."""

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.tasks import Distill, kd_loss
from op_utils.optim import SGD
from op_utils.strategy import make_strategy
from op_utils.trainer import Trainer
from tests.support.nets import TwoConvBN, input_for, randomise


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("convention", ["hinton", "pocketflow"])
def test_kd_loss_against_a_hand_computation(convention):
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(0, 3, (4, 10)), rng.normal(0, 3, (4, 10))
    labels = np.array([1, 0, 9, 3])
    weight, t = 0.7, 4.0
    ce = -np.log(_softmax(student))[np.arange(4), labels]
    p, q = _softmax(teacher / t), _softmax(student / t)
    if convention == "hinton":
        kd = t ** 2 * (p * (np.log(p) - np.log(q))).sum(-1)  # T^2 KL(p || q)
    else:
        kd = -(p * np.log(q)).sum(-1)  # PocketFlow: soft cross-entropy, no T^2
    total, got_ce, got_kd = kd_loss(tf.constant(teacher, tf.float32), tf.constant(student, tf.float32),
                                    tf.constant(labels), weight, t, convention)
    np.testing.assert_allclose(got_ce, ce, rtol=1e-5)
    np.testing.assert_allclose(got_kd, kd, rtol=1e-4)
    np.testing.assert_allclose(total, ce + weight * kd, rtol=1e-4)


def test_hinton_term_is_zero_when_the_student_matches_and_its_gradient_scales_with_t_squared():
    logits = tf.constant(np.random.default_rng(1).normal(0, 2, (3, 5)), tf.float32)
    _, _, kd = kd_loss(logits, logits, tf.constant([0, 1, 2]), 1.0, 3.0, "hinton")
    np.testing.assert_allclose(kd, 0.0, atol=1e-6)
    student = tf.Variable(tf.zeros([3, 5]))
    grads = {}
    for convention in ("hinton", "pocketflow"):
        with tf.GradientTape() as tape:
            _, _, kd = kd_loss(logits, student, tf.constant([0, 1, 2]), 1.0, 3.0, convention)
            total = tf.reduce_sum(kd)
        grads[convention] = tape.gradient(total, student).numpy()
    np.testing.assert_allclose(grads["hinton"], 9.0 * grads["pocketflow"], rtol=1e-4, atol=1e-7)


def test_distill_trains_the_student_and_leaves_the_teacher_bitwise_unchanged():
    # The teacher has BatchNorm (moving statistics that a training-mode call would update); the
    # smallest such net (two conv-BN layers) keeps the step cheap to trace.
    strategy = make_strategy(num_replicas=2)
    with strategy.scope():
        teacher = TwoConvBN(masked=False, input_size=16)
        student = nets.build("LeNet-5", input_size=16, num_classes=4, channels=3, masked=False)
    randomise(teacher, seed=1)
    before = teacher.get_params()
    task = Distill(student, teacher, weight=2.0, temperature=4.0)
    trainer = Trainer(strategy, task, SGD(0.05, momentum=0.9, weight_decay=0.01), global_batch_size=8, accum=2)
    x = input_for(teacher, batch=16)
    y = np.arange(16) % 4
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    student_before = student.get_params()
    logs = [trainer.train_step(b) for b in strategy.experimental_distribute_dataset(ds)]
    assert {"ce", "kd", "loss", "top1"} <= set(logs[0])
    assert float(logs[0]["loss"]) == pytest.approx(float(logs[0]["ce"]) + 2.0 * float(logs[0]["kd"]), rel=1e-5)
    for key, value in teacher.get_params().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)  # moving statistics too: inference mode
    assert any(not np.array_equal(v, student_before[k]) for k, v in student.get_params().items())
    assert [v.ref() for v in trainer.variables] == [v.ref() for v in student.trainable_variables]


def test_distillation_with_xla_equals_distillation_without():
    # XLA compiles the per-replica loss and gradient, the teacher's forward pass included. The student
    # has no max-pooling: once a pipeline run in this process has turned op determinism on, XLA
    # refuses max-pool gradients. Both are conv-BN-ReLU nets (student in training mode, teacher in
    # inference mode); two layers each, as compiling ResNet-8 pairs cost 2.5 times as much.
    def train(xla):
        strategy = make_strategy(num_replicas=1)
        with strategy.scope():
            teacher = TwoConvBN(masked=False)
            student = TwoConvBN(masked=False, channels=(6, 8))
        randomise(teacher, seed=1)
        randomise(student, seed=2)
        trainer = Trainer(strategy, Distill(student, teacher, weight=1.0, temperature=2.0),
                          SGD(0.05, momentum=0.9, weight_decay=1e-3), global_batch_size=8, xla=xla)
        x = input_for(teacher, batch=16)
        ds = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 4)).batch(8)
        logs = [trainer.train_step(b) for b in strategy.experimental_distribute_dataset(ds)]
        return [(float(log["ce"]), float(log["kd"])) for log in logs], student.get_params()

    want_terms, want = train(xla=False)
    got_terms, got = train(xla=True)
    np.testing.assert_allclose(got_terms, want_terms, rtol=1e-4)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert want_terms[0][1] > 0  # the teacher's term is there to compare
