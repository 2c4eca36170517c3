"""Exact two-segment (broken power-law) fits of log(loss) against log(params).

Model, in natural logs u = ln(params), v = ln(loss), breakpoint c = ln(breakpoint):
    v = intercept + slope_before * u                                   for u <= c
    v = intercept + slope_before * c + jump + slope_after * (u - c)    for u >  c
with jump = 0 for the continuous fit (the seed's default).

Why the fit is exact: for a breakpoint c between neighbouring distinct sizes g_j < c <= g_{j+1}
the left/right split is fixed (tied sizes stay on one side: a split through a tie is not a
breakpoint of the model). The discontinuous fit is then two independent line fits (SSE4,
constant in c). The continuous fit is the same four-parameter fit under one linear constraint
(the lines meet at c), so by the constrained least-squares identity
    SSE(c) = SSE4 + d(c)^2 / q(c),  d(c) = gap between the two lines at c,
    q(c) = sum over sides of 1/W + (c - mean u)^2 / Sxx   (unscaled variance of each line at c),
a ratio of a squared linear and a quadratic polynomial. Its derivative vanishes only where d = 0
or at one root of a linear equation (the c^2 terms cancel), so each interval has at most four
candidates (two ends, two roots). Every interval is enumerated with prefix sums over distinct
sizes, vectorised over intervals and over a batch of weight or response vectors (bootstrap
resamples, simulated nulls). Prefix sums cancel on nearly noise-free data (SSE ~ 1e-16 of the
sums), so the few best intervals of each row are recomputed two-pass, centred on each segment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from engine.validation import check_bytes, check_int

MIN_POINTS = 4  # distinct sizes: two segments of two
MAX_POINTS = 1_000_000
MAX_SEED = 2**31 - 1
_REFINE = 4  # intervals per row recomputed two-pass after the prefix-sum pass


@dataclass(frozen=True)
class BreakpointModel:
    """A fitted two-segment power law; slopes are d ln(loss) / d ln(params), breakpoint in params."""

    breakpoint: float
    slope_before: float
    slope_after: float
    intercept: float  # ln(loss) of the first segment extended to params = 1
    jump: float  # ln(loss) step at the breakpoint; 0 for a continuous fit
    sse: float  # weighted sum of squared residuals of ln(loss)
    r2: float  # weighted coefficient of determination of ln(loss)
    rmsle: float  # unweighted root mean squared error of ln(loss), in natural-log units
    n: int
    continuous: bool = True
    min_segment: int = 2

    def predict(self, params: np.ndarray | float) -> np.ndarray:
        """Predicted loss at `params` (any shape, > 0), also beyond the data."""
        u = np.log(np.asarray(params, dtype=float))
        c = np.log(self.breakpoint)
        left = self.intercept + self.slope_before * u
        right = self.intercept + self.slope_before * c + self.jump + self.slope_after * (u - c)
        return np.exp(np.where(u <= c, left, right))

    @property
    def summary(self) -> dict[str, float | int | bool]:
        """The fitted values as a flat dict, one table row."""
        return {"breakpoint": self.breakpoint, "slope_before": self.slope_before,
                "slope_after": self.slope_after, "intercept": self.intercept, "jump": self.jump,
                "sse": self.sse, "r2": self.r2, "rmsle": self.rmsle, "n": self.n,
                "continuous": self.continuous}


def n_params(continuous: bool) -> int:
    """Free parameters of the two-segment model: intercept, two slopes and the breakpoint, and
    the jump when it is not continuous."""
    return 4 if continuous else 5


# ---------------------------------------------------------------- validation


def validate_xy(x: object, y: object, x_name: str = "params", y_name: str = "losses",
                rows: list[str] | None = None, min_distinct: int = MIN_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Check two equal-length positive finite 1-D arrays with >= `min_distinct` distinct x (repeats
    allowed); return float64. `rows` labels elements in messages (e.g. CSV lines); default "row i"."""
    try:
        xa, ya = np.array(x, dtype=float), np.array(y, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{x_name} and {y_name} must be numeric arrays") from None
    if xa.ndim != 1 or ya.ndim != 1 or xa.shape != ya.shape:
        raise ValueError(f"{x_name} and {y_name} must be 1-D of equal length, got shapes "
                         f"{xa.shape} and {ya.shape}")
    n = xa.size
    if n > MAX_POINTS:
        raise ValueError(f"{x_name} must have at most {MAX_POINTS} points, got {n}")
    label = (lambda i: rows[i]) if rows is not None else (lambda i: f"row {i}")
    for name, a in ((x_name, xa), (y_name, ya)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{name} must be finite: {label(bad[0])} is {a[bad[0]]}")
        bad = np.flatnonzero(a <= 0)
        if bad.size:
            raise ValueError(f"{name} must be > 0 (log-log fit): {label(bad[0])} is {a[bad[0]]:g}")
    distinct = np.unique(xa)
    if distinct.size < min_distinct:
        shown = ", ".join(f"{t:g}" for t in distinct[:5])
        raise ValueError(f"need at least {min_distinct} distinct values of {x_name} for two segments, "
                         f"got {distinct.size} ({shown}) in {n} rows")
    return xa, ya


def _check_weights(weights: object, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"weights must be finite and >= 0: row {bad[0]} is {w[bad[0]]}")
    return w


def data_rng(x: np.ndarray, y: np.ndarray, seed: int) -> np.random.Generator:
    """A generator seeded by `seed` and the data (order-free): tables get their own random draws,
    the same table and seed always the same ones."""
    order = np.lexsort((y, x))
    digest = hashlib.blake2b(np.stack([x[order], y[order]]).tobytes(), digest_size=16).digest()
    return np.random.default_rng([check_int("seed", seed, 0, MAX_SEED),
                                  *np.frombuffer(digest, dtype=np.uint32).tolist()])


# ---------------------------------------------------------------- exact profile (batched)


@dataclass(frozen=True)
class _Profile:
    """Best breakpoint per batch row: c (centred log units) and its SSE (NaN: too few sizes)."""

    c: np.ndarray  # (B,)
    sse: np.ndarray  # (B,)


@dataclass(frozen=True)
class _Side:
    """Weighted line fit of one segment: weight, means, Sxx, slope and residual SSE; any shape."""

    w: np.ndarray
    mu: np.ndarray
    mv: np.ndarray
    sxx: np.ndarray
    beta: np.ndarray
    e: np.ndarray


def _side_from_sums(s0, s1, s2, t0, t1, t2) -> _Side:
    """One-pass line fit from sums of w, wu, wu^2, wv, wuv, wv^2 (fast; cancels when SSE ~ 0)."""
    mu, mv = s1 / s0, t0 / s0
    sxx, sxy, syy = s2 - s1 * mu, t1 - s1 * mv, t2 - t0 * mv
    beta = sxy / sxx
    return _Side(s0, mu, mv, sxx, beta, np.maximum(syy - sxy * beta, 0.0))


def _line_fit(u: np.ndarray, w: np.ndarray, v: np.ndarray) -> tuple[_Side, np.ndarray]:
    """Weighted straight-line fit per row of w (B, n), v (B, n) or (n,): the fit and its residuals
    (B, n). Two-pass, centred on each row's own weighted means: exact lines give SSE 0, not 1e-17."""
    v = np.broadcast_to(v, w.shape)
    s0 = w.sum(1)
    mu, mv = (w * u).sum(1) / s0, (w * v).sum(1) / s0
    du, dv = u - mu[:, None], v - mv[:, None]
    sxx = (w * du * du).sum(1)
    beta = (w * du * dv).sum(1) / sxx
    r = dv - beta[:, None] * du
    return _Side(s0, mu, mv, sxx, beta, (w * r * r).sum(1)), r


def _gap(a: _Side, b: _Side, c: np.ndarray | float) -> np.ndarray:
    """Left line minus right line at c: d(c)."""
    return a.mv + a.beta * (c - a.mu) - b.mv - b.beta * (c - b.mu)


def _var(a: _Side, b: _Side, c: np.ndarray | float) -> np.ndarray:
    """q(c): the sum of both lines' unscaled variances at c."""
    return 1 / a.w + (c - a.mu) ** 2 / a.sxx + 1 / b.w + (c - b.mu) ** 2 / b.sxx


def _poly(a: _Side, b: _Side) -> tuple[np.ndarray, ...]:
    """d(c) = gm + db (c - m) and q(c) = q2 (c - m)^2 + k about the vertex m of q: (m, gm, db, q2, k).

    Centred at m, so nothing cancels when the lines nearly meet (nearly noise-free data)."""
    q2 = 1 / a.sxx + 1 / b.sxx
    m = (a.mu / a.sxx + b.mu / b.sxx) / q2
    return m, _gap(a, b, m), a.beta - b.beta, q2, _var(a, b, m)


def _join(a: _Side, b: _Side, lo: np.ndarray, hi: np.ndarray, continuous: bool) -> tuple[np.ndarray, np.ndarray]:
    """Least SSE and its breakpoint c in [lo, hi] for left fit `a` and right fit `b` (same shapes).

    With z = c - m, SSE = SSE4 + (gm + db z)^2 / (q2 z^2 + k) is stationary where the lines meet
    (z = -gm / db) and at z = k db / (q2 gm); the minimum is there or at an end of the gap."""
    sse4 = a.e + b.e
    if not continuous:
        return sse4, np.broadcast_to(0.5 * (lo + hi), sse4.shape)
    m, gm, db, q2, k = _poly(a, b)
    lo, hi = np.broadcast_to(lo, sse4.shape), np.broadcast_to(hi, sse4.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        roots = (m - gm / db, m + k * db / (q2 * gm))
        cand = np.stack([lo, hi, *[np.clip(np.where(np.isfinite(r), r, lo), lo, hi) for r in roots]])
        val = sse4 + _gap(a, b, cand) ** 2 / _var(a, b, cand)
    j = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=0)
    return np.take_along_axis(val, j[None], 0)[0], np.take_along_axis(cand, j[None], 0)[0]


def _sides(u: np.ndarray, w: np.ndarray, v: np.ndarray, min_seg: int
           ) -> tuple[_Side, _Side, np.ndarray, np.ndarray, np.ndarray]:
    """Line fits left and right of every gap between distinct sizes, from prefix sums.

    u: (n,) sorted, ties allowed. w: (B, n) weights >= 0. v: (B, n). Returns both sides (B, K),
    the distinct sizes g (K + 1,), the first point of each size (K + 1,) and a (B, K) mask: both
    segments hold `min_seg` distinct sizes of positive weight.
    """
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    g = u[starts]
    wv = w * v
    W, V1, V2 = w, wv, wv * v
    if starts.size < u.size:  # repeated sizes: one sum per size
        W, V1, V2 = (np.add.reduceat(a, starts, axis=1) for a in (W, V1, V2))
    # Prefix sums over distinct sizes: index j-1 holds the first j sizes (the left segment).
    cs = [np.cumsum(a, axis=1) for a in (W, W * g, W * g * g, V1, V1 * g, V2)]
    left = [a[:, :-1] for a in cs]
    right = [a[:, -1:] - b for a, b in zip(cs, left)]
    cnt = np.cumsum(W > 0, axis=1)
    ok = (cnt[:, :-1] >= min_seg) & (cnt[:, -1:] - cnt[:, :-1] >= min_seg)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _side_from_sums(*left), _side_from_sums(*right), g, starts, ok


def _sides_two_pass(u: np.ndarray, w: np.ndarray, v: np.ndarray, starts: np.ndarray, rows: np.ndarray,
                    j: np.ndarray) -> tuple[_Side, _Side]:
    """Two-pass line fits for pairs (row, gap j) (P,): left = sizes up to g[j], right = the rest."""
    wl = w[rows] * (np.arange(u.size) < starts[j + 1][:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        return _line_fit(u, wl, v[rows])[0], _line_fit(u, w[rows] - wl, v[rows])[0]


def _profile(u: np.ndarray, w: np.ndarray, v: np.ndarray, min_seg: int, continuous: bool) -> _Profile:
    """Exact least-squares breakpoint for each row of a batch.

    u: (n,) sorted, ties allowed. w: (B, n) weights >= 0. v: (B, n) or (n,) responses.
    A segment needs `min_seg` distinct sizes of positive weight; rows without two get NaN.
    """
    w = np.atleast_2d(w)
    v = np.broadcast_to(v, w.shape)
    a, b, g, starts, ok = _sides(u, w, v, min_seg)
    with np.errstate(divide="ignore", invalid="ignore"):
        val, c = _join(a, b, g[:-1], g[1:], continuous)
    val = np.where(ok & np.isfinite(val), val, np.inf)
    j = np.argmin(val, axis=1)
    s = val[np.arange(val.shape[0]), j]
    cb = c[np.arange(val.shape[0]), j]
    # Rows whose best SSE is within 1e-6 of the total sum of squares (nearly noise-free): prefix
    # sums lose the digits that rank the gaps, so their best few gaps are recomputed two-pass.
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (w * v).sum(1, keepdims=True) / w.sum(1, keepdims=True)
    rows = np.flatnonzero(np.isfinite(s) & (s <= 1e-6 * np.sum(w * (v - mean) ** 2, axis=1)))
    if rows.size:
        k = min(_REFINE, val.shape[1])
        j = np.argpartition(val[rows], k - 1, axis=1)[:, :k].ravel()
        r = np.repeat(rows, k)
        with np.errstate(divide="ignore", invalid="ignore"):
            sse, cr = _join(*_sides_two_pass(u, w, v, starts, r, j), g[j], g[j + 1], continuous)
        sse = np.where(np.isfinite(val[r, j]) & np.isfinite(sse), sse, np.inf).reshape(-1, k)
        best = np.argmin(sse, axis=1)
        s[rows] = np.take_along_axis(sse, best[:, None], 1)[:, 0]
        cb[rows] = np.take_along_axis(cr.reshape(-1, k), best[:, None], 1)[:, 0]
    bad = ~np.isfinite(s)
    return _Profile(np.where(bad, np.nan, cb), np.where(bad, np.nan, s))


def _coefficients(u: np.ndarray, w: np.ndarray, v: np.ndarray, c: np.ndarray,
                  continuous: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares coefficients at fixed breakpoints c (B,): (B, 4) = intercept,
    slope_before, slope_after, jump (centred units), and the (B, p, p) unscaled covariance of the
    design's own coefficients (p = 3 continuous: intercept, slope_before, slope change; else 4).
    u (n,), w (B, n), v (B, n) or (n,)."""
    w = np.atleast_2d(w)
    v = np.broadcast_to(v, w.shape)
    ones = np.ones_like(w)
    uu = np.broadcast_to(u, w.shape)
    right = (uu > c[:, None]).astype(float)
    hinge = np.maximum(uu - c[:, None], 0.0)
    if continuous:
        cols = [ones, uu, hinge]
    else:  # separate intercept and slope on the right of c
        cols = [ones - right, uu * (1 - right), right, uu * right]
    sw = np.sqrt(w)
    # SVD-based pseudo-inverse of the weighted design (B, p, n): stable on nearly noise-free data,
    # where normal equations lose half the digits, and defined where a brute-force grid puts a
    # breakpoint with a single point on one side.
    pinv = np.linalg.pinv(np.stack(cols, axis=2) * sw[:, :, None])
    beta = (pinv @ (sw * v)[..., None])[..., 0]
    cov = pinv @ np.swapaxes(pinv, 1, 2)
    if continuous:
        b0, b1, b2 = beta.T
        return np.stack([b0, b1, b1 + b2, np.zeros_like(b0)], axis=1), cov
    al, bl, ar, br = beta.T
    return np.stack([al, bl, br, (ar + br * c) - (al + bl * c)], axis=1), cov


def _centred(params: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Sort by params; return order, centred ln(params), centred ln(loss) and both centres."""
    order = np.argsort(params, kind="stable")
    u, v = np.log(params[order]), np.log(losses[order])
    u0, v0 = float(u.mean()), float(v.mean())
    return order, u - u0, v - v0, u0, v0


def _check_settings(x: np.ndarray, min_segment: int) -> int:
    m = check_int("min_segment", min_segment, 2, MAX_POINTS // 2)
    sizes = np.unique(x).size
    if sizes < 2 * m:
        raise ValueError(f"need at least 2 * min_segment = {2 * m} distinct sizes for two segments, "
                         f"got {sizes}")
    return m


def _prepare(params: object, losses: object, min_segment: int, weights: object
             ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Checked params, losses, min_segment and weights; the weights sorted by params (n,), centred
    ln(params) and ln(loss) and both centres (see _centred)."""
    x, y = validate_xy(params, losses)
    m = _check_settings(x, min_segment)
    w = _check_weights(weights, x.size)
    order, u, v, u0, v0 = _centred(x, y)
    return x, y, m, w[order], u, v, u0, v0


def _curve(coef: np.ndarray, c: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Fitted centred ln(loss) at u (G,) for coefficient rows (B, 4) and breakpoints c (B,): (B, G)."""
    cc = np.asarray(c)[:, None]
    b0, s1, s2, jump = (coef[:, i:i + 1] for i in range(4))
    return np.where(u <= cc, b0 + s1 * u, b0 + s1 * cc + jump + s2 * (u - cc))


# ---------------------------------------------------------------- public API


def fit_breakpoint(params: object, losses: object, min_segment: int = 2, weights: object = None,
                   continuous: bool = True) -> BreakpointModel:
    """Global least-squares two-segment fit of ln(loss) on ln(params); breakpoint in params units.

    params, losses: (n,) positive, any order (sorted internally), repeated params allowed (fitted
    on every row, as least squares does). weights: (n,) non-negative weights on squared log
    residuals, or None.
    """
    _, _, m, w, u, v, u0, v0 = _prepare(params, losses, min_segment, weights)
    ws = w[None]
    if np.unique(u[ws[0] > 0]).size < 2 * m:
        raise ValueError(f"weights: need at least {2 * m} distinct sizes with weight > 0")
    prof = _profile(u, ws, v, m, continuous)
    coef = _coefficients(u, ws, v, prof.c, continuous)[0][0]
    return _model(coef, float(prof.c[0]), u, v, ws[0], u0, v0, continuous, m)


def _model(coef: np.ndarray, c: float, u: np.ndarray, v: np.ndarray, w: np.ndarray, u0: float,
           v0: float, continuous: bool, m: int) -> BreakpointModel:
    b0, s1, s2, jump = (float(t) for t in coef)
    res = v - _curve(coef[None], np.array([c]), u)[0]
    sse = float(np.sum(w * res * res))
    vbar = np.sum(w * v) / np.sum(w)
    sst = float(np.sum(w * (v - vbar) ** 2))
    return BreakpointModel(
        breakpoint=float(np.exp(c + u0)), slope_before=s1, slope_after=s2,
        intercept=v0 + b0 - s1 * u0, jump=jump, sse=sse, r2=1.0 - sse / sst if sst > 0 else 1.0,
        rmsle=float(np.sqrt(np.mean(res * res))), n=int(u.size), continuous=continuous,
        min_segment=m)


def profile_sse(params: object, losses: object, breakpoints: np.ndarray, weights: object = None,
                continuous: bool = True) -> np.ndarray:
    """Weighted SSE of ln(loss) for the two-segment model at each fixed breakpoint (params units).

    The brute-force reference the exact search is checked against; breakpoints: (G,).
    """
    x, y = validate_xy(params, losses)
    w = _check_weights(weights, x.size)
    order, u, v, u0, _ = _centred(x, y)
    c = np.log(np.asarray(breakpoints, dtype=float)) - u0
    check_bytes("profile_sse", 8.0 * c.size * u.size * 6)
    ws = np.broadcast_to(w[order], (c.size, u.size))
    coef, _ = _coefficients(u, ws, v, c, continuous)
    return np.sum(ws * (v - _curve(coef, c, u)) ** 2, axis=1)
