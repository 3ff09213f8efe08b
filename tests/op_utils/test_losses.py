"""The shared losses against numpy: soft cross-entropy, EKG's KL_T and its teacher selection."""

import numpy as np

from op_utils.losses import kl_t, select_teachers, soft_cross_entropy


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(a, b, t):
    """EKG's KL_T(a || b): T (not T^2) times the KL divergence of the tempered softmaxes."""
    p, q = softmax(a / t), softmax(b / t)
    return t * (p * (np.log(p) - np.log(q))).sum(-1)


def test_soft_cross_entropy_by_hand():
    rng = np.random.default_rng(0)
    target, logits = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    for t in (1.0, 4.0):
        expected = -(softmax(target / t) * np.log(softmax(logits / t))).sum(-1)
        np.testing.assert_allclose(soft_cross_entropy(target, logits, t), expected, rtol=1e-5)


def test_kl_t_by_hand():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    for t in (1.0, 4.0):
        np.testing.assert_allclose(kl_t(a, b, t), kl(a, b, t), rtol=1e-5)
    np.testing.assert_allclose(kl_t(a, a, 4.0), np.zeros(3), atol=1e-6)


def test_select_teachers_by_hand():
    t = 4.0
    bank = np.array([[[2.0, 0.0, 1.5], [0.0, 1.0, 0.0], [-1.0, 0.0, -1.0]]], np.float32)  # [1, 3 classes, 3 teachers]
    bank = np.repeat(bank, 2, axis=0)
    student = np.array([[0.0, 0.0, 0.0], [0.5, 0.2, 0.1]], np.float32)
    top = bank[:, :, 0]
    # Distances to the top teacher are summed over the batch: one choice for the whole batch.
    d_student = kl(top, student, t).sum()
    d_teachers = [kl(top, bank[:, :, k], t).sum() for k in range(3)]
    chosen = [k for k in range(3) if d_teachers[k] < d_student]
    assert 0 < len(chosen) < 3
    np.testing.assert_allclose(select_teachers(bank, student, t), bank[:, :, chosen].mean(-1), rtol=1e-5)
    # A student as close as the top teacher itself: no teacher is closer, the target is the top one.
    np.testing.assert_allclose(select_teachers(bank, top, t), top, rtol=1e-6)
