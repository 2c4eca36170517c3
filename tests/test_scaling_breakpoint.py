"""engine.scaling_breakpoint: exactness against an independent brute force, known answers, tests."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from engine.scaling_breakpoint import _profile, fit_breakpoint, profile_sse
from engine.scaling_breaktest import break_test, detection_rate
from engine.scaling_intervals import bootstrap, prediction_band


def broken_line(u, c, a, s1, s2, jump=0.0):
    """Reference two-segment line in log space, written out independently of the engine."""
    return np.where(u <= c, a + s1 * u, a + s1 * c + jump + s2 * (u - c))


def brute_force_sse(u, v, w, grid, continuous=True):
    """Min over `grid` of the weighted least-squares SSE at a fixed breakpoint, via np.linalg.lstsq."""
    best = np.inf
    sw = np.sqrt(w)
    for c in grid:
        r = u > c
        if continuous:
            X = np.column_stack([np.ones_like(u), u, np.maximum(u - c, 0)])
        else:
            if r.sum() < 2 or (~r).sum() < 2:
                continue
            X = np.column_stack([~r, u * ~r, r, u * r]).astype(float)
        beta = np.linalg.lstsq(X * sw[:, None], v * sw, rcond=None)[0]
        best = min(best, float(np.sum(w * (v - X @ beta) ** 2)))
    return best


def test_exact_piecewise_data_recovers_the_breakpoint_to_1e9():
    x = np.geomspace(1e6, 1e11, 25)
    u = np.log(x)
    c = np.log(3.7e8)  # between two sample points
    y = np.exp(broken_line(u, c, 2.0, -0.07, -0.31))
    m = fit_breakpoint(x, y)
    assert m.breakpoint == pytest.approx(3.7e8, rel=1e-9)
    assert m.slope_before == pytest.approx(-0.07, abs=1e-9)
    assert m.slope_after == pytest.approx(-0.31, abs=1e-9)
    assert m.intercept == pytest.approx(2.0, abs=1e-9)
    assert m.sse < 1e-20 and m.r2 == pytest.approx(1.0)
    # predict() beyond the data follows the second segment
    assert m.predict(1e13) == pytest.approx(np.exp(broken_line(np.log(1e13), c, 2.0, -0.07, -0.31)),
                                            rel=1e-9)


def test_discontinuous_fit_recovers_a_jump():
    x = np.geomspace(10, 1e4, 20)
    u = np.log(x)
    c_true = 0.5 * (u[9] + u[10])
    y = np.exp(broken_line(u, c_true, 1.0, -0.1, -0.4, jump=-0.3))
    m = fit_breakpoint(x, y, continuous=False)
    assert m.sse < 1e-20
    assert (m.slope_before, m.slope_after) == pytest.approx((-0.1, -0.4), abs=1e-9)
    # any breakpoint in (x[9], x[10]) fits exactly; the jump is measured at the reported breakpoint
    assert x[9] < m.breakpoint < x[10]
    cb = np.log(m.breakpoint)
    assert m.jump == pytest.approx((-0.4 - -0.1) * (cb - c_true) - 0.3, abs=1e-9)


def test_unsorted_input_gives_the_same_fit_as_sorted():
    rng = np.random.default_rng(3)
    x = np.geomspace(1, 1e3, 30)
    y = np.exp(broken_line(np.log(x), 3.0, 0.5, -0.2, -0.6) + rng.normal(0, 0.02, 30))
    perm = rng.permutation(30)
    a, b = fit_breakpoint(x, y), fit_breakpoint(x[perm], y[perm])
    assert a.breakpoint == pytest.approx(b.breakpoint, rel=1e-12)
    assert a.sse == pytest.approx(b.sse, rel=1e-9)


def test_zero_weight_equals_dropping_the_point():
    rng = np.random.default_rng(4)
    x = np.geomspace(1, 1e3, 16)
    y = np.exp(broken_line(np.log(x), 2.5, 0.0, -0.1, -0.5) + rng.normal(0, 0.05, 16))
    y[5] *= 3.0  # an outlier that the weight removes
    w = np.ones(16)
    w[5] = 0.0
    a = fit_breakpoint(x, y, weights=w)
    b = fit_breakpoint(np.delete(x, 5), np.delete(y, 5))
    assert a.breakpoint == pytest.approx(b.breakpoint, rel=1e-9)
    assert a.sse == pytest.approx(b.sse, rel=1e-9, abs=1e-15)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 12), seed=st.integers(0, 2**31 - 1), continuous=st.booleans(),
       weighted=st.booleans())
def test_exact_search_is_no_worse_than_a_dense_brute_force(n, seed, continuous, weighted):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(1.0, 1e3, n))
    if np.any(np.diff(x) == 0):
        return
    y = np.exp(rng.normal(0, 1, n))
    w = rng.uniform(0.2, 3.0, n) if weighted else np.ones(n)
    m = fit_breakpoint(x, y, weights=w, continuous=continuous)
    u, v = np.log(x), np.log(y)
    grid = np.linspace(u[1], u[-2], 501)
    assert m.sse <= brute_force_sse(u, v, w, grid, continuous) + 1e-9
    # the reported SSE is the SSE of the reported model
    assert m.sse == pytest.approx(float(np.sum(w * (v - np.log(m.predict(x))) ** 2)), rel=1e-7, abs=1e-12)


def test_profile_sse_matches_lstsq_and_the_fit_is_its_minimum():
    rng = np.random.default_rng(9)
    x = np.geomspace(1, 1e4, 40)
    y = np.exp(broken_line(np.log(x), 4.0, 1.0, -0.05, -0.3) + rng.normal(0, 0.03, 40))
    grid = np.geomspace(x[1], x[-2], 301)
    prof = profile_sse(x, y, grid)
    ref = [brute_force_sse(np.log(x), np.log(y), np.ones(40), [np.log(g)]) for g in grid[::50]]
    assert prof[::50] == pytest.approx(ref, rel=1e-8)
    assert fit_breakpoint(x, y).sse <= prof.min() + 1e-12


def test_batched_profile_with_case_weights_is_exact_per_row():
    """Bootstrap resamples are integer case weights: each row must be the exact optimum."""
    rng = np.random.default_rng(5)
    n = 12
    u = np.sort(rng.uniform(0, 5, n))
    v = broken_line(u, 2.5, 0.0, -0.1, -0.8) + rng.normal(0, 0.1, n)
    W = rng.multinomial(n, np.full(n, 1 / n), size=12).astype(float)
    prof = _profile(u, W, v, 2, True)
    for b in range(W.shape[0]):
        if not np.isfinite(prof.sse[b]):
            assert np.count_nonzero(W[b]) < 4  # only resamples without two 2-point segments
            continue
        drawn = u[W[b] > 0]  # breakpoints leaving at least 2 distinct drawn points a side
        ref = brute_force_sse(u, v, W[b], np.linspace(drawn[1], drawn[-2], 1001))
        assert prof.sse[b] <= ref + 1e-9
        assert prof.sse[b] >= ref - 1e-3 * max(ref, 1e-12) - 1e-9  # grid is near the optimum


def test_bootstrap_is_seeded_and_covers_the_truth_on_low_noise_data():
    x = np.geomspace(1e6, 1e10, 40)
    rng = np.random.default_rng(0)
    y = np.exp(broken_line(np.log(x), np.log(1e8), 1.0, -0.05, -0.3) + rng.normal(0, 0.005, 40))
    a = bootstrap(x, y, n_boot=300, seed=1)
    b = bootstrap(x, y, n_boot=300, seed=1)
    assert a.breakpoint_ci == b.breakpoint_ci
    assert a.breakpoint_ci[0] < 1e8 < a.breakpoint_ci[1]
    assert a.slope_before_ci[0] < -0.05 < a.slope_before_ci[1]
    assert a.slope_after_ci[0] < -0.3 < a.slope_after_ci[1]
    band = prediction_band(a, np.array([1e11]))
    truth = np.exp(broken_line(np.log(1e11), np.log(1e8), 1.0, -0.05, -0.3))
    assert band["pi_low"][0] <= band["ci_low"][0] < truth < band["ci_high"][0] <= band["pi_high"][0]


def test_break_test_statistics_match_their_formulas():
    rng = np.random.default_rng(2)
    x = np.geomspace(1, 1e4, 30)
    u = np.log(x)
    y = np.exp(broken_line(u, 5.0, 0.0, -0.1, -0.2) + rng.normal(0, 0.02, 30))
    t = break_test(x, y, n_sim=99)
    slope, icpt = np.polyfit(u, np.log(y), 1)
    sse1 = float(np.sum((np.log(y) - icpt - slope * u) ** 2))
    sse2 = fit_breakpoint(x, y).sse
    f = ((sse1 - sse2) / 2) / (sse2 / 26)
    assert t.f_stat == pytest.approx(f, rel=1e-9)
    assert t.f_pvalue == pytest.approx(stats.f.sf(f, 2, 26), rel=1e-9)
    assert t.bic_single == pytest.approx(30 * np.log(sse1 / 30) + 2 * np.log(30), rel=1e-9)
    assert t.bic_broken == pytest.approx(30 * np.log(sse2 / 30) + 4 * np.log(30), rel=1e-9)
    assert 1 / 100 <= t.supf_pvalue <= 1
    assert t.supported(1.0) == (t.bic_broken < t.bic_single)


def test_supf_test_holds_its_level_where_the_naive_f_test_does_not():
    """Under no break, sup-F rejects about 10 % at level 0.1; the naive F-test rejects far more."""
    rng = np.random.default_rng(11)
    x = np.geomspace(1, 1e3, 20)
    sup, naive = [], []
    for i in range(120):
        y = np.exp(-0.2 * np.log(x) + rng.normal(0, 0.05, 20))
        t = break_test(x, y, n_sim=199, seed=i)
        sup.append(t.supf_pvalue < 0.1)
        naive.append(t.f_pvalue < 0.1)
    # binomial(120, 0.1): mean 12, sd 3.3
    assert 3 <= sum(sup) <= 22
    assert sum(naive) > sum(sup)


def test_detection_rate_is_one_without_noise_and_low_without_a_break():
    x = np.geomspace(1e6, 1e10, 30)
    kinked = np.exp(broken_line(np.log(x), np.log(1e8), 1.0, -0.05, -0.3))
    straight = np.exp(1.0 - 0.1 * np.log(x))
    assert detection_rate(x, kinked, 0.0, 20) == 1.0
    assert detection_rate(x, straight, 0.05, 200) < 0.3


def test_supf_pvalue_is_undefined_when_f_is():
    """Losses exactly on one power law: both SSEs are 0, F = 0/0, so there is no evidence for a
    break; the Monte Carlo p-value must not come out as its smallest value 1/(n_sim + 1)."""
    x = np.geomspace(1, 1e3, 12)
    t = break_test(x, np.full(12, 2.0), n_sim=99)
    assert np.isnan(t.f_stat)
    assert np.isnan(t.supf_pvalue) and not t.supported(1.0)


def test_supf_pvalue_is_not_reported_without_simulations():
    """n_sim=0 skips the Monte Carlo test: its p-value is unknown, not 1 ('no evidence at all')."""
    x = np.geomspace(1, 1e3, 12)
    y = np.exp(broken_line(np.log(x), 3.0, 0.0, -0.1, -0.5) + np.random.default_rng(1).normal(0, 0.01, 12))
    t = break_test(x, y, n_sim=0)
    assert np.isfinite(t.f_stat) and t.n_sim == 0
    assert np.isnan(t.supf_pvalue) and not t.supported(1.0)
