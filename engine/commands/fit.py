"""`python -m engine fit data.csv --x COL --y COL`: the scaling page's fit, from a shell."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult
    from engine.scaling_data import Filter

HELP = "exact two-segment power-law fit of a CSV or bundled table, with CIs, tests and other forms"
# The engine's names -> flags, for the checks that depend on the data (2 * --min-segment points).
NAMES = {"min_segment": "--min-segment", "first_k": "--first-k", "n_boot": "--n-boot",
         "level": "--level", "n_sim": "--n-sim", "target": "--target"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments: a CSV path or --dataset, column mapping, filters, fit and hold-out settings."""
    p.add_argument("csv", nargs="?", help="CSV file with a header row (or use --dataset)")
    p.add_argument("--dataset", help="a bundled table instead of a CSV, e.g. bnsl_4digit, chinchilla")
    p.add_argument("--x", help="size column (params, data or compute); default: the dataset's")
    p.add_argument("--y", help="loss column; default: the dataset's")
    p.add_argument("--filter", action="append", default=[], metavar="COL:LO:HI",
                   help="keep rows with LO <= COL <= HI (empty LO or HI: unbounded); repeatable")
    p.add_argument("--nd", metavar="NCOL,DCOL", help="params and tokens columns for the Chinchilla form")
    p.add_argument("--split", help="column whose 'train' rows are fitted (with --holdout split)")
    p.add_argument("--holdout", choices=("none", "split", "first_k"), default=None,
                   help="which rows to fit; the others are extrapolated (default: split if given)")
    p.add_argument("--first-k", type=int, default=10, help="with --holdout first_k: fit the k smallest")
    p.add_argument("--min-segment", type=int, default=2, help="minimum points per segment")
    p.add_argument("--discontinuous", action="store_true", help="allow a jump at the breakpoint")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--n-sim", type=int, default=999, help="null simulations of the sup-F test")
    p.add_argument("--seed", type=int, default=0, help="noise draws of resamples and simulations (>= 0)")
    p.add_argument("--method", help="interval in the fit table (default: the page's; a wrong name "
                                    "lists them with what each is)")
    p.add_argument("--loss", help="squared (default) or huber: robust to heavy-tailed noise")
    p.add_argument("--target", type=float, help="extrapolate the loss to this size")
    p.add_argument("--forms", help="comma-separated forms, e.g. power,broken (default: all; a wrong "
                                   "name lists them)")


def _filter(text: str) -> Filter:
    from engine.scaling_data import Filter

    parts = text.rsplit(":", 2)  # column names may contain ':'; bounds may not
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--filter must be COL:LO:HI, got {text!r}")
    return Filter.parse(*parts)


def run(args: argparse.Namespace) -> CommandResult:
    """Load, select, fit and tabulate exactly as the scaling page does."""
    from engine.cli import CommandResult
    from engine.scaling_data import DATASETS, MAX_UPLOAD_BYTES, load_dataset, parse_csv, select_xy
    from engine.scaling_breakpoint import MAX_SEED
    from engine.scaling_forms import FORMS
    from engine.scaling_intervals import DEFAULT_METHOD, METHOD_NAMES, METHODS
    from engine.scaling_lab import LOSSES, FitSettings, analyse
    from engine.validation import check_choice, check_float, check_int

    if (args.csv is None) == (args.dataset is None):
        raise ValueError("give either a CSV path or --dataset NAME")
    if args.dataset:
        check_choice("--dataset", args.dataset, tuple(sorted(DATASETS)))
        ds = DATASETS[args.dataset]
        df = load_dataset(args.dataset)
        x, y = args.x or ds.x, args.y or ds.y
        split = args.split or ds.split
        nd = tuple(args.nd.split(",")) if args.nd else ds.nd
    else:
        path = Path(args.csv)
        if not path.is_file():
            raise ValueError(f"CSV file {args.csv!r} not found")
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise ValueError(f"CSV file is over the {MAX_UPLOAD_BYTES / 2**20:.0f} MiB limit")
        df = parse_csv(path.read_bytes())
        if not args.x or not args.y:
            raise ValueError("--x and --y are required with a CSV file")
        x, y, split = args.x, args.y, args.split
        nd = tuple(args.nd.split(",")) if args.nd else None
    if nd is not None and len(nd) != 2:
        raise ValueError(f"--nd must be NCOL,DCOL, got {args.nd!r}")
    # Flags checked under the names typed (the engine would name its own arguments).
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("--n-boot", args.n_boot, 10, 100_000)
    check_int("--n-sim", args.n_sim, 0, 100_000)
    check_int("--min-segment", args.min_segment, 2, 500_000)
    check_int("--first-k", args.first_k, 4)
    check_float("--level", args.level, 0.5, 0.999)
    method = DEFAULT_METHOD if args.method is None else args.method
    if method not in METHODS:
        raise ValueError(f"--method must be one of: "
                         + "; ".join(f"{k} ({v})" for k, v in METHOD_NAMES.items()) + f"; got {method!r}")
    loss = check_choice("--loss", "squared" if args.loss is None else args.loss, LOSSES)
    holdout = args.holdout or ("split" if split else "none")
    sel = select_xy(df, x, y, tuple(_filter(f) for f in args.filter), nd,
                    split if holdout == "split" else None)
    settings = FitSettings(min_segment=args.min_segment, continuous=not args.discontinuous,
                           n_boot=args.n_boot, level=args.level, n_sim=args.n_sim, seed=args.seed,
                           holdout=holdout, first_k=args.first_k, target=args.target,
                           forms=FORMS if args.forms is None else
                           tuple(f.strip() for f in args.forms.split(",") if f.strip()),
                           method=method, loss=loss, compare=True)
    res = analyse(sel, settings)
    tables = {f"two-segment fit (intervals: {METHOD_NAMES[method]})": res.summary,
              "breakpoint and slope intervals by method": res.methods,
              "forms (RMSLE in natural-log units)": res.forms}
    if not res.extrapolation.empty:
        tables["extrapolation"] = res.extrapolation
    return CommandResult(tables=tables, data={"model": res.model.summary, "x": x, "y": y,
                                              "settings": settings.__dict__})
