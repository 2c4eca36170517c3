"""Is there a break? A single power law against the two-segment fit: F, BIC and a sup-F test.

The sup-F null distribution is simulated (Davies-type: it accounts for the searched breakpoint).
Its random draws come from the user's seed and the data (engine.scaling_breakpoint.data_rng), so
p-values of different tables do not share one Monte Carlo sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from engine.scaling_breakpoint import (_centred, _check_settings, _check_weights, _line_fit, _profile,
                                       data_rng, n_params, validate_xy)
from engine.validation import check_bytes, check_float, check_int


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


def _bic(sse: np.ndarray | float, n: int, p: int) -> np.ndarray | float:
    return n * np.log(np.maximum(sse, 1e-300) / n) + p * np.log(n)


def min_points_for_test(continuous: bool = True) -> int:
    """Rows the F statistic needs: the broken model's parameters plus one for the noise."""
    return n_params(continuous) + 1


def _f_stat(sse1: np.ndarray, sse2: np.ndarray, n: int, p: int) -> np.ndarray:
    """F of the single line (2 parameters, SSE sse1) against the broken fit (p, sse2), per row."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((sse1 - sse2) / (p - 2)) / (sse2 / (n - p))


def _test(v: np.ndarray, n_sim: int, continuous: bool,
          fits: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
          null: Callable[[], np.ndarray]) -> BreakTest:
    """The frame both break tests share: F, BIC and the sup-F p-value of centred ln(loss) v (n,).

    fits(V): the line's and the broken fit's SSE per row of responses V (B, n); null(): the
    (n_sim, n) simulated null responses, drawn only when the p-value is computed.
    """
    n, p = v.size, n_params(continuous)
    if n < min_points_for_test(continuous):
        raise ValueError(f"need at least {min_points_for_test(continuous)} points to test for a break "
                         f"({p} parameters and the noise), got {n}")
    sse1, sse2 = fits(v[None])
    f = float(_f_stat(sse1, sse2, n, p)[0])
    # NaN without simulations, or when F is 0/0 (both fits exact): fsim >= nan is never true.
    pv = float("nan")
    if n_sim and not np.isnan(f):
        fsim = _f_stat(*fits(null()), n, p)
        pv = float((1 + np.sum(fsim >= f)) / (n_sim + 1))
    return BreakTest(f_stat=f, f_pvalue=float(stats.f.sf(f, p - 2, n - p)), supf_pvalue=pv,
                     bic_single=float(_bic(sse1[0], n, 2)), bic_broken=float(_bic(sse2[0], n, p)),
                     n_sim=n_sim)


def break_test(params: object, losses: object, n_sim: int = 999, seed: int = 0, min_segment: int = 2,
               weights: object = None, continuous: bool = True) -> BreakTest:
    """F-test, BIC and a sup-F Monte Carlo test (Davies-type) for a break in ln(loss) vs ln(params).

    The sup-F null distribution is simulated from Gaussian log-residuals around the single power
    law; F is invariant to the null line and the noise scale, so the p-value is exact up to
    Monte Carlo error for Gaussian errors. Parameter counts: single 2, continuous 4, jump 5.
    """
    x, y = validate_xy(params, losses)
    n = x.size
    m = _check_settings(x, min_segment)
    n_sim = check_int("n_sim", n_sim, 0, 100_000)
    w = _check_weights(weights, n)
    check_bytes("break_test", 8.0 * max(n_sim, 1) * n * 40)
    order, u, v, _, _ = _centred(x, y)
    ws = w[order]

    def fits(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W = np.broadcast_to(ws, V.shape)
        return _line_fit(u, W, V)[0].e, _profile(u, W, V, m, continuous).sse

    def null() -> np.ndarray:
        # Standard normal log-residuals scaled by 1/sqrt(w) (any line, any scale).
        wpos = np.where(ws > 0, ws, 1.0)
        return data_rng(x, y, seed).standard_normal((n_sim, n)) / np.sqrt(wpos)

    return _test(v, n_sim, continuous, fits, null)


def detection_rate(params: np.ndarray, true_losses: np.ndarray, noise: float, n_seeds: int = 200,
                   seed: int = 0, min_segment: int = 2) -> float:
    """Share of `n_seeds` noisy copies (ln-loss noise std `noise`) where BIC prefers the break."""
    x, y = validate_xy(params, true_losses)
    noise = check_float("noise", noise, 0.0, 5.0)
    n_seeds = check_int("n_seeds", n_seeds, 1, 10_000)
    m = _check_settings(x, min_segment)
    check_bytes("detection_rate", 8.0 * n_seeds * x.size * 40)
    order, u, v, _, _ = _centred(x, y)
    V = v + noise * np.random.default_rng(seed).standard_normal((n_seeds, x.size))
    W = np.ones_like(V)
    sse1 = _line_fit(u, W, V)[0].e
    sse2 = _profile(u, W, V, m, True).sse
    return float(np.mean(_bic(sse2, x.size, n_params(True)) < _bic(sse1, x.size, 2)))
