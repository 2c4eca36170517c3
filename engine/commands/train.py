"""`python -m engine train`: train a small MoE language model once per router and compare them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import CommandResult

HELP = "train a small MoE language model per router (same init, batches, optimiser) and compare"

# flag -> (TrainSettings field, type, help); defaults come from TrainSettings.
FIELDS = {"steps": ("steps", int, "training steps per run"),
          "experts": ("experts", int, "experts E per MoE layer"),
          "k": ("k", int, "experts per token k (hash routers: 1 or 2; switch is always top-1)"),
          "layers": ("layers", int, "transformer layers"),
          "d-model": ("d_model", int, "hidden size d_model"),
          "heads": ("heads", int, "attention heads; divide d_model into an even head size"),
          "d-expert": ("d_expert", int, "hidden width of one expert's FFN"),
          "moe-every": ("moe_every", int, "an MoE FFN in every n-th layer, dense FFNs between"),
          "batch": ("batch", int, "sequences per batch"),
          "seq-len": ("seq_len", int, "tokens per sequence"),
          "lr": ("lr", float, "peak learning rate (AdamW): linear warm-up to it, cosine decay to 10%%"),
          "warmup": ("warmup", int, "learning-rate warm-up steps (capped at --steps)"),
          "eval-every": ("eval_every", int, "evaluate on held-out batches every this many steps"),
          "eval-batches": ("eval_batches", int, "held-out batches per evaluation"),
          "alpha": ("alpha", float, "aux (load-balancing) loss weight alpha"),
          "capacity": ("capacity", float, "capacity factor C (switch, expert_choice)"),
          "gamma": ("gamma", float, "DeepSeek-V3 bias update speed: each expert's selection bias "
                                    "moves by +-gamma a step"),
          "vocab": ("vocab", int, "BPE vocabulary (the byte tokenizer has 256)"),
          "tokenizer": ("tokenizer", str, "bpe or byte"),
          "positions": ("positions", str, "rope or learned position embeddings"),
          "device": ("device", str, "cpu or cuda[:N]"),
          "dtype": ("dtype", str, "float32, or bf16 autocast")}


# Other names of a flag: those another command gives the same setting (`route --ds-speed`).
ALIASES = {"gamma": ("--ds-speed",)}

# The names the engine's messages use (the page's labels) -> the flags typed here.
NAMES = {"vocabulary": "--vocab", "d_model": "--d-model", "layers": "--layers", "heads": "--heads",
         "sequence length": "--seq-len", "expert width": "--d-expert", "Experts E": "--experts",
         "Experts per token k": "--k", "MoE every n-th layer": "--moe-every", "alpha": "--alpha",
         "capacity factor": "--capacity", "DeepSeek-V3 bias update speed": "--gamma",
         "positions": "--positions", "routers": "--routers", "steps": "--steps", "batch": "--batch",
         "learning rate": "--lr",
         "warm-up steps": "--warmup", "evaluate every": "--eval-every",
         "evaluation batches": "--eval-batches", "dtype": "--dtype", "CUDA graphs": "--cuda-graphs",
         "device": "--device"}


def shell_command(s, data: str, threads: int) -> str:
    """The `python -m engine train` line that runs TrainSettings `s` on `data` (pydoc, stdlib, or
    a file's name) with `threads` intra-op threads: only the flags that differ from the defaults.
    The thread count is part of the run: reductions split over threads round differently."""
    from engine.train_fields import TrainFields

    default = TrainFields()
    words = [f"OMP_NUM_THREADS={threads}", "python -m engine train"]
    if s.routers != default.routers:
        words.append("--routers " + ",".join(s.routers))
    if s.seeds != default.seeds:
        words.append("--seeds " + ",".join(map(str, s.seeds)))
    if data != "pydoc":
        words.append(f"--data {data}")
    for flag, (field, _, _) in FIELDS.items():
        if getattr(s, field) != getattr(default, field):
            words.append(f"--{flag} {getattr(s, field)}")
    if s.cuda_graphs:
        words.append("--cuda-graphs")
    return " ".join(words)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Routers, seeds, data and every TrainSettings field, with the training page's defaults and
    ranges (engine.train_fields: stdlib only, so --help imports no torch)."""
    from engine.train_fields import BPE_VOCAB, DEFAULT_ROUTERS, LIMITS, ROUTERS, TrainFields

    d, ranges = TrainFields(), {**LIMITS, "vocab": BPE_VOCAB}
    left_out = ", ".join(r for r in ROUTERS if r not in DEFAULT_ROUTERS)
    parser.add_argument("--routers", default=None,
                        help=f"comma-separated: {', '.join(ROUTERS)} (default: all but {left_out})")
    lo, hi = LIMITS["seeds"]
    parser.add_argument("--seeds", default="0", help=f"comma-separated seeds, {lo} to {hi} of them "
                                                     "(default 0)")
    parser.add_argument("--data", default="pydoc",
                        help="pydoc (default), stdlib, or the path of a UTF-8 .txt file (<= 5 MB)")
    parser.epilog = "A value out of range is refused, naming the flag and its range."
    for flag, (field, typ, text) in FIELDS.items():
        if field in ranges:
            lo, hi = ranges[field]
            text += f", {lo:g} to {hi:g}"
        parser.add_argument(f"--{flag}", *ALIASES.get(flag, ()), type=typ, default=None,
                            help=f"{text} (default {getattr(d, field)})")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each training step from a CUDA graph (CUDA devices)")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {text!r}") from None


def settings_of(args: argparse.Namespace):
    """(TrainSettings, the file's text or None for a built-in text) from the parsed flags."""
    from engine.train_data import TEXTS, decode_upload
    from engine.train_loop import TrainSettings

    kw = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _, _) in FIELDS.items()}
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


def run(args: argparse.Namespace) -> CommandResult:
    """Train every router (progress on stderr); the summary and per-evaluation histories."""
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
