"""`python -m engine train`: train a small MoE language model once per router and compare them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import CommandResult

HELP = "train a small MoE language model per router (same init, batches, optimiser) and compare"

# flag -> (TrainSettings field, type); defaults come from TrainSettings.
FIELDS = {"steps": ("steps", int), "experts": ("experts", int), "k": ("k", int),
          "layers": ("layers", int), "d-model": ("d_model", int), "heads": ("heads", int),
          "d-expert": ("d_expert", int), "moe-every": ("moe_every", int),
          "batch": ("batch", int), "seq-len": ("seq_len", int), "lr": ("lr", float),
          "warmup": ("warmup", int), "eval-every": ("eval_every", int),
          "eval-batches": ("eval_batches", int), "alpha": ("alpha", float),
          "capacity": ("capacity", float), "gamma": ("gamma", float), "vocab": ("vocab", int),
          "tokenizer": ("tokenizer", str), "positions": ("positions", str),
          "device": ("device", str), "dtype": ("dtype", str)}


# The names the engine's messages use (the page's labels) -> the flags typed here.
NAMES = {"vocabulary": "--vocab", "d_model": "--d-model", "layers": "--layers", "heads": "--heads",
         "sequence length": "--seq-len", "expert width": "--d-expert", "Experts E": "--experts",
         "Experts per token k": "--k", "MoE every n-th layer": "--moe-every", "alpha": "--alpha",
         "capacity factor": "--capacity", "DeepSeek gamma": "--gamma", "positions": "--positions",
         "routers": "--routers", "steps": "--steps", "batch": "--batch", "learning rate": "--lr",
         "warm-up steps": "--warmup", "evaluate every": "--eval-every",
         "evaluation batches": "--eval-batches", "dtype": "--dtype", "CUDA graphs": "--cuda-graphs",
         "device": "--device"}


def shell_command(s, data: str, threads: int) -> str:
    """The `python -m engine train` line that runs TrainSettings `s` on `data` (pydoc, stdlib, or
    a file's name) with `threads` intra-op threads: only the flags that differ from the defaults.
    The thread count is part of the run: reductions split over threads round differently."""
    from engine.train_loop import TrainSettings

    default = TrainSettings()
    words = [f"OMP_NUM_THREADS={threads}", "python -m engine train"]
    if s.routers != default.routers:
        words.append("--routers " + ",".join(s.routers))
    if s.seeds != (0,):
        words.append("--seeds " + ",".join(map(str, s.seeds)))
    if data != "pydoc":
        words.append(f"--data {data}")
    for flag, (field, _) in FIELDS.items():
        if getattr(s, field) != getattr(default, field):
            words.append(f"--{flag} {getattr(s, field)}")
    if s.cuda_graphs:
        words.append("--cuda-graphs")
    return " ".join(words)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Routers, seeds, data and every TrainSettings field."""
    parser.add_argument("--routers", default=None,
                        help="comma-separated: hash, balanced_hash, topk, switch, expert_choice, "
                             "deepseek, dense, dense_total (default: all but dense_total)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--data", default="pydoc",
                        help="pydoc (default), stdlib, or the path of a UTF-8 .txt file (<= 5 MB)")
    for flag, (field, typ) in FIELDS.items():
        parser.add_argument(f"--{flag}", type=typ, default=None, help=f"TrainSettings.{field}")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each training step from a CUDA graph (CUDA devices)")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> CommandResult:
    """Train every router (progress on stderr); the summary and per-evaluation histories."""
    from engine.cost_model import relabel

    try:
        return _run(args)
    except ValueError as exc:  # in the flags' words
        raise ValueError(relabel(str(exc), NAMES)) from None


def settings_of(args: argparse.Namespace):
    """(TrainSettings, the file's text or None for a built-in text) from the parsed flags."""
    from engine.train_data import TEXTS, decode_upload
    from engine.train_loop import TrainSettings

    kw = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _) in FIELDS.items()}
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.routers is not None:
        kw["routers"] = tuple(r.strip() for r in args.routers.split(",") if r.strip())
    kw["seeds"] = _ints("seeds", args.seeds)
    kw["cuda_graphs"] = args.cuda_graphs
    if args.data in TEXTS:
        kw["data"], text = args.data, None
    else:
        path = Path(args.data)
        if not path.is_file():
            raise ValueError(f"--data must be pydoc, stdlib or an existing .txt file, got {args.data!r}")
        if path.stat().st_size > 5 * 2**20:
            raise ValueError(f"--data {args.data} is over the 5 MB limit")
        kw["data"], text = path.name, decode_upload(path.read_bytes(), f"--data {args.data}")
    return TrainSettings(**kw), text


def _run(args: argparse.Namespace) -> CommandResult:
    import pandas as pd

    from engine.attention_estimate import format_seconds
    from engine.train_data import builtin_text, tokenize
    from engine.train_loop import estimate_seconds, train
    from engine.train_metrics import history_table

    s, text = settings_of(args)
    corpus = tokenize(builtin_text(s.data) if text is None else text, s.tokenizer, s.vocab)
    total, step = estimate_seconds(s, corpus)
    runs = len(s.routers) * len(s.seeds)
    print(f"estimated {format_seconds(total)}: {runs} run{'s' if runs > 1 else ''} of {s.steps:,} steps at "
          f"{1e3 * step:.1f} ms a step (timed now)", file=sys.stderr, flush=True)

    def progress(frac: float, msg: str, _runs: list) -> None:
        print(f"[{100 * frac:5.1f}%] {msg}", file=sys.stderr, flush=True)

    doc = train(s, corpus, progress).as_dict()
    return CommandResult({"summary": pd.DataFrame(doc["summary"]), "history": history_table(doc["runs"])},
                         {k: doc[k] for k in ("runs", "summary_text", "settings", "corpus",
                                              "environment", "date")})
