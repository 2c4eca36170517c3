"""Data for the scaling lab: bundled public tables, a synthetic broken power law, CSV uploads.

Every path ends in `select_xy`, which maps columns, applies filters and validates the numbers,
naming the column and the CSV line of the first bad value (line 1 is the header).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engine.scaling_breakpoint import validate_xy
from engine.scaling_breaktest import detection_rate
from engine.validation import check_float, check_int

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
MAX_UPLOAD_BYTES = 5 * 2**20  # a scaling table is a few hundred rows; 5 MiB is generous
MAX_ROWS = 100_000


@dataclass(frozen=True)
class Dataset:
    """A bundled table and its sensible defaults."""

    file: str
    x: str
    y: str
    split: str | None
    nd: tuple[str, str] | None  # (params, tokens) columns for the Chinchilla L(N, D) form
    title: str


DATASETS: dict[str, Dataset] = {
    "bnsl_4digit": Dataset("bnsl_4digit_addition.csv", "training_dataset_size", "test_cross_entropy",
                           "split", None, "4-digit addition, test loss vs training-set size "
                           "(Caballero et al. 2022, BNSL Fig. 4)"),
    "chinchilla": Dataset("chinchilla_epoch_svg_extracted.csv", "Training FLOP", "loss", None,
                          ("Model Size", "tokens"),
                          "Chinchilla runs, loss vs size and compute (Hoffmann et al. 2022 Fig. 4, "
                          "extracted by Besiroglu et al. 2024)"),
}


def load_dataset(name: str) -> pd.DataFrame:
    """A bundled table by name; the Chinchilla table gains `tokens` = FLOP / (6 * params)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    df = pd.read_csv(DATA_DIR / DATASETS[name].file)
    if name == "chinchilla":
        df["tokens"] = df["Training FLOP"] / (6.0 * df["Model Size"])
    return df


# ---------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    """A known two-segment power law sampled at log-spaced sizes with log-normal noise.

    noise is the standard deviation of ln(loss) (0.01 is about 1 % noise).
    """

    n_points: int = 30
    x_min: float = 1e7
    x_max: float = 1e11
    breakpoint: float = 1e9
    slope_before: float = -0.08
    slope_after: float = -0.14
    loss_at_break: float = 3.0
    noise: float = 0.01
    seed: int = 0

    def checked(self) -> "SyntheticSpec":
        """Self, after range checks (ValueError naming the field)."""
        check_int("n_points", self.n_points, 4, 100_000)
        check_float("x_min", self.x_min, 0.0, lo_open=True)
        check_float("x_max", self.x_max, self.x_min, lo_open=True)
        check_float("breakpoint", self.breakpoint, 0.0, lo_open=True)
        check_float("slope_before", self.slope_before, -10.0, 10.0)
        check_float("slope_after", self.slope_after, -10.0, 10.0)
        check_float("loss_at_break", self.loss_at_break, 0.0, lo_open=True)
        check_float("noise", self.noise, 0.0, 5.0)
        check_int("seed", self.seed, 0, 2**32 - 1)
        return self

    def true_loss(self, params: np.ndarray) -> np.ndarray:
        """Noise-free loss at `params`."""
        u = np.log(np.asarray(params, float)) - np.log(self.breakpoint)
        return self.loss_at_break * np.exp(np.where(u <= 0, self.slope_before * u, self.slope_after * u))

    def sizes(self) -> np.ndarray:
        """The (n_points,) log-spaced sizes."""
        return np.geomspace(self.x_min, self.x_max, self.n_points)


def generate_synthetic(spec: SyntheticSpec) -> pd.DataFrame:
    """Columns params, loss (noisy), true_loss; seeded by spec.seed."""
    spec = spec.checked()
    x = spec.sizes()
    true = spec.true_loss(x)
    noise = np.random.default_rng(spec.seed).normal(0.0, spec.noise, x.size)
    return pd.DataFrame({"params": x, "loss": true * np.exp(noise), "true_loss": true})


def detection_curve(spec: SyntheticSpec, noise_levels: list[float] | np.ndarray, n_seeds: int = 200,
                    min_segment: int = 2) -> pd.DataFrame:
    """For each noise level (std of ln loss): the share of seeds where BIC detects the break."""
    spec = spec.checked()
    x = spec.sizes()
    rates = [detection_rate(x, spec.true_loss(x), float(s), n_seeds, spec.seed, min_segment)
             for s in noise_levels]
    return pd.DataFrame({"noise": np.asarray(noise_levels, float), "detection_rate": rates})


# ---------------------------------------------------------------- CSV upload


def parse_csv(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> pd.DataFrame:
    """Parse an uploaded CSV (UTF-8, header row) into a table; values stay as read (no evaluation)."""
    if len(data) > max_bytes:
        raise ValueError(f"upload is {len(data) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                         "limit; upload fewer rows")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"upload must be UTF-8 text (byte {exc.start} is not)") from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, nrows=MAX_ROWS + 1)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"upload is not a readable CSV: {str(exc).strip()}") from None
    if len(df) > MAX_ROWS:
        raise ValueError(f"upload has more than {MAX_ROWS} rows")
    if df.empty:
        raise ValueError("upload has a header but no rows")
    return df


@dataclass(frozen=True)
class Filter:
    """Keep rows whose numeric `column` lies in [low, high] (None: unbounded)."""

    column: str
    low: float | None = None
    high: float | None = None

    @staticmethod
    def parse(column: str, low: str | None, high: str | None) -> "Filter":
        """A filter from text bounds as typed in a form or on the command line ('' = unbounded)."""
        def bound(name: str, text: str | None) -> float | None:
            if text is None or not str(text).strip():
                return None
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise ValueError(f"filter {name} bound for {column!r} must be a number (empty: "
                                 f"unbounded), got {text!r}")
            return value
        lo, hi = bound("low", low), bound("high", high)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"filter range for {column!r}: low {lo:g} is above high {hi:g}")
        return Filter(column, lo, hi)


@dataclass(frozen=True)
class Selection:
    """Validated arrays for a fit, in table order; `lines` are CSV line numbers of the rows."""

    x: np.ndarray
    y: np.ndarray
    nd: tuple[np.ndarray, np.ndarray] | None  # params N and tokens D per row, both (n,)
    split: np.ndarray | None
    lines: np.ndarray


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        raise ValueError(f"column {name!r} not found; columns are: {', '.join(map(str, df.columns))}")
    return df[name]


def numeric_column(df: pd.DataFrame, name: str) -> pd.Series:
    """Column `name` as float; text that is not a number raises ValueError naming column and line."""
    col = _column(df, name)
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna() & col.notna() & (col.astype(str).str.strip().str.lower() != "nan")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"column {name!r}, line {i + 2}: {str(col.iloc[i])[:40]!r} is not a number")
    return num.astype(float)


def select_xy(df: pd.DataFrame, x: str, y: str, filters: tuple[Filter, ...] = (),
              nd: tuple[str, str] | None = None, split: str | None = None) -> Selection:
    """Map columns and filter rows of a table into validated fit inputs (positive, finite, >= 4
    distinct x; repeated x are kept: least squares fits every row)."""
    lines = np.arange(len(df)) + 2
    keep = np.ones(len(df), bool)
    for f in filters:
        v = numeric_column(df, f.column).to_numpy()
        if f.low is not None:
            keep &= v >= f.low
        if f.high is not None:
            keep &= v <= f.high
    if not keep.any():
        raise ValueError("the filters keep no rows; widen the ranges")
    xs = numeric_column(df, x).to_numpy()[keep]
    ys = numeric_column(df, y).to_numpy()[keep]
    rows = [f"line {i}" for i in lines[keep]]
    xs, ys = validate_xy(xs, ys, f"column {x!r}", f"column {y!r}", rows)
    nd_arrays = None
    if nd is not None:
        n_col, d_col = (numeric_column(df, c).to_numpy()[keep] for c in nd)
        n_col, d_col = validate_xy(n_col, d_col, f"column {nd[0]!r}", f"column {nd[1]!r}", rows,
                                   min_distinct=1)
        nd_arrays = (n_col, d_col)
    sp = _column(df, split).astype(str).to_numpy()[keep] if split is not None else None
    return Selection(xs, ys, nd_arrays, sp, lines[keep])
