"""`python -m engine route`: the routing lab's metrics table, as the page shows it."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult
    from engine.routing_lab import LabSettings

HELP = "route generated tokens through MoE routers and print load-balance metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The lab's settings as flags; unset flags take the page's defaults (LabSettings).

    Ranges are checked by the engine (one source of limits) and named in its error messages."""
    a = parser.add_argument
    a("--preset", help="named settings, e.g. DeepSeek-V3 (256 experts, 8 groups, top-4 groups, "
                       "k 8, scale 2.5); flags given explicitly override it")
    a("--workload", help="token ids or hidden states, e.g. zipf, uniform (a wrong name lists all)")
    a("--tokens", type=int, help="number of tokens T (with learned routers T x E is limited by "
                                 "memory)")
    a("--vocab", type=int, help="vocabulary size V (id workloads)")
    a("--zipf-s", type=float, help="Zipf exponent s")
    a("--d-model", type=int, help="hidden size D")
    a("--clusters", type=int, help="clusters (clustered workload)")
    a("--experts", type=int, help="experts E")
    a("--k", type=int, help="experts per token k (hash routers: at most 2)")
    a("--capacity-factor", type=float, help="capacity factor C; capacity ceil(C k T / E)")
    a("--ranks", type=int, help="expert-parallel ranks R (1 to E)")
    a("--routers", help="comma-separated router names, e.g. hash,topk (a wrong name lists all)")
    a("--ds-steps", type=int, help="DeepSeek-V3 bias update steps")
    a("--ds-speed", "--gamma", type=float,
      help="DeepSeek-V3 bias update speed (--gamma, as `train` names it, is the same)")
    a("--ds-groups", type=int, help="DeepSeek-V3 expert groups (1: no group limit)")
    a("--ds-topk-groups", type=int, help="DeepSeek-V3 groups each token may use")
    a("--ds-scale", type=float, help="DeepSeek-V3 routed scaling factor")
    a("--gshard-renormalize", action="store_true", default=None,
      help="GShard: renormalise a token's surviving weight to 1 after a drop (DeepSpeed, "
           "fairseq) instead of keeping g/(g1+g2) (GShard's Algorithm 1)")
    a("--seed", type=int, help="seed of the generated tokens and the routers' weights")
    a("--counts", action="store_true", help="also print tokens per expert for every router")


def settings_from_args(args: argparse.Namespace) -> LabSettings:
    """LabSettings from parsed flags: the preset (if any), then the flags given (run_lab validates)."""
    from engine.routing_lab import PRESETS, LabSettings
    from engine.validation import check_choice

    base: dict[str, object] = {}
    if args.preset is not None:
        base = dict(PRESETS[check_choice("--preset", args.preset, tuple(PRESETS))])
    routers = None
    if args.routers is not None:  # names are checked by run_lab, under the flags' names
        routers = tuple(r.strip() for r in args.routers.split(",") if r.strip())
    given = dict(
        workload=args.workload, num_tokens=args.tokens, vocab_size=args.vocab,
        zipf_s=args.zipf_s, d_model=args.d_model, clusters=args.clusters,
        num_experts=args.experts, top_k=args.k, capacity_factor=args.capacity_factor,
        num_ranks=args.ranks, routers=routers,
        deepseek_steps=args.ds_steps, bias_update_speed=args.ds_speed, seed=args.seed,
        n_groups=args.ds_groups, topk_groups=args.ds_topk_groups, route_scale=args.ds_scale,
        gshard_renormalize=args.gshard_renormalize,
    )
    return LabSettings(**{**base, **{k: v for k, v in given.items() if v is not None}})


def run(args: argparse.Namespace) -> CommandResult:
    """Run the lab and return its metrics (and optionally counts) as tables."""
    from engine.cli import CommandResult
    from engine.routing_lab import CLI_FLAGS, run_lab, settings_dict

    settings = settings_from_args(args)
    result = run_lab(settings, labels=CLI_FLAGS)
    tables = {"metrics": result.metrics, "per-rank load": result.ranks}
    if not result.balance.empty:
        tables["DeepSeek-V3 balance over steps"] = result.balance
    if args.counts or args.json:
        tables["tokens per expert"] = result.counts
    # The notes the page shows under its metrics (e.g. what GShard's capacity did), in text too.
    text = {"notes": "\n".join(result.notes)} if result.notes else {}
    return CommandResult(tables, {"settings": settings_dict(settings), "notes": list(result.notes)}, text)
