"""Issue 20: do the breakpoint intervals keep their promise? Coverage across a grid of designs.

    .venv/bin/python benchmarks/bench_breakpoint_ci.py [--reps 400] [--boot 200] [--null-reps 1000]

1. Coverage of each 95 % interval of the breakpoint (share of replicates holding the true knee,
   with its binomial standard error) and median width in decades, per method and design. Designs:
   3 decades of log-spaced sizes, n 10-100, sharp (-0.05 -> -0.25) and weak (-0.1 -> -0.15) kinks,
   ln-noise sd 0.01-0.05, knee at 15 %, 50 %, 85 % of the range, Gaussian and t(3) noise (scaled
   to the same sd), and repeated sizes (10 sizes x 3 runs). Methods: `bootstrap` (today's
   percentile case bootstrap), `residual` (percentile residual bootstrap), `profile` (inverted F,
   Toms & Lesperance 2003), `calibrated` (inverted F with least-favourable critical values, the
   page's default). Bootstraps use --boot resamples here (the page: 1,000).
2. False-break rate of the sup-F test at 5 % with no break, Gaussian and t(3) noise, under squared
   and Huber loss.
3. Time of one 95 % interval for 100 points: the default against today's 1,000-resample bootstrap,
   side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.scaling_breaktest import break_test  # noqa: E402
from engine.scaling_intervals import DEFAULT_METHOD, N_CAL, _bounds, bootstrap, profile_interval  # noqa: E402
from engine.scaling_robust import break_test_huber  # noqa: E402
from engine.timing import alternating  # noqa: E402

SHARP, WEAK = (-0.05, -0.25), (-0.1, -0.15)


@dataclass(frozen=True)
class Design:
    """One simulated setting: sizes over 3 decades, a knee, noise in ln loss."""

    n: int
    kink: tuple[float, float]
    sd: float
    knee_at: float  # position of the knee in the log range, 0..1
    noise: str = "gauss"  # gauss | t3
    repeats: int = 1  # runs per size

    @property
    def label(self) -> str:
        """Short description for the table."""
        kink = "sharp" if self.kink == SHARP else "weak"
        rep = f" {self.n // self.repeats}x{self.repeats}" if self.repeats > 1 else ""
        return f"n={self.n}{rep} {kink} sd={self.sd} knee@{self.knee_at:.0%} {self.noise}"

    def sizes(self) -> np.ndarray:
        """(n,) sizes, repeated sizes adjacent."""
        return np.repeat(np.geomspace(1e6, 1e9, self.n // self.repeats), self.repeats)

    def knee(self) -> float:
        """The true breakpoint."""
        return 1e6 * 10 ** (3 * self.knee_at)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One table's losses."""
        x = self.sizes()
        u = np.log(x / self.knee())
        e = rng.normal(0, self.sd, x.size) if self.noise == "gauss" else \
            self.sd / np.sqrt(3.0) * rng.standard_t(3, x.size)  # t(3) has variance 3
        return np.exp(1.0 + np.where(u <= 0, self.kink[0] * u, self.kink[1] * u) + e)


def designs() -> list[Design]:
    """The grid: a factorial core plus noise level, heavy tails and repeated sizes."""
    out = [Design(n, k, 0.03, p) for n in (10, 15, 30, 100) for k in (SHARP, WEAK) for p in (0.15, 0.5, 0.85)]
    out += [Design(30, k, sd, p) for sd in (0.01, 0.05) for k in (SHARP, WEAK) for p in (0.15, 0.5)]
    out += [Design(n, k, 0.03, p, "t3") for n in (15, 30) for k in (SHARP, WEAK) for p in (0.15, 0.5)]
    out += [Design(30, k, 0.03, p, repeats=3) for k in (SHARP, WEAK) for p in (0.15, 0.5)]
    return out


def methods(n_boot: int) -> dict:
    """name -> f(x, y, seed) -> (low, high) breakpoint interval."""
    return {
        "bootstrap": lambda x, y, s: bootstrap(x, y, n_boot, seed=s).breakpoint_ci,
        "residual": lambda x, y, s: bootstrap(x, y, n_boot, seed=s, scheme="residuals").breakpoint_ci,
        "profile": lambda x, y, s: profile_interval(x, y).breakpoint,
        # The page's default seed: the calibration depends on the sizes only, so it is computed
        # once per design (cached), as for a user refitting one table layout.
        "calibrated": lambda x, y, s: profile_interval(x, y, n_cal=N_CAL).breakpoint,
    }


def coverage(design: Design, reps: int, n_boot: int, seed: int) -> list[dict]:
    """One row per method: coverage, its binomial SE, median width (decades)."""
    rng = np.random.default_rng(seed)
    x, knee = design.sizes(), design.knee()
    fns = methods(n_boot)
    hits = {k: 0 for k in fns}
    widths: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        y = design.draw(rng)
        for name, fn in fns.items():
            lo, hi = fn(x, y, r)
            hits[name] += lo <= knee <= hi
            widths[name].append(np.log10(hi / lo))
    rows = []
    for name in fns:
        p = hits[name] / reps
        rows.append({"design": design.label, "method": name, "coverage": p,
                     "se": float(np.sqrt(p * (1 - p) / reps)), "median_width_dec": float(np.median(widths[name]))})
    return rows


def false_breaks(reps: int, n_sim: int) -> pd.DataFrame:
    """Share of no-break tables (n 30, slope -0.1, sd 0.03) where sup-F rejects at 5 %."""
    x = np.geomspace(1e6, 1e9, 30)
    rows = []
    for noise in ("gauss", "t3"):
        d = Design(30, (-0.1, -0.1), 0.03, 0.5, noise)
        rng = np.random.default_rng(7)
        ls = hub = 0
        for r in range(reps):
            y = d.draw(rng)
            ls += break_test(x, y, n_sim, seed=r).supf_pvalue < 0.05
            hub += break_test_huber(x, y, n_sim, seed=r).supf_pvalue < 0.05
        for loss, k in (("squared", ls), ("huber", hub)):
            p = k / reps
            rows.append({"noise": noise, "loss": loss, "false_break_rate": p, "se": np.sqrt(p * (1 - p) / reps),
                         "tables": reps, "null_draws": n_sim})
    return pd.DataFrame(rows)


def speed(rounds: int = 15) -> pd.DataFrame:
    """One 95 % interval for 100 points, default (cold: calibration cache cleared) and today's
    1,000-resample bootstrap, alternated round by round; wall and process-CPU ms, medians."""
    d = Design(100, WEAK, 0.03, 0.5)
    x, y = d.sizes(), d.draw(np.random.default_rng(1))

    def timed(fn) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        fn()
        return 1e3 * (time.perf_counter() - w), 1e3 * (time.process_time() - c)

    default = lambda: timed(lambda: (_bounds.cache_clear(), profile_interval(x, y, n_cal=N_CAL)))  # noqa: E731
    today = lambda: timed(lambda: bootstrap(x, y, 1000))  # noqa: E731
    a, b = alternating(default, today, rounds)
    ratio = np.median([p[0] / q[0] for p, q in zip(a, b)])
    return pd.DataFrame([
        {"interval": f"{DEFAULT_METHOD} (default, cold)", "wall_ms": np.median([t[0] for t in a]),
         "cpu_ms": np.median([t[1] for t in a]), "target_ms": 100.0, "wall_ratio_vs_today": ratio},
        {"interval": "bootstrap, 1,000 resamples (today)", "wall_ms": np.median([t[0] for t in b]),
         "cpu_ms": np.median([t[1] for t in b]), "target_ms": np.nan, "wall_ratio_vs_today": 1.0}])


def summary(cov: pd.DataFrame) -> pd.DataFrame:
    """Per design: each method's coverage, and default width / today's width."""
    order = list(dict.fromkeys(cov["design"]))  # the grid's order
    t = cov.pivot(index="design", columns="method", values="coverage").loc[order]
    w = cov.pivot(index="design", columns="method", values="median_width_dec").loc[order]
    out = t.add_prefix("cov_")
    out["width_ratio_default_vs_today"] = w[DEFAULT_METHOD] / w["bootstrap"]
    return out.reset_index()


def main() -> None:
    """Print the coverage grid, the false-break rates and the timing."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=400, help="replicates per design")
    p.add_argument("--boot", type=int, default=200, help="bootstrap resamples per interval")
    p.add_argument("--null-reps", type=int, default=500, help="no-break tables per noise")
    p.add_argument("--null-sims", type=int, default=199, help="sup-F null draws per table")
    p.add_argument("--only", type=int, nargs="*", help="design indices to run (default: all)")
    args = p.parse_args()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at start (shared machine)")
    print(f"# reps {args.reps} per design, {args.boot} bootstrap resamples, calibration draws {N_CAL}")
    grid = designs()
    rows = []
    t0 = time.perf_counter()
    for i, d in enumerate(grid):
        if args.only and i not in args.only:
            continue
        rows += coverage(d, args.reps, args.boot, seed=1000 + i)
        print(f"  [{i + 1}/{len(grid)}] {d.label} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    cov = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 500):
        print("\n== 1. coverage of 95 % breakpoint intervals (se: binomial standard error)")
        print(cov.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        s = summary(cov)
        print(f"\n== 1b. per design; default = {DEFAULT_METHOD}; target: default coverage >= 0.93, "
              "width <= 1.5x today's where today's covers (>= 0.93)")
        print(s.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        low = s[s[f"cov_{DEFAULT_METHOD}"] < 0.93]
        print(f"designs where the default covers < 0.93: {len(low)}"
              + ("" if low.empty else " -> " + "; ".join(low["design"])))
        if args.null_reps:
            print("\n== 2. false-break rate of sup-F at 5 % (no break, n 30, sd 0.03)")
            print(false_breaks(args.null_reps, args.null_sims).to_string(index=False,
                                                                          float_format=lambda v: f"{v:.4f}"))
        print(f"\n== 3. one 95 % interval, 100 points (load average {os.getloadavg()[0]:.1f})")
        print(speed().to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
