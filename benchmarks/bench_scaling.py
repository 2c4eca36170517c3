"""Issue 4's numbers for the scaling lab, measured in one run on this machine.

    .venv/bin/python benchmarks/bench_scaling.py [--seeds 200]

1. Exactness: SSE of the exact search against a dense 20,001-point brute-force profile over the
   breakpoint, on both bundled tables and on random data (ratio <= 1 means never worse).
2. Speed: one fit on 1,000 points and 1,000 bootstrap resamples of 100 points, side by side with
   the brute-force profile on the same points.
3. Coverage: share of seeds whose 95 % bootstrap interval holds the true breakpoint (1 % noise).
4. BNSL 4-digit addition: fit on the 14 train rows, extrapolation RMSLE of each form.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.scaling_breakpoint import fit_breakpoint, profile_sse  # noqa: E402
from engine.scaling_intervals import bootstrap  # noqa: E402
from engine.scaling_data import SyntheticSpec, generate_synthetic, load_dataset  # noqa: E402
from engine.scaling_forms import compare_forms, holdout_mask  # noqa: E402
from engine.timing import time_fn  # noqa: E402

GRID = 20_001


def _dense_profile_min(x: np.ndarray, y: np.ndarray, continuous: bool = True) -> float:
    xs = np.sort(x)
    grid = np.geomspace(xs[1], xs[-2], GRID)  # min 2 points a side
    return float(profile_sse(x, y, grid, continuous=continuous).min())


def exactness(n_random: int) -> pd.DataFrame:
    """Exact SSE / brute-force SSE per case (worst case for the random data)."""
    rows = []
    bn = load_dataset("bnsl_4digit")
    tr = bn[bn["split"] == "train"]
    ch = load_dataset("chinchilla")
    cases = [("bnsl_4digit (14 train rows)", tr["training_dataset_size"].to_numpy(),
              tr["test_cross_entropy"].to_numpy()),
             ("bnsl_4digit (all 17 rows)", bn["training_dataset_size"].to_numpy(),
              bn["test_cross_entropy"].to_numpy()),
             ("chinchilla (loss vs FLOP, 245)", ch["Training FLOP"].to_numpy(), ch["loss"].to_numpy())]
    for name, x, y in cases:
        exact, brute = fit_breakpoint(x, y).sse, _dense_profile_min(x, y)
        rows.append({"data": name, "exact_sse": exact, "brute_sse": brute, "ratio": exact / brute})
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(n_random):
        n = int(rng.integers(6, 60))
        x = np.sort(rng.uniform(1, 1e4, n))
        y = np.exp(rng.normal(0, 0.3, n) - 0.1 * np.log(x))
        worst = max(worst, fit_breakpoint(x, y).sse / _dense_profile_min(x, y))
    rows.append({"data": f"random ({n_random} data sets), worst", "exact_sse": np.nan,
                 "brute_sse": np.nan, "ratio": worst})
    return pd.DataFrame(rows)


def speed() -> tuple[pd.DataFrame, float, float]:
    """Median ms of the exact fit and the bootstrap, against the dense profile on the same data;
    also (profile / exact fit) and (bootstrap / 1,000 single fits) on 100 points."""
    rng = np.random.default_rng(1)
    x1k = np.sort(rng.uniform(1e6, 1e10, 1000))
    y1k = np.exp(np.where(x1k < 1e8, -0.05, -0.25) * np.log(x1k / 1e8) + rng.normal(0, 0.01, 1000))
    spec = SyntheticSpec(n_points=100, noise=0.01)
    d = generate_synthetic(spec)
    x100, y100 = d["params"].to_numpy(), d["loss"].to_numpy()
    fit = time_fn(lambda: fit_breakpoint(x1k, y1k), reps=50, min_total_s=1.0)
    prof = time_fn(lambda: _dense_profile_min(x100, y100), reps=3)
    boot = time_fn(lambda: bootstrap(x100, y100, n_boot=1000), reps=5)
    one100 = time_fn(lambda: fit_breakpoint(x100, y100), reps=50, min_total_s=1.0)
    return pd.DataFrame([
        {"case": "exact fit, 1,000 points", "median_ms": fit.median_ms, "target_ms": 5.0},
        {"case": "dense 20,001-point profile, 100 points", "median_ms": prof.median_ms, "target_ms": np.nan},
        {"case": "exact fit, 100 points", "median_ms": one100.median_ms, "target_ms": np.nan},
        {"case": "1,000 bootstrap resamples, 100 points", "median_ms": boot.median_ms, "target_ms": 1000.0},
    ]), prof.median_ms / one100.median_ms, boot.median_ms / (1000 * one100.median_ms)


def coverage(seeds: int) -> pd.DataFrame:
    """Share of seeds whose 95 % percentile interval holds the true breakpoint, 1 % noise."""
    rows = []
    for label, spec in (("default knee (-0.08 -> -0.14), 30 points",
                         SyntheticSpec(n_points=30, noise=0.01)),
                        ("sharp knee (-0.05 -> -0.25), 30 points",
                         SyntheticSpec(n_points=30, noise=0.01, slope_before=-0.05, slope_after=-0.25))):
        hits, widths = 0, []
        for s in range(seeds):
            d = generate_synthetic(SyntheticSpec(**{**spec.__dict__, "seed": s}))
            b = bootstrap(d["params"], d["loss"], n_boot=1000, seed=s)
            lo, hi = b.breakpoint_ci
            hits += lo <= spec.breakpoint <= hi
            widths.append(np.log10(hi / lo))
        rows.append({"case": label, "seeds": seeds, "coverage": hits / seeds,
                     "median_ci_width_decades": float(np.median(widths))})
    return pd.DataFrame(rows)


def bnsl_holdout() -> pd.DataFrame:
    """Extrapolation RMSLE of every form on the last 3 points of 4-digit addition."""
    df = load_dataset("bnsl_4digit")
    table, _ = compare_forms(df["training_dataset_size"], df["test_cross_entropy"],
                             holdout_mask(len(df), split=df["split"]))
    return table.drop(columns="fit")


def main() -> None:
    """Print the four tables and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--random", type=int, default=200, help="random data sets for exactness")
    args = p.parse_args()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\n== 1. exactness: exact SSE / dense 20,001-point profile SSE (<= 1: never worse)")
        print(exactness(args.random).to_string(index=False, float_format=lambda v: f"{v:.10g}"))
        table, prof_ratio, boot_ratio = speed()
        print("\n== 2. speed (median of repetitions; pwlf takes 30-50 ms per fit per the issue)")
        print(table.to_string(index=False))
        print(f"dense profile / exact fit on 100 points: {prof_ratio:,.0f}x; "
              f"1,000-resample bootstrap / (1,000 single fits): {boot_ratio:.3f}")
        print("\n== 3. coverage of the 95 % bootstrap interval (target >= 0.90)")
        print(coverage(args.seeds).to_string(index=False))
        print("\n== 4. BNSL 4-digit addition, 14 train rows, RMSLE on the 3 extrapolated (bnsl target <= 0.02)")
        print(bnsl_holdout().to_string(index=False))


if __name__ == "__main__":
    main()
