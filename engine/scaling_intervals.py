"""Intervals for a two-segment fit: the inverted-F (profile) interval and two bootstraps.

profile   {c : SSE(c) <= T}, T = SSE_min (1 + F(level; 1, n - p) / (n - p)): the likelihood-ratio
          interval of Toms & Lesperance (2003, Ecology 84:2034) with the F bound for unknown noise.
          Within each gap between distinct sizes SSE(c) = SSE4 + d(c)^2 / q(c), so SSE(c) <= T is
          a quadratic inequality in c: the interval's ends are exact roots, not grid points. Any
          linear quantity g (a slope, ln loss at a size) gets the profile interval
          union over c of g(c) +- sqrt((T - SSE(c)) a' V(c) a), V the unscaled covariance at c.
bootstrap percentile interval of case resamples (rows drawn with replacement).
residual  percentile interval of residual resamples (fitted curve + resampled residuals).
The coverage benchmark (benchmarks/bench_breakpoint_ci.py) chose DEFAULT_METHOD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from engine.scaling_breakpoint import (_centred, _check_settings, _check_weights, _coefficients,
                                       _curve, _gap, _poly, _profile, _sides, _sides_two_pass, _var,
                                       data_rng, validate_xy)
from engine.validation import check_bytes, check_choice, check_float, check_int

METHODS = ("profile", "bootstrap", "residual")
METHOD_NAMES = {"profile": "inverted-F profile", "bootstrap": "case bootstrap (percentile)",
                "residual": "residual bootstrap (percentile)"}
DEFAULT_METHOD = "profile"
_TWO_PASS_CELLS = 4_000_000  # gaps x points up to which every gap is refitted two-pass
_GRID = 256  # breakpoints per profile interval of a slope or a prediction


@dataclass(frozen=True)
class Intervals:
    """Intervals of one method at one level: breakpoint in params, slopes in d ln L / d ln x."""

    method: str
    level: float
    breakpoint: tuple[float, float]
    slope_before: tuple[float, float]
    slope_after: tuple[float, float]
    note: str = ""  # e.g. the interval reaches the edge of the sizes a knee can sit between


def _n_params(continuous: bool) -> int:
    return 4 if continuous else 5


def _prepare(params: object, losses: object, min_segment: int, weights: object):
    x, y = validate_xy(params, losses)
    m = _check_settings(x, min_segment)
    w = _check_weights(weights, x.size)
    order, u, v, u0, v0 = _centred(x, y)
    return x, y, m, w[order], u, v, u0, v0


# ---------------------------------------------------------------- profile (inverted F)


@dataclass(frozen=True)
class ProfileInterval(Intervals):
    """The inverted-F interval with what the page draws: SSE bound and bands at `at` sizes."""

    threshold: float = 0.0  # SSE bound T
    bands: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # loss units, each (G,)


def profile_interval(params: object, losses: object, level: float = 0.95, min_segment: int = 2,
                     weights: object = None, continuous: bool = True,
                     at: object = None) -> ProfileInterval:
    """Inverted-F intervals of breakpoint and slopes; with `at` (G,) sizes, the fitted curve's
    confidence band and a prediction band for a new point there (dict of (G,) arrays, loss units)."""
    level = check_float("level", level, 0.5, 0.999)
    x, y, m, w, u, v, u0, v0 = _prepare(params, losses, min_segment, weights)
    n, p = x.size, _n_params(continuous)
    if n <= p:
        raise ValueError(f"need at least {p + 1} points for intervals ({p} parameters and the noise), got {n}")
    best = _profile(u, w[None], v, m, continuous)
    sse_min, c_hat = float(best.sse[0]), float(best.c[0])
    f1 = float(stats.f.ppf(level, 1, n - p))
    t = sse_min * (1 + f1 / (n - p))
    c_lo, c_hi, edge = _breakpoint_set(u, w, v, m, continuous, t)
    # Slopes and the curve: union over a grid of breakpoints across the set, its ends, the fit.
    c = np.unique(np.r_[np.linspace(c_lo, c_hi, _GRID), c_hat])
    check_bytes("profile_interval", 8.0 * c.size * u.size * 12)
    wb = np.broadcast_to(w, (c.size, u.size))
    coef, cov = _coefficients(u, wb, v, c, continuous)
    slack = np.maximum(t - np.sum(wb * (v - _curve(coef, c, u)) ** 2, axis=1), 0.0)
    keep = (slack > 0) | (c == c_hat)
    coef, cov, c, slack = coef[keep], cov[keep], c[keep], slack[keep]
    e = np.eye(cov.shape[1])
    a_before = e[1]
    a_after = e[1] + e[2] if continuous else e[3]

    def union(est: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ends of the union of est(c) +- sqrt(slack(c) a'V(c)a); est (C, G), a (C, G, p)."""
        half = np.sqrt(slack[:, None] * np.einsum("cgp,cpq,cgq->cg", a, cov, a))
        return (est - half).min(0), (est + half).max(0)

    sb = union(coef[:, 1:2], np.broadcast_to(a_before, (c.size, 1, e.shape[0])))
    sa = union(coef[:, 2:3], np.broadcast_to(a_after, (c.size, 1, e.shape[0])))
    bands: dict[str, np.ndarray] = {}
    if at is not None:
        ua = np.log(np.asarray(at, dtype=float)) - u0
        est = _curve(coef, c, ua)
        a = _value_vectors(ua, c, continuous)
        lo, hi = union(est, a)
        pi_lo, pi_hi = _with_noise(est, a, cov, slack, f1 * sse_min / (n - p))
        bands = {"median": np.exp(est[np.flatnonzero(c == c_hat)[0]] + v0), "ci_low": np.exp(lo + v0), "ci_high": np.exp(hi + v0),
                 "pi_low": np.exp(pi_lo + v0), "pi_high": np.exp(pi_hi + v0)}
    note = _edge_note(edge, m)
    return ProfileInterval("profile", level, (float(np.exp(c_lo + u0)), float(np.exp(c_hi + u0))),
                           (float(sb[0][0]), float(sb[1][0])), (float(sa[0][0]), float(sa[1][0])),
                           note, t, bands)


def _with_noise(est: np.ndarray, a: np.ndarray, cov: np.ndarray, slack: np.ndarray,
                noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Prediction band for a new point: the profile half-width with F(level; 1, n - p) sigma^2
    added in quadrature (at the fitted knee: the classic t sigma sqrt(1 + a'Va))."""
    half = np.sqrt(slack[:, None] * np.einsum("cgp,cpq,cgq->cg", a, cov, a) + noise)
    return (est - half).min(0), (est + half).max(0)


def _value_vectors(ua: np.ndarray, c: np.ndarray, continuous: bool) -> np.ndarray:
    """Design vectors (C, G, p) whose product with the coefficients is ln loss at ua (G,)."""
    cc = c[:, None]
    one = np.ones((c.size, ua.size))
    uu = np.broadcast_to(ua, one.shape)
    if continuous:
        return np.stack([one, uu, np.maximum(uu - cc, 0.0)], axis=2)
    right = (uu > cc).astype(float)
    return np.stack([1 - right, uu * (1 - right), right, uu * right], axis=2)


def _breakpoint_set(u: np.ndarray, w: np.ndarray, v: np.ndarray, m: int, continuous: bool,
                    t: float) -> tuple[float, float, tuple[bool, bool]]:
    """Smallest and largest c with SSE(c) <= t, exact per gap, and whether each end is the edge of
    the searchable range (min_segment distinct sizes a side)."""
    a, b, g, starts, ok = _sides(u, w[None], v[None], m)
    ok = ok[0]
    j = np.flatnonzero(ok)
    if j.size * u.size <= _TWO_PASS_CELLS:  # exact sums where affordable (nearly noise-free data)
        a, b = _sides_two_pass(u, w[None], v[None], starts, np.zeros(j.size, int), j)
    else:
        a, b = (type(s)(*(getattr(s, f)[0, j] for f in ("w", "mu", "mv", "sxx", "beta", "e")))
                for s in (a, b))
    lo, hi = g[j], g[j + 1]
    sse4 = a.e + b.e
    if continuous:
        # SSE(c) <= t  <=>  d^2 - (t - SSE4) q <= 0: with z = c - m a quadratic A z^2 + B z + C <= 0.
        m, gm, db, q2, k = _poly(a, b)
        r = t - sse4
        qa, qb, qc = db * db - r * q2, 2 * gm * db, gm * gm - r * k
        with np.errstate(divide="ignore", invalid="ignore"):
            disc = np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0.0))
            roots = [m + (-qb - disc) / (2 * qa), m + (-qb + disc) / (2 * qa), m - qc / qb]
            cand = np.stack([lo, hi, *[np.clip(np.where(np.isfinite(z), z, lo), lo, hi) for z in roots]])
            sse = sse4 + _gap(a, b, cand) ** 2 / _var(a, b, cand)
    else:
        cand, sse = np.stack([lo, hi]), np.stack([sse4, sse4])
    inside = sse <= t * (1 + 1e-9) + 1e-300
    c_lo, c_hi = float(cand[inside].min()), float(cand[inside].max())
    return c_lo, c_hi, (c_lo <= lo[0], c_hi >= hi[-1])


def _edge_note(edge: tuple[bool, bool], m: int) -> str:
    ends = [s for s, e in zip(("smallest", "largest"), edge) if e]
    if not ends:
        return ""
    return (f"reaches the {' and '.join(ends)} size a knee can have with {m} sizes a side: the data "
            "cannot rule out a knee further out")


# ---------------------------------------------------------------- bootstraps


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap of a two-segment fit; intervals are percentile intervals."""

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
    scheme: str = "cases"

    def intervals(self) -> Intervals:
        """The percentile intervals as an Intervals row."""
        return Intervals("bootstrap" if self.scheme == "cases" else "residual", self.level,
                         self.breakpoint_ci, self.slope_before_ci, self.slope_after_ci)


def bootstrap(params: object, losses: object, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
              min_segment: int = 2, weights: object = None, continuous: bool = True,
              scheme: str = "cases") -> BootstrapResult:
    """Percentile bootstrap CIs for breakpoint (params) and slopes, all resamples in one batch.

    cases: rows drawn with replacement, i.e. integer case weights (repeated sizes need no special
    handling). residuals: the fitted curve plus residuals drawn with replacement, inflated by
    sqrt(n / (n - p)). Draws come from `seed` and the data (data_rng).
    """
    check_choice("scheme", scheme, ("cases", "residuals"))
    x, y, m, w, u, v, u0, v0 = _prepare(params, losses, min_segment, weights)
    n = x.size
    n_boot = check_int("n_boot", n_boot, 10, 100_000)
    level = check_float("level", level, 0.5, 0.999)
    check_bytes("bootstrap", 8.0 * n_boot * n * 40)
    rng = data_rng(x, y, seed)
    full = _profile(u, w[None], v, m, continuous)
    dof = max(n - _n_params(continuous), 1)
    if scheme == "cases":
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float) * w
        V = np.broadcast_to(v, W.shape)
    else:
        c_hat = full.c
        coef, _ = _coefficients(u, w[None], v, c_hat, continuous)
        fitted = _curve(coef, c_hat, u)[0]
        r = (v - fitted) * np.sqrt(w) * np.sqrt(n / dof)
        r = r[w > 0] - np.average(r[w > 0])
        W = np.broadcast_to(w, (n_boot, n))
        V = fitted + rng.choice(r, (n_boot, n)) / np.sqrt(np.where(w > 0, w, 1.0))
    prof = _profile(u, W, V, m, continuous)
    good = np.isfinite(prof.c)
    if good.sum() < 10:
        raise ValueError("bootstrap: fewer than 10 resamples had enough distinct sizes; add data")
    coef, _ = _coefficients(u, W[good], V[good], prof.c[good], continuous)
    cb = prof.c[good]
    a = (1 - level) / 2
    q = lambda z: tuple(float(t) for t in np.quantile(z, [a, 1 - a]))  # noqa: E731
    return BootstrapResult(
        level=level, n_boot=n_boot, n_valid=int(good.sum()),
        breakpoint_ci=tuple(float(np.exp(t + u0)) for t in q(cb)),  # type: ignore[arg-type]
        slope_before_ci=q(coef[:, 1]), slope_after_ci=q(coef[:, 2]),  # type: ignore[arg-type]
        breakpoints=np.exp(cb + u0), coefs=coef, centre=(u0, v0),
        sigma=float(np.sqrt(full.sse[0] / np.sum(w) * n / dof)), scheme=scheme)


def prediction_band(boot: BootstrapResult, params: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap bands of the loss at `params` (G,): median, confidence band of the curve, and a
    prediction band that adds the fit's log-residual noise; each (G,), in loss units."""
    u0, v0 = boot.centre
    u = np.log(np.asarray(params, dtype=float)) - u0
    curves = _curve(boot.coefs, np.log(boot.breakpoints) - u0, u) + v0  # (B, G)
    # One noise draw per resample, shared along the grid: the same marginal at every size, and a
    # smooth band rather than one jittered by independent draws per grid point.
    noisy = curves + np.random.default_rng(seed).normal(0.0, boot.sigma, (curves.shape[0], 1))
    a = (1 - boot.level) / 2
    qs = lambda z: np.exp(np.quantile(z, [a, 0.5, 1 - a], axis=0))  # noqa: E731
    lo, med, hi = qs(curves)
    plo, _, phi = qs(noisy)
    return {"median": med, "ci_low": lo, "ci_high": hi, "pi_low": plo, "pi_high": phi}
