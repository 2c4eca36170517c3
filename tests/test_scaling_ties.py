"""Repeated sizes (issue 14) and nearly noise-free data (issue 20): the fit stays the exact global
least-squares optimum, checked against brute-force profiles written here with np.linalg.lstsq."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.scaling_breakpoint import fit_breakpoint
from engine.scaling_data import load_dataset, parse_csv, select_xy
from engine.scaling_forms import compare_forms
from engine.scaling_intervals import bootstrap


def lstsq_sse(u, v, c, w=None, continuous=True):
    """SSE of the two-segment least-squares fit at a fixed breakpoint c (log units), by lstsq."""
    w = np.ones_like(u) if w is None else w
    r = u > c
    if continuous:
        X = np.column_stack([np.ones_like(u), u, np.maximum(u - c, 0)])
    else:
        X = np.column_stack([~r, u * ~r, r, u * r]).astype(float)
    sw = np.sqrt(w)
    beta = np.linalg.lstsq(X * sw[:, None], v * sw, rcond=None)[0]
    return float(np.sum(w * (v - X @ beta) ** 2))


def dense_profile_min(u, v, grid, w=None, continuous=True):
    """Brute force: the least SSE over every breakpoint of `grid`."""
    return min(lstsq_sse(u, v, c, w, continuous) for c in grid)


def test_chinchilla_by_model_size_is_fitted_on_all_245_rows_at_the_global_optimum():
    df = load_dataset("chinchilla")
    x, y = df["Model Size"].to_numpy(), df["loss"].to_numpy()
    assert np.unique(x).size < x.size  # the table repeats sizes: this was refused before
    m = fit_breakpoint(x, y)
    assert m.n == 245
    u, v = np.log(x), np.log(y)
    g = np.unique(u)
    grid = np.linspace(g[1], g[-2], 4001)  # 2 distinct sizes a side at least
    brute = dense_profile_min(u, v, grid)
    assert m.sse <= brute + 1e-12
    assert m.sse >= brute * (1 - 1e-4)  # the grid comes within 1e-4 of the optimum
    # the reported SSE is the SSE of the reported model
    assert m.sse == pytest.approx(float(np.sum((v - np.log(m.predict(x))) ** 2)), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(sizes=st.integers(4, 9), seed=st.integers(0, 2**31 - 1), continuous=st.booleans())
def test_many_ties_match_a_dense_brute_force(sizes, seed, continuous):
    rng = np.random.default_rng(seed)
    levels = np.sort(rng.uniform(0.0, 8.0, sizes))
    if np.min(np.diff(levels)) < 1e-3:
        return
    u = np.repeat(levels, rng.integers(1, 5, sizes))
    v = rng.normal(0, 1, u.size)
    m = fit_breakpoint(np.exp(u), np.exp(v), continuous=continuous)
    # every breakpoint between distinct sizes with two sizes a side, plus the sizes themselves
    grid = np.unique(np.r_[np.linspace(levels[1], levels[-2], 401), levels[1:-1]])
    brute = dense_profile_min(u, v, grid, continuous=continuous)
    assert m.sse <= brute + 1e-9
    assert m.sse >= brute - 1e-2 * brute - 1e-9


def test_a_repeated_row_counts_as_a_weight_of_two():
    rng = np.random.default_rng(3)
    x = np.geomspace(1e6, 1e9, 12)
    y = np.exp(np.where(x < 3e7, -0.1, -0.3) * np.log(x / 3e7) + rng.normal(0, 0.02, 12))
    w = np.ones(12)
    w[[2, 7]] = 2.0
    a = fit_breakpoint(np.r_[x, x[[2, 7]]], np.r_[y, y[[2, 7]]])
    b = fit_breakpoint(x, y, weights=w)
    assert a.breakpoint == pytest.approx(b.breakpoint, rel=1e-10)
    assert a.sse == pytest.approx(b.sse, rel=1e-10)


def test_every_form_and_the_bootstrap_take_repeated_sizes():
    df = load_dataset("chinchilla")
    x, y = df["Model Size"].to_numpy(), df["loss"].to_numpy()
    table, fits = compare_forms(x, y, forms=("power", "saturating", "broken"))
    assert set(table["form"]) == {"power", "saturating", "broken"}
    slope, icpt = np.polyfit(np.log(x), np.log(y), 1)  # least squares on all 245 rows
    assert fits["power"].params["alpha"] == pytest.approx(-slope, rel=1e-9)
    b = bootstrap(x, y, n_boot=50)
    assert b.n_valid == 50 and b.breakpoint_ci[0] < b.breakpoint_ci[1]


def test_a_table_is_refused_only_when_it_cannot_be_fitted():
    sel = select_xy(parse_csv(b"n,loss\n10,3\n10,2.9\n20,2.5\n40,2.2\n40,2.1\n80,2\n"), "n", "loss")
    assert sel.x.size == 6  # repeats are kept
    with pytest.raises(ValueError, match=r"^need at least 4 distinct values of column 'n' for two "
                                         r"segments, got 3 \(10, 20, 40\) in 5 rows$"):
        select_xy(parse_csv(b"n,loss\n10,3\n10,2.9\n20,2.5\n40,2.2\n40,2.1\n"), "n", "loss")


def _nearly_exact(seed):
    """A random two-segment law with ln-noise sd 1e-13 .. 1e-8 (x from 8 to 300 random sizes)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 300))
    u = np.log(np.sort(rng.uniform(1, 1e4, n)) * 10 ** rng.uniform(0, 10))
    c = rng.uniform(u[2], u[-3])
    s1, s2 = rng.uniform(-1, 0.2, 2)
    return u, np.where(u <= c, 5 + s1 * (u - c), 5 + s2 * (u - c)) + rng.normal(0, 10 ** rng.uniform(-13, -8), n), c


def test_nearly_noise_free_data_keep_the_exact_optimum():
    """Prefix sums cancel when SSE is ~1e-16 of the sums; the fit must still beat the true knee."""
    for seed in range(300):
        u, v, c = _nearly_exact(seed)
        m = fit_breakpoint(np.exp(u), np.exp(v))
        assert m.sse <= lstsq_sse(u, v, c) * (1 + 1e-3) + 1e-30, seed
