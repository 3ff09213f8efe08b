"""Channel selection by LASSO (He et al.) and ISTA (PocketFlow remastered), the penalty searches and the
refits of the kept weights (codebase/lasso.py), against closed forms, brute force and synthetic layers
whose relevant channels are known. The conv's own statistics are tested in test_channel_stats.py."""

import numpy as np
import pytest

from codebase.lasso import adam_normal, ista, lasso, normal_least_squares, select_by_ista, select_by_lasso, soft_threshold


def contributions(patches, kernel):
    """Z [c_in, N*c_out]: row i is channel i's contribution X_i W_i to the layer's output, flattened."""
    z = np.einsum("nhwi,hwio->ino", patches, kernel)
    return z.reshape(z.shape[0], -1)


def gram(Z, y):
    """The Gram form (G, b) = (Z Z^T / M, Z y / M) that channel_stats accumulates."""
    return Z @ Z.T / Z.shape[1], Z @ y / Z.shape[1]


def _synthetic(seed=0, n=150, c_in=12, c_out=5, true=(1, 4, 7, 10), noise=0.01):
    """A 3x3 layer whose output uses only the `true` input channels, plus small noise: (G, b)."""
    rng = np.random.default_rng(seed)
    patches, kernel = rng.normal(size=(n, 3, 3, c_in)), rng.normal(size=(3, 3, c_in, c_out))
    Z = contributions(patches, kernel)
    y = Z[list(true)].sum(axis=0) + noise * rng.normal(size=Z.shape[1])
    return gram(Z, y)


def _random_problem(seed=0, c_in=8, m=40):
    rng = np.random.default_rng(seed)
    return gram(rng.normal(size=(c_in, m)), rng.normal(size=m))


def test_soft_threshold():
    assert np.allclose(soft_threshold([-3.0, -0.5, 0.0, 0.2, 2.0], 1.0), [-2.0, 0.0, 0.0, 0.0, 1.0])


def test_lasso_and_ista_on_an_orthonormal_design_are_soft_thresholds():
    b = np.array([0.9, -0.3, 0.05, -1.2, 0.0])
    assert np.allclose(lasso(np.eye(5), b, 0.2), soft_threshold(b, 0.2), atol=1e-12)
    # ISTA divides G and b by ||I||_F = sqrt(5): its fixed point is the LASSO at gamma * sqrt(5).
    assert np.allclose(ista(np.eye(5), b, 0.1, lr=1.0, iters=200), soft_threshold(b, 0.1 * np.sqrt(5)), atol=1e-10)


@pytest.mark.parametrize("alpha", [0.05, 0.15])  # both channels kept; the second one dropped
def test_lasso_and_ista_match_brute_force_in_two_dimensions(alpha):
    G, b = np.array([[1.0, 0.6], [0.6, 0.5]]), np.array([0.7, 0.2])
    grid = np.linspace(-2.0, 2.0, 2001)
    u, v = np.meshgrid(grid, grid, indexing="ij")
    objective = 0.5 * (G[0, 0] * u * u + 2 * G[0, 1] * u * v + G[1, 1] * v * v) - b[0] * u - b[1] * v \
        + alpha * (np.abs(u) + np.abs(v))
    best = np.unravel_index(np.argmin(objective), objective.shape)
    beta = lasso(G, b, alpha)
    assert np.allclose(beta, [grid[best[0]], grid[best[1]]], atol=3e-3)
    assert np.allclose(ista(G, b, alpha / np.linalg.norm(G), lr=1.0, iters=3000), beta, atol=1e-8)


def test_lasso_warm_start_and_large_penalty():
    G, b = _random_problem()
    cold = lasso(G, b, 0.05)
    assert np.allclose(lasso(G, b, 0.05, beta0=np.ones(8)), cold, atol=1e-8)
    assert not lasso(G, b, np.abs(b).max() * 1.01).any()


@pytest.mark.parametrize("search", ["lasso", "ista"])
def test_selection_recovers_the_channels_the_output_depends_on(search):
    G, b = _synthetic()
    if search == "lasso":
        kept, beta, alpha = select_by_lasso(G, b, keep=4)
    else:
        # PocketFlow's defaults (lr 1e-2, 100 steps) stay near the random start; converged steps recover them.
        kept, beta, alpha = select_by_ista(G, b, keep=4, lr=1.0, iters=300)
    assert kept.tolist() == [1, 4, 7, 10]
    assert np.count_nonzero(beta) == 4 and alpha > 0


def test_penalty_searches_hit_every_count():
    G, b = _random_problem(seed=3)
    for keep in range(1, 9):
        kept, beta, alpha = select_by_lasso(G, b, keep)
        assert len(kept) == keep and np.count_nonzero(beta) == keep
        assert kept.tolist() == np.flatnonzero(beta).tolist() or keep == 8
        kept, beta, gamma = select_by_ista(G, b, keep)
        assert len(kept) == keep and np.count_nonzero(beta) == keep
        assert kept.tolist() == np.flatnonzero(beta).tolist() or keep == 8


def test_keep_all_returns_every_channel_without_solving():
    G, b = _random_problem()
    for select in (select_by_lasso, select_by_ista):
        kept, beta, penalty = select(G, b, 8)
        assert kept.tolist() == list(range(8)) and np.all(beta == 1) and penalty == 0


def test_a_count_the_path_skips_falls_back_to_the_largest_coefficients():
    # Channels 1 and 2 enter together: no alpha keeps exactly one; the tie goes to the lower index.
    G, b = np.eye(3), np.array([0.5, 1.0, 1.0])
    kept, beta, alpha = select_by_lasso(G, b, 1)
    assert kept.tolist() == [1] and np.count_nonzero(beta) == 2
    kept, beta, alpha = select_by_lasso(G, np.array([1.0, 1.0, 0.5]), 1, tolerance=1)
    assert kept.tolist() == [0]  # a count in [1, 2] is accepted; still exactly one index comes back


@pytest.mark.parametrize("keep", [0, 9, -1])
def test_bad_keep_raises_naming_the_value(keep):
    G, b = _random_problem()
    for select in (select_by_lasso, select_by_ista):
        with pytest.raises(ValueError, match=rf"got {keep}"):
            select(G, b, keep)


def _layer(seed=0, n=80, c_in=3, c_out=4):
    rng = np.random.default_rng(seed)
    patches, kernel = rng.normal(size=(n, 3, 3, c_in)), rng.normal(size=(3, 3, c_in, c_out))
    return patches, kernel


def _normal(patches, targets):
    x = patches.reshape(len(patches), -1)
    return x.T @ x, x.T @ targets


def test_least_squares_reproduces_the_unpruned_layer():
    patches, kernel = _layer()
    targets = np.einsum("nhwi,hwio->no", patches, kernel)
    fitted = normal_least_squares(*_normal(patches, targets)).reshape(kernel.shape)
    assert np.allclose(fitted, kernel, atol=1e-5)


def test_least_squares_reproduces_the_layer_without_a_channel_it_ignores():
    patches, kernel = _layer()
    kernel[:, :, 1] = 0.0
    targets = np.einsum("nhwi,hwio->no", patches, kernel)
    kept = patches[..., [0, 2]]
    fitted = normal_least_squares(*_normal(kept, targets)).reshape(3, 3, 2, 4)
    assert np.allclose(fitted, kernel[:, :, [0, 2]], atol=1e-5)
    assert np.allclose(np.einsum("nhwi,hwio->no", kept, fitted), targets, atol=1e-5)


def test_least_squares_survives_an_all_zero_input_channel():
    patches, kernel = _layer()
    patches[..., 1] = 0.0  # a channel pruned upstream: X^T X is singular without the ridge
    targets = np.einsum("nhwi,hwio->no", patches, kernel)
    fitted = normal_least_squares(*_normal(patches, targets)).reshape(kernel.shape)
    assert np.isfinite(fitted).all()
    assert np.allclose(np.einsum("nhwi,hwio->no", patches, fitted), targets, atol=1e-5)


def _error(patches, targets, kernel):
    return np.mean((np.einsum("nhwi,hwio->no", patches, kernel) - targets) ** 2)


def _adam(patches, targets, start, **kwargs):
    return adam_normal(*_normal(patches, targets), targets.size, start.reshape(-1, targets.shape[1]),
                       **kwargs).reshape(start.shape)


def test_adam_refit_decreases_the_error_from_a_perturbed_start():
    patches, kernel = _layer()
    rng = np.random.default_rng(1)
    targets = np.einsum("nhwi,hwio->no", patches, kernel) + 0.1 * rng.normal(size=(80, 4))
    start = kernel + 0.3 * rng.normal(size=kernel.shape)
    fitted = _adam(patches, targets, start, lr=1e-2, iters=50)
    assert _error(patches, targets, fitted) < 0.5 * _error(patches, targets, start)
    assert np.array_equal(fitted, _adam(patches, targets, start, lr=1e-2, iters=50))


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_adam_refit_approaches_the_closed_form(weight_decay):
    patches, kernel = _layer(c_in=2)
    rng = np.random.default_rng(2)
    targets = np.einsum("nhwi,hwio->no", patches, kernel) + 0.1 * rng.normal(size=(80, 4))
    x = patches.reshape(80, -1)
    # The minimiser of mean((XW - Y)^2) + weight_decay/2 ||W||^2 (mean over N * c_out elements).
    scale = 2.0 / targets.size
    best = np.linalg.solve(scale * x.T @ x + weight_decay * np.eye(18), scale * x.T @ targets).reshape(kernel.shape)
    fitted = _adam(patches, targets, np.zeros_like(kernel), lr=1e-2, iters=2000, weight_decay=weight_decay)
    assert np.abs(fitted - best).max() < 1e-4 * np.abs(best).max()
