"""`python -m engine cost`: parameters, FLOPs, memory per GPU and time to train of a preset;
--time runs the FFN blocks. Defaults are the cost page's."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult

HELP = ("MoE against dense: parameters, FLOPs per token with 6ND, memory per GPU, time to train, "
        "measured block time")

# Config fields settable from the command line (flag -> TransformerConfig field).
FIELDS = {"d-model": ("d_model", int), "layers": ("n_layers", int), "heads": ("n_heads", int),
          "kv-heads": ("n_kv_heads", int), "d-ff": ("d_ff", int), "vocab": ("vocab", int),
          "seq-len": ("seq_len", int), "ffn": ("ffn", str), "experts": ("num_experts", int),
          "k": ("top_k", int), "shared": ("shared_experts", int), "moe-every": ("moe_every", int),
          "router": ("router", str)}
# Layout fields (flag -> TrainLayout field); the engine's messages are relabelled with the flags.
LAYOUT = {"precision": "precision", "optimizer": "optimizer", "zero": "zero", "gpus": "gpus",
          "ep": "ep", "micro-batch": "micro_batch", "attention": "attention",
          "capacity-factor": "capacity_factor"}
NAMES = {**{field: f"--{flag}" for flag, (field, _) in FIELDS.items()},
         **{field: f"--{flag}" for flag, field in LAYOUT.items()},
         "tied_embeddings": "--tied", "checkpointing": "--checkpointing", "MFU": "--mfu",
         "price per GPU-hour": "--price", "GPUs": "--gpus", "tokens": "--kv-tokens"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Preset, field overrides, training tokens, layout, GPU, and the optional block timing.

    Nothing here imports the engine (`--help` stays fast): flags left out take the page's
    defaults in run, where names and ranges are checked (a wrong name lists the choices)."""
    parser.add_argument("--preset", default="Mixtral 8x7B",
                        help='a model preset, e.g. "Mixtral 8x7B" (default), "Llama-2-7B"')
    for flag, (field, typ) in FIELDS.items():
        parser.add_argument(f"--{flag}", type=typ, default=None, help=f"override {field}")
    parser.add_argument("--tied", choices=("yes", "no"), default=None, help="tied embeddings")
    parser.add_argument("--tokens", type=float, help="D, training tokens (default: the page's, 1e12)")
    parser.add_argument("--full-attention-flops", action="store_true",
                        help="count the full S^2 attention terms (default: halved, causal)")
    mem = parser.add_argument_group("memory per GPU and time to train")
    mem.add_argument("--precision", help="e.g. mixed (bf16 with fp32 master weights), bf16, fp32")
    mem.add_argument("--optimizer", help="adam or sgd")
    mem.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default: the page's, 1)")
    mem.add_argument("--gpus", type=int, help="data-parallel GPUs")
    mem.add_argument("--ep", type=int, help="expert-parallel ranks, divides --gpus (default: the "
                                           "page's for MoE, 1 for dense)")
    mem.add_argument("--micro-batch", type=int, help="sequences per GPU")
    mem.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="full activation checkpointing (default: the page's, on)")
    mem.add_argument("--attention", help="flash (no S^2 scores) or math")
    mem.add_argument("--capacity-factor", type=float,
                     help="expert slots per routed token, sizing the MoE activations (1: dropless)")
    mem.add_argument("--kv-tokens", type=int, default=None,
                     help="add the inference KV cache of --micro-batch sequences of this length")
    mem.add_argument("--gpu", help='GPU preset, e.g. "H200 141 GB" (default), "H100 80 GB"')
    mem.add_argument("--mfu", type=float, help="model FLOPs utilisation, (0, 1]")
    mem.add_argument("--price", type=float, help="price per GPU-hour")
    parser.add_argument("--time", action="store_true",
                        help="also time the dense and MoE FFN blocks at --bench-d-model (CPU)")
    parser.add_argument("--bench-tokens", type=int, default=4096, help="tokens for --time")
    parser.add_argument("--bench-d-model", type=int, default=512, help="d_model for --time")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds for --time")


def run(args: argparse.Namespace) -> CommandResult:
    """The cost page's tables for the chosen config."""
    import pandas as pd

    from engine.cli import CommandResult
    from engine.cost_memory import TrainLayout
    from engine.cost_model import PRESETS, preset_config
    from engine.cost_report import DEFAULTS, fit_text, mfu_text, report, time_text
    from engine.cost_time import GPUS
    from engine.validation import check_choice, check_float

    check_choice("--preset", args.preset, tuple(PRESETS))
    gpu = check_choice("--gpu", DEFAULTS["gpu"] if args.gpu is None else args.gpu, tuple(GPUS))
    tokens = check_float("--tokens", DEFAULTS["tokens"] if args.tokens is None else args.tokens,
                         0.0, lo_open=True)
    mfu = DEFAULTS["mfu"] if args.mfu is None else args.mfu
    price = DEFAULTS["price"] if args.price is None else args.price
    overrides = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _) in FIELDS.items()}
    if args.tied is not None:
        overrides["tied_embeddings"] = args.tied == "yes"
    cfg = preset_config(args.preset, **overrides)
    given = {field: getattr(args, flag.replace("-", "_")) for flag, field in LAYOUT.items()}
    fields = {k: v for k, v in given.items() if v is not None}
    for key in ("gpus", "zero"):
        fields.setdefault(key, DEFAULTS[key])
    if "ep" not in fields:  # the page's default for MoE; a dense model has no experts to place
        fields["ep"] = DEFAULTS["ep"] if cfg.is_moe else 1
    ckpt = DEFAULTS["checkpointing"] if args.checkpointing is None else args.checkpointing
    layout = TrainLayout(**fields, checkpointing=ckpt)
    rep = report(cfg, layout, tokens, GPUS[gpu], mfu, price,
                 causal=not args.full_attention_flops, kv_tokens=args.kv_tokens)
    tables = {k: v for k, v in rep.items() if isinstance(v, pd.DataFrame)}
    if args.time:
        from engine.moe_block import BlockBenchSettings, time_blocks

        s = BlockBenchSettings.from_config(cfg, args.bench_d_model, args.bench_tokens, args.reps)
        tables["block timing"] = pd.DataFrame([dataclasses.asdict(r) for r in time_blocks(s)])
    data = {k: v for k, v in rep.items() if not isinstance(v, pd.DataFrame)}
    # The page's sentences under its "Will it fit?" heading; --mfu is its typed MFU.
    verdict = (f"{fit_text(rep['memory_per_gpu'])}\n"
               f"{time_text(rep['time_to_train'], gpu, mfu_text(mfu))}")
    return CommandResult(tables, {"config": dataclasses.asdict(cfg), "layout": dataclasses.asdict(layout),
                                  "gpu": gpu, **data}, {"Will it fit?": verdict})
