"""`python -m engine attention`: the attention page's sweep (or a committed result) as tables."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult

HELP = "time FA4, FA3, FA2, every SDPA backend and FlexAttention over a preset or custom attention sweep"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _causal(text: str) -> tuple[bool, ...]:
    names = {"on": (True,), "off": (False,), "both": (False, True)}
    if text not in names:
        raise argparse.ArgumentTypeError("causal must be on, off or both")
    return names[text]


def _model(text: str) -> tuple[int, ...]:
    v = _ints(text)
    if len(v) != 6:
        raise argparse.ArgumentTypeError(f"--model takes B,S,H,HKV,D,LAYERS (6 integers), got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Preset, shape overrides, backends, timing, time limits, and --save / --load of result documents.

    Nothing here imports the engine (`--help` stays fast): names are checked in run()."""
    parser.add_argument("--preset", default="quick",
                        help="starting settings (quick: seconds on a CPU; fa3-paper: 16k tokens, hidden 2048, D 64/128/256; "
                             "fa3-paper-train: the same forward+backward; masks: windows, documents, softcap)")
    parser.add_argument("--seqlens", type=_ints, help="e.g. 512,1024,2048")
    parser.add_argument("--head-dims", type=_ints, help="e.g. 64,128")
    parser.add_argument("--causal", type=_causal, help="on, off or both")
    parser.add_argument("--masks", type=_strs, help="causal, window-1k, window-4k, window-<w>, documents, softcap")
    parser.add_argument("--gqa", type=_ints, help="query heads per kv head, e.g. 1,4,8")
    parser.add_argument("--dtypes", type=_strs, help="comma-separated, e.g. bf16,fp16,fp32")
    parser.add_argument("--tokens", type=int, help="tokens per batch (batch = tokens // seqlen)")
    parser.add_argument("--hidden", type=int, help="hidden size (heads = hidden // head dim)")
    parser.add_argument("--backends", type=_strs, help="comma-separated, e.g. fa4,fa3,sdpa-cudnn,sdpa-math "
                                                                 "(a wrong name lists all)")
    parser.add_argument("--mode", help="forward only (fwd) or forward and backward (fwd+bwd)")
    parser.add_argument("--rep-ms", type=float, help="timed window per row in ms (default 100, as do_bench)")
    parser.add_argument("--windows", type=int, help="timed windows per row, their median reported (default 3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    parser.add_argument("--model", type=_model, metavar="B,S,H,HKV,D,LAYERS",
                        help="time this model's attention forward+backward and print the training-step view "
                             "(with --load: read it off the loaded forward+backward rows)")
    parser.add_argument("--max-seconds", type=float,
                        help="on a CPU, refuse runs estimated longer than this (default 120)")
    parser.add_argument("--reduce", action="store_true",
                        help="on a CPU, shrink a run estimated over --max-seconds until it fits, instead of refusing")
    parser.add_argument("--save", type=Path, help="also write the result document (JSON) here")
    parser.add_argument("--load", type=Path, help="show a saved result document instead of running")


# The settings' names as checks report them -> the flags that set them (errors name what was typed).
NAMES = {"seqlen": "--seqlens", "head_dim": "--head-dims", "gqa": "--gqa", "tokens": "--tokens",
          "hidden": "--hidden", "backend": "--backends", "backends": "--backends", "dtype": "--dtypes",
          "mode": "--mode", "rep_ms": "--rep-ms", "windows": "--windows", "mask": "--masks",
          "preset": "--preset"}


def _progress(estimate: float, format_seconds):
    """Print one line per row to stderr: rows done, elapsed, and time left by the estimate."""
    start = time.perf_counter()

    def show(done: int, total: int, label: str) -> None:
        spent = time.perf_counter() - start
        left = max(0.0, estimate - spent)
        print(f"[{done}/{total}] {spent:4.0f} s, about {format_seconds(left)} left: {label}", file=sys.stderr,
              flush=True)

    return show


def _settings(args: argparse.Namespace, model):
    from engine.attention_shapes import PRESETS, settings_for
    from engine.attention_train import model_sweep_fields
    from engine.validation import check_choice

    if model is not None:
        base = settings_for("fa3-paper-train", **model_sweep_fields(model))
        return replace(base, device=args.device or base.device,
                       backends=args.backends or ("fa4", "fa3", "sdpa", "sdpa-flash", "sdpa-efficient",
                                                  "sdpa-cudnn", "sdpa-math"))
    check_choice("preset", args.preset, tuple(sorted(PRESETS)))
    return settings_for(args.preset, seqlens=args.seqlens, head_dims=args.head_dims, causal=args.causal,
                        masks=args.masks, gqa=args.gqa, dtypes=args.dtypes, tokens=args.tokens, hidden=args.hidden,
                        backends=args.backends, mode=args.mode, rep_ms=args.rep_ms, windows=args.windows,
                        device=args.device)


def run(args: argparse.Namespace) -> CommandResult:
    """Run the sweep (or load one) and return its rows, speed-ups, and the training-step view."""
    from engine.attention_bench import load_result, resolve_device, run_sweep
    from engine.attention_estimate import CPU_LIMIT_S, format_seconds, plan_run
    from engine.attention_train import ModelShape, training_view
    from engine.cli import CommandResult

    model = None if args.model is None else ModelShape(*args.model)
    max_seconds = CPU_LIMIT_S if args.max_seconds is None else args.max_seconds
    if args.load is not None:
        if not args.load.is_file():
            raise ValueError(f"--load must name an existing result file, got {args.load}")
        result = load_result(args.load)
    else:
        settings = _settings(args, model)
        device = resolve_device(settings.device)
        plan = plan_run(settings, device, max_seconds)
        estimate = plan.estimate_s
        if plan.too_long:
            if not args.reduce:
                raise ValueError(f"this run would take about {format_seconds(estimate)} on this CPU (estimated from "
                                 f"its shapes), over --max-seconds {max_seconds:g}: add --reduce to run it "
                                 f"at a size that fits, use --preset quick, or run it on a GPU")
            settings, estimate = plan.reduced, plan.reduced_s
            print(f"reduced to tokens {settings.tokens}, seqlens {list(settings.seqlens)}, hidden {settings.hidden} "
                  "to fit --max-seconds", file=sys.stderr)
        print(f"estimated {format_seconds(estimate)} on {device.type}", file=sys.stderr, flush=True)
        result = run_sweep(settings, progress=_progress(estimate, format_seconds))
        if args.save is not None:
            args.save.write_text(result.to_json())
    rows = result.table.drop(columns=["p10_ms", "p90_ms"])
    data = {"env": result.env, "created": result.created, "matmul_tflops": result.matmul_tflops,
            "elapsed_s": result.elapsed_s, "settings": result.settings}
    tables = {"attention rows": rows}
    for kernel in ("fa4", "fa3"):
        tables[f"{kernel.upper()} speed-up over the best SDPA backend"] = result.speedups(kernel)
    if args.model is not None:
        tables["training step (attention, forward+backward)"] = training_view(result.table, model)
    return CommandResult(tables, data)
