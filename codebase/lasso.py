"""Channel selection by LASSO and the refit of the kept weights: the numerical core of channel pruning.

A conv layer with input X (c_in channels) and output Y (c_out channels), sampled at N spatial
positions, is the sum of its input channels' contributions: Y = sum_i X_i W_i, where X_i [N, k*k]
holds channel i's patch values and W_i [k*k, c_out] its kernel slice. With z_i = vec(X_i W_i) and
y = vec(Y) (length M = N*c_out, row-major over [N, c_out]), channel selection solves

    min_beta  1/(2M) ||y - sum_i beta_i z_i||^2 + alpha ||beta||_1

and keeps the channels with beta_i != 0. Expanding the square, only the Gram form matters:
G = Z Z^T / M and b = Z y / M, and the problem is min 1/2 beta^T G beta - b^T beta + alpha ||beta||_1
(c_in x c_in, whatever N). A channel group feeding several consumer layers stacks their problems
(rows concatenated, one beta), which sums their G and b.

* He et al. 2017, "Channel pruning for accelerating very deep neural networks" (PocketFlow's
  `channel` learner): `lasso` (coordinate descent on G) and `select_by_lasso` (the penalty search
  for a channel count), then `normal_least_squares` (the closed-form refit of the kept channels'
  weights to the targets).
* PocketFlow's "remastered" channel pruning: `ista` (a fixed number of soft-thresholded gradient
  steps on G / ||G||_F from a random start), `select_by_ista` (its penalty search) and `adam_normal`
  (the refit by Adam steps from the current kernel instead of the closed form).

G, b and the normal equations are accumulated from sampled feature maps by
`codebase.channel_stats` (never as sample matrices).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def soft_threshold(x, t):
    """The proximal map of t * ||.||_1: sign(x) * max(|x| - t, 0), elementwise."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def lasso(G, b, alpha: float, beta0=None, iters: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Solve min 1/2 beta^T G beta - b^T beta + alpha ||beta||_1 (G symmetric PSD) by coordinate descent.

    Sweeps run over an active set (the nonzero channels and those violating the optimality
    condition |b_j - (G beta)_j| <= alpha at zero) until no update moves a correlation
    (G_jj * |delta beta_j|) by more than `tol * max|b|`; then the condition is checked on every
    channel (vectorised) and any violator joins the set (`iters` sweeps at most). Each update is
    exact, so an inactive channel is exactly zero. Deterministic; channels with G_jj = 0 stay zero.
    """
    G, b = np.asarray(G, np.float64), np.asarray(b, np.float64)
    beta = np.zeros(len(b)) if beta0 is None else np.array(beta0, np.float64)
    diag = np.diag(G).copy()
    beta[diag <= 0] = 0.0
    bound = tol * max(float(np.abs(b).max(initial=0.0)), 1e-300)
    sweeps = 0
    while sweeps < iters:
        Gbeta = G @ beta  # recomputed at every check: no drift from the rank-one updates
        violators = (beta == 0) & (diag > 0) & (np.abs(b - Gbeta) > alpha)
        if not violators.any() and sweeps:
            break
        active = np.flatnonzero((beta != 0) | violators)
        change = np.inf
        while change > bound and sweeps < iters:
            change, sweeps = 0.0, sweeps + 1
            for j in active:
                old, d = beta[j], diag[j]
                rho = b[j] - Gbeta[j] + d * old
                new = (rho - alpha if rho > alpha else rho + alpha if rho < -alpha else 0.0) / d
                if new != old:
                    Gbeta += (new - old) * G[j]
                    beta[j] = new
                    change = max(change, abs(new - old) * d)
    return beta


def _top(beta: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` largest |beta|, ties to the lower index, sorted."""
    return np.sort(np.argsort(-np.abs(beta), kind="stable")[:keep])


def _check_keep(keep, n: int) -> None:
    if not (isinstance(keep, (int, np.integer)) and 1 <= keep <= n):
        raise ValueError(f"keep must be an integer in [1, {n}], got {keep!r}")


def _search(solve: Callable, keep: int, start: float, lower: Callable, done: Callable, slack: int):
    """Double the penalty from `start` until nnz <= keep, then bisect on [lower(below), hi] until
    the count is in [keep, keep + slack] or `done(lo, hi, steps)`; return (kept, beta, penalty)."""
    if start <= 0:
        raise ValueError(f"the starting penalty must be positive, got {start}")
    hit = lambda beta: keep <= np.count_nonzero(beta) <= keep + slack  # noqa: E731
    hi, below = start, None  # below: (penalty, beta) of the last solve with nnz > keep
    for _ in range(1100):  # doubling from 1e-300 passes 1e30
        beta = solve(hi, None if below is None else below[1])
        if hit(beta):
            return _top(beta, keep), beta, hi
        if np.count_nonzero(beta) < keep:
            break
        below, hi = (hi, beta), hi * 2
    lo, steps, hi_beta = lower(below), 0, beta
    while not done(lo, hi, steps):
        mid, steps = (lo + hi) / 2, steps + 1
        beta = solve(mid, beta if below is None else below[1])
        if hit(beta):
            return _top(beta, keep), beta, mid
        if np.count_nonzero(beta) > keep:
            lo, below = mid, (mid, beta)
        else:
            hi, hi_beta = mid, beta
    penalty, beta = below if below is not None else (hi, hi_beta)
    return _top(beta, keep), beta, penalty


def select_by_lasso(G, b, keep: int, alpha0: float = 1e-4,
                    tolerance: float = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """He et al.'s penalty search: the LASSO penalty that keeps `keep` channels.

    alpha starts at `alpha0` and doubles until nnz(beta) <= keep; it is then bisected between the
    last two alphas (0 and alpha0 if alpha0 already kept few enough) until the count is met, the
    interval is below 1e-6 of its upper end, or after 60 bisections. Solves are warm-started.

    Args:
        G, b: the Gram form (`gram`).
        keep: channels to keep, in [1, c_in]; keep == c_in returns every channel, beta all ones
            (the unpruned layer) and alpha 0, without solving.
        alpha0: the starting penalty (> 0).
        tolerance: a count in [keep, keep + slack] also ends the search (He et al.'s `rank_tol`):
            slack = tolerance if tolerance >= 1, else floor(tolerance * keep).

    Returns:
        (kept, beta, alpha): exactly `keep` sorted channel indices, the LASSO solution and its
        alpha. When the search ends with nnz(beta) != keep, beta is the solution at the largest
        alpha tried with more than `keep` nonzeros (if any) and `kept` its `keep` largest |beta|,
        ties broken by the lower index.

    Raises:
        ValueError: `keep` is not an integer in [1, c_in], or alpha0 <= 0.
    """
    G, b = np.asarray(G, np.float64), np.asarray(b, np.float64)
    n = len(b)
    _check_keep(keep, n)
    if keep == n:
        return np.arange(n), np.ones(n), 0.0
    slack = int(tolerance) if tolerance >= 1 else int(np.floor(tolerance * keep))
    return _search(lambda alpha, warm: lasso(G, b, alpha, beta0=warm), keep, alpha0,
                   lambda below: 0.0 if below is None else below[0],
                   lambda lo, hi, steps: steps >= 60 or hi - lo < 1e-6 * hi, slack)


def ista(G, b, gamma: float, lr: float = 1e-2, iters: int = 100, beta0=None,
         rng: np.random.Generator | None = None) -> np.ndarray:
    """PocketFlow remastered's ISTA: `iters` steps beta <- S_{gamma*lr}(beta - lr * (G beta - b)).

    G and b are first divided by ||G||_F (as PocketFlow does), so the fixed point is the LASSO
    solution at alpha = gamma * ||G||_F; with lr <= 1 the steps are stable (||G||_2 <= ||G||_F).
    PocketFlow's defaults (lr 1e-2, 100 steps) stop far from that fixed point: the result then
    depends on the start, beta0 (default U(0, 1) from `rng`, default `np.random.default_rng(0)`).
    """
    G, b = np.asarray(G, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(G) or 1.0
    G, b = G / scale, b / scale
    if beta0 is None:
        beta0 = (rng if rng is not None else np.random.default_rng(0)).uniform(0.0, 1.0, len(b))
    beta = np.array(beta0, np.float64)
    for _ in range(iters):
        beta = soft_threshold(beta - lr * (G @ beta - b), gamma * lr)
    return beta


def select_by_ista(G, b, keep: int, gamma0: float = 0.1, lr: float = 1e-2, iters: int = 100,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """PocketFlow remastered's penalty search: the ISTA penalty that keeps `keep` channels.

    gamma starts at `gamma0` and doubles until nnz(beta) <= keep; it is then bisected on [0, gamma]
    until nnz == keep or the interval is below 1e-8. Every solve starts from the same beta0, drawn
    once from `rng` (U(0, 1); default `np.random.default_rng(0)`), so the search is deterministic.
    keep == c_in returns every channel, beta all ones and gamma 0. `keep` out of [1, c_in] raises
    ValueError. Returns (kept, beta, gamma) as `select_by_lasso` does, with the same rule when the
    count is not met: the `keep` largest |beta| of the last solve with more nonzeros.
    """
    G, b = np.asarray(G, np.float64), np.asarray(b, np.float64)
    n = len(b)
    _check_keep(keep, n)
    if keep == n:
        return np.arange(n), np.ones(n), 0.0
    beta0 = (rng if rng is not None else np.random.default_rng(0)).uniform(0.0, 1.0, n)
    return _search(lambda gamma, warm: ista(G, b, gamma, lr, iters, beta0), keep, gamma0,
                   lambda below: 0.0, lambda lo, hi, steps: hi - lo < 1e-8, 0)


def normal_least_squares(xx, xy, ridge: float = 1e-10) -> np.ndarray:
    """He et al.'s refit of the kept weights to the targets, from the normal equations:
    W = (X^T X)^-1 X^T Y, with `xx` = X^T X and `xy` = X^T Y summed over the samples (X: the kept
    channels' patches, rows in (kh, kw, channel) order; float64). A ridge of `ridge` times the mean
    diagonal keeps an all-zero input channel, e.g. one pruned upstream, from making it singular."""
    xx, xy = np.asarray(xx, np.float64), np.asarray(xy, np.float64)
    damp = ridge * max(float(np.trace(xx)) / max(len(xx), 1), 1e-30)
    return np.linalg.solve(xx + damp * np.eye(len(xx)), xy)


def adam_normal(xx, xy, size: int, w0, lr: float = 1e-3, iters: int = 100, weight_decay: float = 0.0) -> np.ndarray:
    """PocketFlow remastered's refit: `iters` Adam steps (0.9, 0.999, eps 1e-8) from `w0` [d, c_out]
    on mean((X W - Y)^2) + weight_decay * 0.5 * ||W||^2, the mean over `size` = N * c_out elements,
    from the normal equations `xx`, `xy`. Returns float64 W; deterministic."""
    xx, xy, scale = np.asarray(xx, np.float64), np.asarray(xy, np.float64), 2.0 / size
    w = np.array(w0, np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, iters + 1):
        grad = scale * (xx @ w - xy) + weight_decay * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        w = w - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return w
