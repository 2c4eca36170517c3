"""`python -m engine route`: the routing lab's metrics table from a shell (same run_lab as the page)."""

from __future__ import annotations

import argparse

from engine.cli import CommandResult
from engine.routing_lab import ROUTERS, LabSettings, run_lab, settings_dict
from engine.workloads import KINDS

HELP = "route generated tokens through MoE routers and print load-balance metrics"
_D = LabSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The lab's settings as flags; defaults are the page's defaults."""
    a = parser.add_argument
    a("--workload", choices=KINDS, default=_D.workload, help="token ids or hidden states")
    a("--tokens", type=int, default=_D.num_tokens, help="number of tokens T (1000..4194304)")
    a("--vocab", type=int, default=_D.vocab_size, help="vocabulary size V (id workloads)")
    a("--zipf-s", type=float, default=_D.zipf_s, help="Zipf exponent s")
    a("--d-model", type=int, default=_D.d_model, help="hidden size D")
    a("--clusters", type=int, default=_D.clusters, help="clusters (clustered workload)")
    a("--experts", type=int, default=_D.num_experts, help="number of experts E")
    a("--k", type=int, default=_D.top_k, help="experts per token (hash routers: at most 2)")
    a("--capacity-factor", type=float, default=_D.capacity_factor, help="capacity factor C")
    a("--ranks", type=int, default=_D.num_ranks, help="expert-parallel ranks R")
    a("--routers", default=",".join(_D.routers),
      help=f"comma-separated, from: {', '.join(ROUTERS)}")
    a("--ds-steps", type=int, default=_D.deepseek_steps, help="DeepSeek-V3 bias update steps")
    a("--ds-speed", type=float, default=_D.bias_update_speed, help="DeepSeek-V3 bias update speed")
    a("--seed", type=int, default=_D.seed)
    a("--counts", action="store_true", help="also print tokens per expert for every router")


def settings_from_args(args: argparse.Namespace) -> LabSettings:
    """LabSettings from parsed flags (validated by run_lab)."""
    return LabSettings(
        workload=args.workload, num_tokens=args.tokens, vocab_size=args.vocab,
        zipf_s=args.zipf_s, d_model=args.d_model, clusters=args.clusters,
        num_experts=args.experts, top_k=args.k, capacity_factor=args.capacity_factor,
        num_ranks=args.ranks, routers=tuple(r.strip() for r in args.routers.split(",") if r.strip()),
        deepseek_steps=args.ds_steps, bias_update_speed=args.ds_speed, seed=args.seed,
    )


def run(args: argparse.Namespace) -> CommandResult:
    """Run the lab and return its metrics (and optionally counts) as tables."""
    settings = settings_from_args(args)
    result = run_lab(settings)
    tables = {"metrics": result.metrics, "per-rank load": result.ranks}
    if not result.balance.empty:
        tables["DeepSeek-V3 balance over steps"] = result.balance
    if args.counts or args.json:
        tables["tokens per expert"] = result.counts
    return CommandResult(tables, {"settings": settings_dict(settings), "notes": list(result.notes)})
