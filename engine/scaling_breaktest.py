"""Is there a break? A single power law against the two-segment fit: F, BIC and a sup-F test.

The sup-F null distribution is simulated (Davies-type: it accounts for the searched breakpoint).
Its random draws come from the user's seed and the data (engine.scaling_breakpoint.data_rng), so
p-values of different tables do not share one Monte Carlo sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from engine.scaling_breakpoint import (_centred, _check_settings, _check_weights, _line_fit, _profile,
                                       data_rng, validate_xy)
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
    return (4 if continuous else 5) + 1


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
    p2 = 4 if continuous else 5
    if n < min_points_for_test(continuous):
        raise ValueError(f"need at least {min_points_for_test(continuous)} points to test for a break "
                         f"({p2} parameters and the noise), got {n}")

    def fstat(sse1: np.ndarray, sse2: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((sse1 - sse2) / (p2 - 2)) / (sse2 / (n - p2))

    sse1 = _line_fit(u, ws[None], v)[0].e
    sse2 = _profile(u, ws[None], v, m, continuous).sse
    f = float(fstat(sse1, sse2)[0])
    # NaN without simulations, or when F is 0/0 (both fits exact): fsim >= nan is never true.
    pv = float("nan")
    if n_sim and not np.isnan(f):
        # Null data: standard normal log-residuals scaled by 1/sqrt(w) (any line, any scale).
        wpos = np.where(ws > 0, ws, 1.0)
        noise = data_rng(x, y, seed).standard_normal((n_sim, n)) / np.sqrt(wpos)
        W = np.broadcast_to(ws, noise.shape)
        fsim = fstat(_line_fit(u, W, noise)[0].e, _profile(u, W, noise, m, continuous).sse)
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
    m = _check_settings(x, min_segment)
    check_bytes("detection_rate", 8.0 * n_seeds * x.size * 40)
    order, u, v, _, _ = _centred(x, y)
    V = v + noise * np.random.default_rng(seed).standard_normal((n_seeds, x.size))
    W = np.ones_like(V)
    sse1 = _line_fit(u, W, V)[0].e
    sse2 = _profile(u, W, V, m, True).sse
    return float(np.mean(_bic(sse2, x.size, 4) < _bic(sse1, x.size, 2)))
