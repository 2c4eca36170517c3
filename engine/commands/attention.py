"""`python -m engine attention`: the attention page's sweep (or a committed result) as tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult

HELP = "time FA3, FA2 and every SDPA backend over a preset or custom attention sweep"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Preset, shape overrides, backends, timing, and --save / --load of result documents."""
    parser.add_argument("--preset", default="quick",
                        help="starting settings: quick (default, seconds on a CPU) or fa3-paper "
                             "(16k tokens, hidden 2048, D 64/128/256)")
    parser.add_argument("--seqlens", type=_ints, help="e.g. 512,1024,2048")
    parser.add_argument("--head-dims", type=_ints, help="e.g. 64,128")
    parser.add_argument("--causal", type=_causal, help="on, off or both")
    parser.add_argument("--gqa", type=_ints, help="query heads per kv head, e.g. 1,4,8")
    parser.add_argument("--dtypes", type=_strs, help="comma-separated, e.g. bf16,fp16,fp32")
    parser.add_argument("--tokens", type=int, help="tokens per batch (batch = tokens // seqlen)")
    parser.add_argument("--hidden", type=int, help="hidden size (heads = hidden // head dim)")
    parser.add_argument("--backends", type=_strs, help="comma-separated, e.g. fa3,sdpa-flash,sdpa-math (a wrong name lists all)")
    parser.add_argument("--mode", help="fwd (forward only) or fwd+bwd")
    parser.add_argument("--reps", type=int, help="timed repetitions per row")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    parser.add_argument("--save", type=Path, help="also write the result document (JSON) here")
    parser.add_argument("--load", type=Path, help="show a saved result document instead of running")


def run(args: argparse.Namespace) -> CommandResult:
    """Run the sweep (or load one) and return its rows, FA3 speed-ups and environment."""
    from engine.attention_bench import MODES, PRESETS, load_result, run_sweep, settings_for
    from engine.cli import CommandResult
    from engine.validation import check_choice

    if args.load is not None:
        if not args.load.is_file():
            raise ValueError(f"--load must name an existing result file, got {args.load}")
        result = load_result(args.load)
    else:
        check_choice("--preset", args.preset, tuple(PRESETS))
        if args.mode is not None:
            check_choice("--mode", args.mode, MODES)
        settings = settings_for(args.preset, seqlens=args.seqlens, head_dims=args.head_dims, causal=args.causal,
                                gqa=args.gqa, dtypes=args.dtypes, tokens=args.tokens, hidden=args.hidden,
                                backends=args.backends, mode=args.mode, reps=args.reps, device=args.device)
        result = run_sweep(settings)
        if args.save is not None:
            args.save.write_text(result.to_json())
    rows = result.table.drop(columns=["p10_ms", "p90_ms"])
    data = {"env": result.env, "created": result.created, "matmul_tflops": result.matmul_tflops,
            "elapsed_s": result.elapsed_s, "settings": result.settings}
    return CommandResult({"attention rows": rows, "FA3 speed-up over the best SDPA backend": result.speedups()},
                         data)
