"""The scaling lab's one call: fit, intervals by every method, break test and other forms.

The page and `python -m engine fit` both call `analyse`, so a shell reproduces the page's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from engine.scaling_breakpoint import BreakpointModel, fit_breakpoint
from engine.scaling_breaktest import BreakTest, break_test
from engine.scaling_forms import FORMS, compare_forms, holdout_mask
from engine.scaling_intervals import (DEFAULT_METHOD, METHOD_NAMES, METHODS, N_CAL, BootstrapResult,
                                      Intervals, bootstrap, prediction_band, profile_interval)
from engine.scaling_robust import break_test_huber, fit_breakpoint_huber
from engine.validation import check_choice, check_float

if TYPE_CHECKING:
    from engine.scaling_data import Selection

LOSSES = ("squared", "huber")
# The page's labels, by the name a check reports (validation.relabel; `fit` has its NAMES).
PAGE_LABELS = {"min_segment": '"Min points per segment"', "first_k": '"k" (the k smallest sizes)',
               "n_boot": '"Bootstrap resamples"', "level": '"Interval level"', "seed": '"Seed"',
               "target": '"Extrapolate to size"'}


@dataclass(frozen=True)
class FitSettings:
    """How to fit: segments, loss, intervals, hold-out and the extrapolation target (params units)."""

    min_segment: int = 2
    continuous: bool = True
    n_boot: int = 1000
    level: float = 0.95
    n_sim: int = 999
    seed: int = 0
    holdout: str = "none"  # none | split | first_k
    first_k: int = 10
    target: float | None = None
    forms: tuple[str, ...] = FORMS
    method: str = DEFAULT_METHOD  # the interval shown: one of METHODS
    compare: bool = False  # also compute every other method (LabResult.methods)
    loss: str = "squared"  # squared | huber (heavy-tailed noise)


@dataclass(frozen=True)
class LabResult:
    """Everything the scaling page and `python -m engine fit` show, as plain tables."""

    model: BreakpointModel
    boot: BootstrapResult  # case bootstrap: the histogram of resampled knees
    test: BreakTest
    intervals: Intervals  # the chosen method's
    methods: pd.DataFrame  # the chosen method's intervals, and every other's with compare
    summary: pd.DataFrame  # quantity, estimate, low, high (chosen method)
    forms: pd.DataFrame  # compare_forms table
    points: pd.DataFrame  # line, x, y, fitted, residual, train[, huber_weight] (sorted by x)
    curve: pd.DataFrame  # x grid with the broken fit, its bands and every form's prediction
    extrapolation: pd.DataFrame  # target row (empty if no target)


def _methods_table(rows: dict[str, Intervals], default: str) -> pd.DataFrame:
    return pd.DataFrame([{
        "method": name, "description": METHOD_NAMES[name] + (" (default)" if name == default else ""),
        "breakpoint_low": iv.breakpoint[0], "breakpoint_high": iv.breakpoint[1],
        "slope_before_low": iv.slope_before[0], "slope_before_high": iv.slope_before[1],
        "slope_after_low": iv.slope_after[0], "slope_after_high": iv.slope_after[1],
        "note": iv.note} for name, iv in rows.items()])


def _rows(sel: "Selection", settings: FitSettings):
    """Rows sorted by size, and the training mask the hold-out setting picks."""
    check_choice("holdout", settings.holdout, ("none", "split", "first_k"))
    order = np.argsort(sel.x, kind="stable")
    x, y, lines = sel.x[order], sel.y[order], sel.lines[order]
    nd = (sel.nd[0][order], sel.nd[1][order]) if sel.nd is not None else None
    if settings.holdout == "split":
        if sel.split is None:
            raise ValueError("holdout 'split' needs a split column")
        train = holdout_mask(x.size, split=sel.split[order])
    else:
        train = holdout_mask(x.size, settings.first_k if settings.holdout == "first_k" else None)
    target = None if settings.target is None else check_float("target", settings.target, 0.0, lo_open=True)
    grid = np.geomspace(x.min(), max(x.max(), target or 0.0), 200)
    return x, y, lines, nd, train, target, grid


def other_forms(sel: "Selection", settings: FitSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The compare_forms table on the training rows and each form's loss on the lab's size grid
    (columns x and one per form). Independent of seed, loss and intervals: pages cache it apart."""
    x, y, _, nd, train, _, grid = _rows(sel, settings)
    table, fits = compare_forms(x, y, train, nd, tuple(settings.forms), settings.min_segment)
    curves = pd.DataFrame({"x": grid})
    for name, fit in fits.items():
        if name != "chinchilla":  # needs N and D per grid point; shown in the table only
            curves[name] = fit.predict(grid)
    return table, curves


def analyse(sel: "Selection", settings: FitSettings = FitSettings(), forms: bool = True) -> LabResult:
    """Fit the two-segment law with intervals and tests on the training rows of `sel`; with
    `forms`, compare the other forms too (else LabResult.forms is empty: see other_forms)."""
    check_choice("interval method", settings.method, METHODS)
    check_choice("loss", settings.loss, LOSSES)
    x, y, lines, nd, train, target, grid = _rows(sel, settings)
    xt, yt = x[train], y[train]
    kw = dict(min_segment=settings.min_segment, continuous=settings.continuous)
    weights = None
    if settings.loss == "huber":  # intervals then treat the final IRLS weights as known
        model, weights = fit_breakpoint_huber(xt, yt, **kw)
        test = break_test_huber(xt, yt, settings.n_sim, settings.seed, **kw)
    else:
        model = fit_breakpoint(xt, yt, **kw)
        test = break_test(xt, yt, settings.n_sim, settings.seed, **kw)
    at = np.r_[grid, target or grid[-1]]
    boot = bootstrap(xt, yt, settings.n_boot, settings.level, settings.seed, weights=weights, **kw)
    ivs: dict[str, Intervals] = {}
    bands: dict[str, np.ndarray] = {}
    for name in METHODS if settings.compare else (settings.method,):
        if name in ("calibrated", "profile"):
            pi = profile_interval(xt, yt, settings.level, weights=weights, at=at, seed=settings.seed,
                                  n_cal=N_CAL if name == "calibrated" else 0, **kw)
            ivs[name], b = pi, pi.bands
        else:
            res = boot if name == "bootstrap" else bootstrap(
                xt, yt, settings.n_boot, settings.level, settings.seed, weights=weights,
                scheme="residuals", **kw)
            ivs[name] = res.intervals()
            b = prediction_band(res, at, settings.seed) if name == settings.method else {}
        if name == settings.method:
            bands = b
    iv = ivs[settings.method]
    summary = pd.DataFrame([
        *({"quantity": q, "estimate": v, "low": lo, "high": hi} for q, v, (lo, hi) in (
            ("breakpoint", model.breakpoint, iv.breakpoint),
            ("slope_before", model.slope_before, iv.slope_before),
            ("slope_after", model.slope_after, iv.slope_after))),
        *({"quantity": q, "estimate": v, "low": np.nan, "high": np.nan} for q, v in (
            ("intercept", model.intercept), ("jump", model.jump), ("sse", model.sse), ("r2", model.r2),
            ("rmsle", model.rmsle), ("F", test.f_stat), ("F p-value (naive)", test.f_pvalue),
            ("sup-F p-value (Davies-type)", test.supf_pvalue), ("BIC single", test.bic_single),
            ("BIC broken", test.bic_broken), ("n train", model.n))),
    ])
    fitted = model.predict(x)
    points = pd.DataFrame({"line": lines, "x": x, "y": y, "fitted": fitted,
                           "residual": np.log(y) - np.log(fitted), "train": train})
    if weights is not None:
        points.loc[train, "huber_weight"] = weights
    curve = pd.DataFrame({"x": grid, "broken_fit": model.predict(grid),
                          **{k: v[:-1] for k, v in bands.items()}})
    table = pd.DataFrame()
    if forms:
        table, curves = other_forms(sel, settings)
        curve = pd.concat([curve, curves.drop(columns="x")], axis=1)
    extrap = pd.DataFrame()
    if target is not None:
        extrap = pd.DataFrame([{"target": target, "predicted_loss": float(model.predict(target)),
                                **{k: float(v[-1]) for k, v in bands.items()}}])
    return LabResult(model, boot, test, iv, _methods_table(ivs, DEFAULT_METHOD), summary, table,
                     points, curve, extrap)
