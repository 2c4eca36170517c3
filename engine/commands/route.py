"""`python -m engine route`: the routing lab's metrics table from a shell (same run_lab as the page)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from engine.cli import CommandResult
from engine.routing_lab import (CLI_FLAGS, LIMITS, PRESETS, ROUTERS, LabSettings, run_lab,
                                settings_dict)
from engine.workloads import KINDS

HELP = "route generated tokens through MoE routers and print load-balance metrics"
_D = LabSettings()


def _range(name: str) -> str:
    lo, hi = LIMITS[name]
    return f"{lo:,} to {hi:,}" if isinstance(lo, int) else f"{lo:g} to {hi:g}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The lab's settings as flags; defaults are the page's defaults."""
    a = parser.add_argument
    a("--preset", choices=tuple(PRESETS), default=None,
      help="named settings, e.g. DeepSeek-V3 (256 experts, 8 groups, top-4 groups, k 8, scale "
           "2.5); flags given explicitly are overridden")
    a("--workload", choices=KINDS, default=_D.workload, help="token ids or hidden states")
    a("--tokens", type=int, default=_D.num_tokens,
      help=f"number of tokens T ({_range('num_tokens')}; with learned routers T x E is limited "
           "by memory)")
    a("--vocab", type=int, default=_D.vocab_size,
      help=f"vocabulary size V, id workloads ({_range('vocab_size')})")
    a("--zipf-s", type=float, default=_D.zipf_s, help=f"Zipf exponent s ({_range('zipf_s')})")
    a("--d-model", type=int, default=_D.d_model, help=f"hidden size D ({_range('d_model')})")
    a("--clusters", type=int, default=_D.clusters, help="clusters (clustered workload)")
    a("--experts", type=int, default=_D.num_experts,
      help=f"number of experts E ({_range('num_experts')})")
    a("--k", type=int, default=_D.top_k,
      help=f"experts per token ({_range('top_k')}; hash routers use at most 2)")
    a("--capacity-factor", type=float, default=_D.capacity_factor,
      help=f"capacity factor C ({_range('capacity_factor')}); capacity ceil(C k T / E)")
    a("--ranks", type=int, default=_D.num_ranks, help="expert-parallel ranks R (1 to E)")
    a("--routers", default=",".join(_D.routers),
      help=f"comma-separated, from: {', '.join(ROUTERS)}")
    a("--ds-steps", type=int, default=_D.deepseek_steps, help="DeepSeek-V3 bias update steps")
    a("--ds-speed", type=float, default=_D.bias_update_speed, help="DeepSeek-V3 bias update speed")
    a("--ds-groups", type=int, default=_D.n_groups,
      help="DeepSeek-V3 expert groups (1: no group limit)")
    a("--ds-topk-groups", type=int, default=_D.topk_groups,
      help="DeepSeek-V3 groups each token may use")
    a("--ds-scale", type=float, default=_D.route_scale, help="DeepSeek-V3 routed scaling factor")
    a("--gshard-renormalize", action="store_true",
      help="GShard: renormalise a token's surviving weight to 1 after a drop (DeepSpeed, "
           "fairseq) instead of keeping g/(g1+g2) (GShard's Algorithm 1)")
    a("--seed", type=int, default=_D.seed)
    a("--counts", action="store_true", help="also print tokens per expert for every router")


def settings_from_args(args: argparse.Namespace) -> LabSettings:
    """LabSettings from parsed flags (validated by run_lab)."""
    s = LabSettings(
        workload=args.workload, num_tokens=args.tokens, vocab_size=args.vocab,
        zipf_s=args.zipf_s, d_model=args.d_model, clusters=args.clusters,
        num_experts=args.experts, top_k=args.k, capacity_factor=args.capacity_factor,
        num_ranks=args.ranks, routers=tuple(r.strip() for r in args.routers.split(",") if r.strip()),
        deepseek_steps=args.ds_steps, bias_update_speed=args.ds_speed, seed=args.seed,
        n_groups=args.ds_groups, topk_groups=args.ds_topk_groups, route_scale=args.ds_scale,
        gshard_renormalize=args.gshard_renormalize,
    )
    return replace(s, **PRESETS[args.preset]) if args.preset else s


def run(args: argparse.Namespace) -> CommandResult:
    """Run the lab and return its metrics (and optionally counts) as tables."""
    settings = settings_from_args(args)
    result = run_lab(settings, labels=CLI_FLAGS)
    tables = {"metrics": result.metrics, "per-rank load": result.ranks}
    if not result.balance.empty:
        tables["DeepSeek-V3 balance over steps"] = result.balance
    if args.counts or args.json:
        tables["tokens per expert"] = result.counts
    return CommandResult(tables, {"settings": settings_dict(settings), "notes": list(result.notes)})
