"""Exact two-segment (broken power-law) fits of log(loss) against log(params), with uncertainty.

Model, in natural logs u = ln(params), v = ln(loss), breakpoint c = ln(breakpoint):
    v = intercept + slope_before * u                                   for u <= c
    v = intercept + slope_before * c + jump + slope_after * (u - c)    for u >  c
with jump = 0 for the continuous fit (the seed's default).

Why the fit is exact: for a breakpoint c between neighbouring sorted points x_k <= c <= x_{k+1} the
left/right split is fixed. The discontinuous fit is then two independent line fits (SSE4, constant
in c). The continuous fit is the same four-parameter fit under one linear constraint (the lines
meet at c), so by the constrained least-squares identity
    SSE(c) = SSE4 + d(c)^2 / q(c),  d(c) = dalpha + dbeta * c  (gap between the two lines at c),
    q(c) = [1 c] (V_left + V_right) [1 c]^T   (V = unscaled covariance of each line fit),
a ratio of a squared linear and a quadratic polynomial. Its derivative vanishes only where d = 0
or at one root of a linear equation (the c^2 terms cancel), so each interval has at most four
candidates (two ends, two roots). Every interval is enumerated with prefix sums, vectorised over
intervals and over a batch of weight or response vectors (bootstrap resamples, simulated nulls).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from engine.validation import check_bytes, check_float, check_int

MIN_POINTS = 4
MAX_POINTS = 1_000_000


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


# ---------------------------------------------------------------- validation


def validate_xy(x: object, y: object, x_name: str = "params", y_name: str = "losses",
                rows: list[str] | None = None, min_points: int = MIN_POINTS,
                distinct: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Check two equal-length positive finite 1-D arrays (x distinct unless told); return float64.

    `rows` labels each element in messages (e.g. CSV line numbers); default "row i" (0-based).
    """
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
    if n < min_points:
        raise ValueError(f"need at least {min_points} points, got {n}")
    if not distinct:
        return xa, ya
    order = np.argsort(xa, kind="stable")
    xs = xa[order]
    if xs[0] == xs[-1]:
        raise ValueError(f"{x_name} must not be all equal (every value is {xs[0]:g})")
    dup = np.flatnonzero(xs[1:] == xs[:-1])
    if dup.size:
        i, j = order[dup[0]], order[dup[0] + 1]
        raise ValueError(f"{x_name} has duplicate values: {label(i)} and {label(j)} are both "
                         f"{xs[dup[0]]:g}; filter the table or average repeated runs")
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


# ---------------------------------------------------------------- exact profile (batched)


@dataclass(frozen=True)
class _Profile:
    """Best breakpoint per batch row: c (centred log units), its SSE and the left-segment size."""

    c: np.ndarray  # (B,)
    sse: np.ndarray  # (B,)
    k: np.ndarray  # (B,) int, number of sorted points left of c


def _profile(u: np.ndarray, w: np.ndarray, v: np.ndarray, min_seg: int, continuous: bool) -> _Profile:
    """Exact least-squares breakpoint for each row of a batch.

    u: (n,) sorted, distinct. w: (B, n) weights >= 0. v: (B, n) or (n,) responses.
    Rows with too few positive-weight points for two segments get NaN.
    """
    w = np.atleast_2d(w)
    v = np.broadcast_to(v, w.shape)
    wu, wv = w * u, w * v
    # Prefix sums: index k-1 holds the sums over the first k points (the left segment).
    cs = [np.cumsum(a, axis=1) for a in (w, wu, wu * u, wv, wv * u, wv * v)]
    tot = [a[:, -1:] for a in cs]
    left = [a[:, :-1] for a in cs]  # intervals k = 1..n-1: [u[k-1], u[k]]
    right = [t - a for t, a in zip(tot, left)]
    cnt = np.cumsum(w > 0, axis=1)
    ok = (cnt[:, :-1] >= min_seg) & (cnt[:, -1:] - cnt[:, :-1] >= min_seg)

    with np.errstate(divide="ignore", invalid="ignore"):
        fits = []
        for s0, s1, s2, t0, t1, t2 in (left, right):
            sxx = s2 - s1 * s1 / s0
            sxy = t1 - s1 * t0 / s0
            syy = t2 - t0 * t0 / s0
            beta = sxy / sxx
            alpha = (t0 - beta * s1) / s0
            det = s0 * sxx  # = s0*s2 - s1^2
            fits.append((alpha, beta, np.maximum(syy - sxy * beta, 0.0), s0 / det, s1 / det, s2 / det))
        (al, bl, el, q2l, q1l, q0l), (ar, br, er, q2r, q1r, q0r) = fits
        sse4 = el + er
        if continuous:
            da, db = al - ar, bl - br
            q0, q1, q2 = q0l + q0r, -2.0 * (q1l + q1r), q2l + q2r
            lo, hi = u[:-1], u[1:]
            roots = (-da / db, (da * q1 - 2.0 * db * q0) / (db * q1 - 2.0 * q2 * da))
            cand = np.stack([np.broadcast_to(lo, sse4.shape), np.broadcast_to(hi, sse4.shape),
                             *[np.clip(np.where(np.isfinite(r), r, lo), lo, hi) for r in roots]])
            d = da + db * cand
            val = sse4 + d * d / (q0 + q1 * cand + q2 * cand * cand)
            j = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=0)
            sse = np.take_along_axis(val, j[None], 0)[0]
            c = np.take_along_axis(cand, j[None], 0)[0]
        else:
            sse = sse4
            c = np.broadcast_to(0.5 * (u[:-1] + u[1:]), sse4.shape)
    sse = np.where(ok & np.isfinite(sse), sse, np.inf)
    k = np.argmin(sse, axis=1)
    best = np.take_along_axis(sse, k[:, None], 1)[:, 0]
    cb = np.take_along_axis(np.asarray(c), k[:, None], 1)[:, 0]
    bad = ~np.isfinite(best)
    return _Profile(np.where(bad, np.nan, cb), np.where(bad, np.nan, best), k + 1)


def _coefficients(u: np.ndarray, w: np.ndarray, v: np.ndarray, c: np.ndarray,
                  continuous: bool) -> np.ndarray:
    """Weighted least-squares coefficients at fixed breakpoints c (B,): (B, 4) =
    intercept, slope_before, slope_after, jump (centred units). u (n,), w (B, n), v (B, n) or (n,)."""
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
    X = np.stack(cols, axis=2)  # (B, n, p)
    xtw = X * w[:, :, None]
    A = np.einsum("bnp,bnq->bpq", xtw, X)
    rhs = np.einsum("bnp,bn->bp", xtw, v)
    # pinv: a brute-force grid may put a breakpoint where one side has a single point.
    beta = (np.linalg.pinv(A) @ rhs[..., None])[..., 0]
    if continuous:
        b0, b1, b2 = beta.T
        return np.stack([b0, b1, b1 + b2, np.zeros_like(b0)], axis=1)
    al, bl, ar, br = beta.T
    return np.stack([al, bl, br, (ar + br * c) - (al + bl * c)], axis=1)


def _centred(params: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Sort by params; return order, centred ln(params), centred ln(loss) and both centres."""
    order = np.argsort(params, kind="stable")
    u, v = np.log(params[order]), np.log(losses[order])
    u0, v0 = float(u.mean()), float(v.mean())
    return order, u - u0, v - v0, u0, v0


def _check_settings(n: int, min_segment: int) -> int:
    m = check_int("min_segment", min_segment, 2, MAX_POINTS // 2)
    if n < 2 * m:
        raise ValueError(f"need at least 2 * min_segment = {2 * m} points for two segments, got {n}")
    return m


# ---------------------------------------------------------------- public API


def fit_breakpoint(params: object, losses: object, min_segment: int = 2, weights: object = None,
                   continuous: bool = True) -> BreakpointModel:
    """Global least-squares two-segment fit of ln(loss) on ln(params); breakpoint in params units.

    params, losses: (n,) positive, any order (sorted internally), distinct params. weights: (n,)
    non-negative weights on squared log residuals, or None.
    """
    x, y = validate_xy(params, losses)
    n = x.size
    m = _check_settings(n, min_segment)
    w = _check_weights(weights, n)
    order, u, v, u0, v0 = _centred(x, y)
    ws = w[order][None]
    if np.count_nonzero(ws) < 2 * m:
        raise ValueError(f"weights: need at least {2 * m} points with weight > 0")
    prof = _profile(u, ws, v, m, continuous)
    coef = _coefficients(u, ws, v, prof.c, continuous)[0]
    c = float(prof.c[0])
    return _model(coef, c, u, v, ws[0], u0, v0, continuous, m)


def _model(coef: np.ndarray, c: float, u: np.ndarray, v: np.ndarray, w: np.ndarray, u0: float,
           v0: float, continuous: bool, m: int) -> BreakpointModel:
    b0, s1, s2, jump = (float(t) for t in coef)
    pred = np.where(u <= c, b0 + s1 * u, b0 + s1 * c + jump + s2 * (u - c))
    res = v - pred
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
    coef = _coefficients(u, ws, v, c, continuous)
    cc = c[:, None]
    pred = np.where(u <= cc, coef[:, :1] + coef[:, 1:2] * u,
                    coef[:, :1] + coef[:, 1:2] * cc + coef[:, 3:] + coef[:, 2:3] * (u - cc))
    return np.sum(ws * (v - pred) ** 2, axis=1)


@dataclass(frozen=True)
class BootstrapResult:
    """Case-resampling bootstrap of a two-segment fit; intervals are percentile intervals."""

    level: float
    n_boot: int
    n_valid: int
    breakpoint_ci: tuple[float, float]  # params
    slope_before_ci: tuple[float, float]
    slope_after_ci: tuple[float, float]
    breakpoints: np.ndarray = field(repr=False)  # (n_valid,) params
    coefs: np.ndarray = field(repr=False)  # (n_valid, 4) centred coefficients
    centre: tuple[float, float] = (0.0, 0.0)  # (u0, v0) used by the coefficients
    sigma: float = 0.0  # residual std of ln(loss) of the full fit (for prediction bands)


def bootstrap(params: object, losses: object, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
              min_segment: int = 2, weights: object = None, continuous: bool = True) -> BootstrapResult:
    """Percentile bootstrap CIs for breakpoint (params) and slopes; resamples as multinomial counts.

    Resampling rows with replacement equals refitting with integer case weights, so all resamples
    are solved at once by the batched exact search (duplicates need no special handling).
    """
    x, y = validate_xy(params, losses)
    n = x.size
    m = _check_settings(n, min_segment)
    n_boot = check_int("n_boot", n_boot, 10, 100_000)
    level = check_float("level", level, 0.5, 0.999)
    w = _check_weights(weights, n)
    check_bytes("bootstrap", 8.0 * n_boot * n * 40)
    order, u, v, u0, v0 = _centred(x, y)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    W = counts * w[order]
    prof = _profile(u, W, v, m, continuous)
    good = np.isfinite(prof.c)
    if good.sum() < 10:
        raise ValueError("bootstrap: fewer than 10 resamples had enough distinct points; add data")
    coef = _coefficients(u, W[good], v, prof.c[good], continuous)
    cb = prof.c[good]
    a = (1 - level) / 2
    q = lambda z: tuple(float(t) for t in np.quantile(z, [a, 1 - a]))  # noqa: E731
    full = fit_breakpoint(x, y, m, w, continuous)
    dof = max(n - (4 if continuous else 5), 1)
    return BootstrapResult(
        level=level, n_boot=n_boot, n_valid=int(good.sum()),
        breakpoint_ci=tuple(float(np.exp(t + u0)) for t in q(cb)),  # type: ignore[arg-type]
        slope_before_ci=q(coef[:, 1]), slope_after_ci=q(coef[:, 2]),  # type: ignore[arg-type]
        breakpoints=np.exp(cb + u0), coefs=coef, centre=(u0, v0),
        sigma=float(np.sqrt(full.sse / np.sum(w) * n / dof)))


def prediction_band(boot: BootstrapResult, params: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap bands of the loss at `params` (G,): median, confidence band of the curve, and a
    prediction band that adds the fit's log-residual noise; each (G,), in loss units."""
    u0, v0 = boot.centre
    u = np.log(np.asarray(params, dtype=float))[None] - u0
    c = np.log(boot.breakpoints)[:, None] - u0
    b0, s1, s2, jump = (boot.coefs[:, i:i + 1] for i in range(4))
    curves = np.where(u <= c, b0 + s1 * u, b0 + s1 * c + jump + s2 * (u - c)) + v0  # (B, G)
    # One noise draw per resample, shared along the grid: the same marginal at every size, and a
    # smooth band rather than one jittered by independent draws per grid point.
    noisy = curves + np.random.default_rng(seed).normal(0.0, boot.sigma, (curves.shape[0], 1))
    a = (1 - boot.level) / 2
    qs = lambda z: np.exp(np.quantile(z, [a, 0.5, 1 - a], axis=0))  # noqa: E731
    lo, med, hi = qs(curves)
    plo, _, phi = qs(noisy)
    return {"median": med, "ci_low": lo, "ci_high": hi, "pi_low": plo, "pi_high": phi}


@dataclass(frozen=True)
class BreakTest:
    """Is there a break? Single power law (2 parameters) against the two-segment fit."""

    f_stat: float
    f_pvalue: float  # naive F(df1, n - p) p-value, treats the breakpoint as known
    supf_pvalue: float  # Monte Carlo p-value of sup-F under the null (accounts for the search); NaN if n_sim=0
    bic_single: float
    bic_broken: float
    n_sim: int

    @property
    def delta_bic(self) -> float:
        """BIC(broken) - BIC(single); negative favours a break."""
        return self.bic_broken - self.bic_single

    def supported(self, alpha: float = 0.05) -> bool:
        """True if sup-F rejects 'no break' at level `alpha` and BIC also prefers the break."""
        return self.supf_pvalue < alpha and self.delta_bic < 0


def _line_sse(u: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weighted SSE of a straight-line fit per batch row; w (B, n), v (B, n) or (n,)."""
    v = np.broadcast_to(v, w.shape)
    s0, s1, s2 = w.sum(1), (w * u).sum(1), (w * u * u).sum(1)
    t0, t1, t2 = (w * v).sum(1), (w * u * v).sum(1), (w * v * v).sum(1)
    sxx, sxy, syy = s2 - s1 * s1 / s0, t1 - s1 * t0 / s0, t2 - t0 * t0 / s0
    return np.maximum(syy - sxy * sxy / sxx, 0.0)


def _bic(sse: np.ndarray | float, n: int, p: int) -> np.ndarray | float:
    return n * np.log(np.maximum(sse, 1e-300) / n) + p * np.log(n)


def break_test(params: object, losses: object, n_sim: int = 999, seed: int = 0, min_segment: int = 2,
               weights: object = None, continuous: bool = True) -> BreakTest:
    """F-test, BIC and a sup-F Monte Carlo test (Davies-type) for a break in ln(loss) vs ln(params).

    The sup-F null distribution is simulated from Gaussian log-residuals around the single power
    law; F is invariant to the null line and the noise scale, so the p-value is exact up to
    Monte Carlo error for Gaussian errors. Parameter counts: single 2, continuous 4, jump 5.
    """
    x, y = validate_xy(params, losses)
    n = x.size
    m = _check_settings(n, min_segment)
    n_sim = check_int("n_sim", n_sim, 0, 100_000)
    w = _check_weights(weights, n)
    check_bytes("break_test", 8.0 * max(n_sim, 1) * n * 40)
    order, u, v, _, _ = _centred(x, y)
    ws = w[order]
    p2 = 4 if continuous else 5
    if n <= p2:
        raise ValueError(f"need more than {p2} points to test for a break, got {n}")

    def fstat(sse1: np.ndarray, sse2: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((sse1 - sse2) / (p2 - 2)) / (sse2 / (n - p2))

    sse1 = _line_sse(u, ws[None], v)
    sse2 = _profile(u, ws[None], v, m, continuous).sse
    f = float(fstat(sse1, sse2)[0])
    # NaN without simulations, or when F is 0/0 (both fits exact): fsim >= nan is never true.
    pv = float("nan")
    if n_sim and not np.isnan(f):
        # Null data: standard normal log-residuals scaled by 1/sqrt(w) (any line, any scale).
        wpos = np.where(ws > 0, ws, 1.0)
        noise = np.random.default_rng(seed).standard_normal((n_sim, n)) / np.sqrt(wpos)
        W = np.broadcast_to(ws, noise.shape)
        fsim = fstat(_line_sse(u, W, noise), _profile(u, W, noise, m, continuous).sse)
        pv = float((1 + np.sum(fsim >= f)) / (n_sim + 1))
    return BreakTest(f_stat=f, f_pvalue=float(stats.f.sf(f, p2 - 2, n - p2)), supf_pvalue=pv,
                     bic_single=float(_bic(sse1[0], n, 2)), bic_broken=float(_bic(sse2[0], n, p2)),
                     n_sim=n_sim)


def detection_rate(params: np.ndarray, true_losses: np.ndarray, noise: float, n_seeds: int = 200,
                   seed: int = 0, min_segment: int = 2) -> float:
    """Share of `n_seeds` noisy copies (ln-loss noise std `noise`) where BIC prefers the break."""
    x, y = validate_xy(params, true_losses)
    noise = check_float("noise", noise, 0.0, 5.0)
    n_seeds = check_int("n_seeds", n_seeds, 1, 10_000)
    m = _check_settings(x.size, min_segment)
    check_bytes("detection_rate", 8.0 * n_seeds * x.size * 40)
    order, u, v, _, _ = _centred(x, y)
    V = v + noise * np.random.default_rng(seed).standard_normal((n_seeds, x.size))
    W = np.ones_like(V)
    sse1 = _line_sse(u, W, V)
    sse2 = _profile(u, W, V, m, True).sse
    return float(np.mean(_bic(sse2, x.size, 4) < _bic(sse1, x.size, 2)))
