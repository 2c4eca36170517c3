"""`python -m engine cost`: parameters, FLOPs and MoE/dense ratios of a preset; --time runs the blocks."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult

HELP = "MoE against dense: parameters by component, FLOPs per token with 6ND, measured block time"

# Config fields settable from the command line (flag -> TransformerConfig field).
FIELDS = {"d-model": ("d_model", int), "layers": ("n_layers", int), "heads": ("n_heads", int),
          "kv-heads": ("n_kv_heads", int), "d-ff": ("d_ff", int), "vocab": ("vocab", int),
          "seq-len": ("seq_len", int), "ffn": ("ffn", str), "experts": ("num_experts", int),
          "k": ("top_k", int), "shared": ("shared_experts", int), "moe-every": ("moe_every", int),
          "router": ("router", str)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Preset, field overrides, training tokens and the optional block timing."""
    parser.add_argument("--preset", default="Mixtral 8x7B",
                        help='a model preset, e.g. "Mixtral 8x7B" (default), "Llama-2-7B" '
                             "(a wrong name lists all)")
    for flag, (field, typ) in FIELDS.items():
        parser.add_argument(f"--{flag}", type=typ, default=None, help=f"override {field}")
    parser.add_argument("--tied", choices=("yes", "no"), default=None, help="tied embeddings")
    parser.add_argument("--tokens", type=float, default=1.0, help="D, training tokens (default 1)")
    parser.add_argument("--time", action="store_true",
                        help="also time the dense and MoE FFN blocks at --bench-d-model (CPU)")
    parser.add_argument("--bench-tokens", type=int, default=4096, help="tokens for --time")
    parser.add_argument("--bench-d-model", type=int, default=512, help="d_model for --time")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds for --time")


def run(args: argparse.Namespace) -> CommandResult:
    """The cost page's tables for the chosen config."""
    import pandas as pd

    from engine.cli import CommandResult
    from engine.cost_model import (PRESETS, compare, estimate, flops_table, params_table,
                                   preset_config, summary)
    from engine.validation import check_choice

    check_choice("--preset", args.preset, tuple(PRESETS))
    overrides = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _) in FIELDS.items()}
    if args.tied is not None:
        overrides["tied_embeddings"] = args.tied == "yes"
    cfg = preset_config(args.preset, **overrides)
    est = estimate(cfg)
    tables = {"parameters": params_table(est), "FLOPs": flops_table(est, args.tokens)}
    if cfg.is_moe:
        tables["MoE / dense"] = compare(cfg, args.tokens)
    if args.time:
        from engine.moe_block import BlockBenchSettings, time_blocks

        s = BlockBenchSettings.from_config(cfg, args.bench_d_model, args.bench_tokens, args.reps)
        tables["block timing"] = pd.DataFrame([dataclasses.asdict(r) for r in time_blocks(s)])
    return CommandResult(tables, {"config": dataclasses.asdict(cfg), "summary": summary(est)})
