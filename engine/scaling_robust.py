"""Huber option for heavy-tailed noise: the two-segment fit and the break test by iteratively
reweighted least squares (IRLS), each step the exact weighted global search of scaling_breakpoint.

Huber's loss on ln-loss residuals r with scale s (MAD): weight min(1, k s / |r|), k = 1.345 (95 %
efficiency under Gaussian noise). The breakpoint and weights are refitted together until the
weights settle; batched over rows, so simulated nulls are fitted the same way as the data.
The break test's null draws are the robust line fit's residuals, resampled: its level then follows
the noise's own tails instead of assuming Gaussian noise.
"""

from __future__ import annotations

import numpy as np

from engine.scaling_breakpoint import (BreakpointModel, _centred, _check_settings, _coefficients,
                                       _curve, _line_fit, _model, _profile, data_rng, validate_xy)
from engine.scaling_breaktest import BreakTest, _test
from engine.validation import check_bytes, check_int

HUBER_K = 1.345
_ITERS = 30


def _huber(r: np.ndarray) -> np.ndarray:
    """Huber weights per row of residuals r (B, n), scale = 1.4826 * median |r| of the row."""
    s = 1.4826 * np.median(np.abs(r), axis=1, keepdims=True)
    a = np.abs(r)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > HUBER_K * s, HUBER_K * s / a, 1.0)


def _irls(V: np.ndarray, residuals) -> np.ndarray:
    """Huber weights (B, n) at convergence; `residuals(W, rows)` fits rows `rows` with weights W
    (R, n) and returns their residuals. Only rows whose weights still move are refitted."""
    W = np.ones_like(V)
    rows = np.arange(V.shape[0])
    for _ in range(_ITERS):
        new = _huber(residuals(W[rows], rows))
        moved = np.abs(new - W[rows]).max(1) > 1e-4
        W[rows] = new
        rows = rows[moved]
        if not rows.size:
            break
    return W


def huber_line(u: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IRLS Huber line per row of V (B, n): final weights and residuals, both (B, n)."""
    W = _irls(V, lambda W, rows: _line_fit(u, W, V[rows])[1])
    return W, _line_fit(u, W, V)[1]


def huber_broken(u: np.ndarray, V: np.ndarray, m: int, continuous: bool) -> tuple[np.ndarray, np.ndarray]:
    """IRLS Huber two-segment fit per row of V (B, n): final weights (B, n) and breakpoints (B,)."""
    def residuals(W: np.ndarray, rows: np.ndarray) -> np.ndarray:
        c = _profile(u, W, V[rows], m, continuous).c
        r = np.zeros_like(W)  # rows without two segments keep their weights
        ok = np.isfinite(c)
        coef, _ = _coefficients(u, W[ok], V[rows][ok], c[ok], continuous)
        r[ok] = V[rows][ok] - _curve(coef, c[ok], u)
        return r

    W = _irls(V, residuals)
    return W, _profile(u, W, V, m, continuous).c


def fit_breakpoint_huber(params: object, losses: object, min_segment: int = 2,
                         continuous: bool = True) -> tuple[BreakpointModel, np.ndarray]:
    """Two-segment fit under Huber loss on ln(loss): the model (sse: Huber-weighted) and the final
    weights (n,) in the input's row order (1: a full least-squares point; < 1: down-weighted)."""
    x, y = validate_xy(params, losses)
    m = _check_settings(x, min_segment)
    order, u, v, u0, v0 = _centred(x, y)
    W, c = huber_broken(u, v[None], m, continuous)
    coef, _ = _coefficients(u, W, v, c, continuous)
    weights = np.empty_like(W[0])
    weights[order] = W[0]
    return _model(coef[0], float(c[0]), u, v, W[0], u0, v0, continuous, m), weights


def break_test_huber(params: object, losses: object, n_sim: int = 999, seed: int = 0,
                     min_segment: int = 2, continuous: bool = True) -> BreakTest:
    """The break test under Huber loss: F of the weighted fits (weights of the robust broken fit),
    sup-F null simulated from the robust line's residuals resampled, each draw refitted by IRLS."""
    x, y = validate_xy(params, losses)
    n = x.size
    m = _check_settings(x, min_segment)
    n_sim = check_int("n_sim", n_sim, 0, 100_000)
    check_bytes("break_test_huber", 8.0 * max(n_sim, 1) * n * 60)
    _, u, v, _, _ = _centred(x, y)

    def fits(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W, _ = huber_broken(u, V, m, continuous)
        return _line_fit(u, W, V)[0].e, _profile(u, W, V, m, continuous).sse

    def null() -> np.ndarray:
        _, r = huber_line(u, v[None])
        r = r[0] * np.sqrt(n / (n - 2))
        return data_rng(x, y, seed).choice(r - np.median(r), (n_sim, n))

    return _test(v, n_sim, continuous, fits, null)
