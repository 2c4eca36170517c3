"""`python -m engine dispatch`: expert placement what-if, `--launch N` for a real gloo dispatch,
or `--train-check` for training with the experts on 2 processes against one process."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.cli import CommandResult
    from engine.expert_parallel import EPSettings

HELP = "expert parallelism: per-rank load and all-to-all bytes of a placement, or a measured dispatch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Settings of EPSettings (unset flags keep its defaults), a custom --map, and --launch N.

    Defaults and limits are stated from engine.ep_fields (stdlib only: `--help` stays fast)."""
    from engine.ep_fields import (K_RANGE, MAX_D_MODEL, MAX_EXPERTS, MAX_RANKS, MAX_SEED,
                                  MAX_TOKENS, MAX_TOP_K, MAX_ZIPF, ROUTERS, EPFields)

    d = EPFields()
    by_router = "; ".join(f"{r} {lo}" if lo == hi else f"{r} {lo} or {hi}"
                          for r, (lo, hi) in K_RANGE.items())
    p.add_argument("--experts", type=int, help=f"experts E, 1 to {MAX_EXPERTS} (default {d.experts})")
    p.add_argument("--ranks", type=int,
                   help=f"ranks R of the what-if, 1 to {MAX_RANKS} and at most E (default {d.ranks})")
    p.add_argument("--top-k", type=int, help=f"experts per token k, 1 to {MAX_TOP_K} and at most E; "
                                             f"{by_router} (default {d.top_k})")
    p.add_argument("--tokens", type=int, help=f"tokens per rank, 1 to {MAX_TOKENS} (default {d.tokens})")
    p.add_argument("--d-model", type=int,
                   help=f"hidden size of a token's payload, 1 to {MAX_D_MODEL} (default {d.d_model})")
    p.add_argument("--dtype", help=f"payload dtype: fp32, bf16 or fp16 (default {d.dtype})")
    p.add_argument("--placement", help=f"contiguous, round_robin or greedy (default {d.placement})")
    p.add_argument("--replicas", type=int, help=f"extra slots for hot experts (greedy only), 0 to "
                                                f"E x (R - 1) (default {d.replicas})")
    p.add_argument("--router", help=f"{', '.join(ROUTERS)} (default {d.router})")
    p.add_argument("--zipf", type=float, help=f"token skew: Zipf exponent of the token ids, 0 "
                                              f"(uniform) to {MAX_ZIPF:g} (default {d.zipf:g})")
    p.add_argument("--hot-share", type=float,
                   help=f"share of tokens whose first expert is forced to expert 0, 0 to 1 "
                        f"(default {d.hot_share:g})")
    p.add_argument("--seed", type=int, help=f"seed of the token draws, 0 to {MAX_SEED} (default {d.seed})")
    p.add_argument("--map", default="",
                   help="custom placement 'ids;ids;...' (one group per rank, e.g. '0-3;4-7')")
    p.add_argument("--launch", type=int, metavar="N",
                   help="run the real dispatch on N local processes (torchrun, gloo) instead")
    p.add_argument("--chunks", type=int, default=1,
                   help="micro-batches pipelined in --launch (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of --launch (default %(default)s)")
    p.add_argument("--train-check", action="store_true",
                   help="train a small MoE model with its experts on 2 local processes (gloo) "
                        "beside the single-process model: losses and gradients per step")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="wall-time limit of --launch or --train-check, s (default %(default)g)")


def _settings(args: argparse.Namespace, ranks: int | None) -> EPSettings:
    from engine.expert_parallel import DTYPES, PLACEMENTS, ROUTERS, EPSettings
    from engine.validation import check_choice

    for flag, value, allowed in (("--dtype", args.dtype, tuple(DTYPES)),
                                 ("--placement", args.placement, PLACEMENTS),
                                 ("--router", args.router, ROUTERS)):
        if value is not None:
            check_choice(flag, value, allowed)
    given = dict(experts=args.experts, ranks=ranks, top_k=args.top_k, tokens=args.tokens,
                 d_model=args.d_model, dtype=args.dtype, placement=args.placement,
                 replicas=args.replicas, router=args.router, zipf=args.zipf,
                 hot_share=args.hot_share, seed=args.seed)
    return EPSettings(**{k: v for k, v in given.items() if v is not None})


# The page's labels, which the settings' checks use -> the flags typed here.
NAMES = {"Experts E": "--experts", "Ranks R": "--ranks", "Experts per token k": "--top-k",
         "Tokens per rank": "--tokens", "d_model": "--d-model", "Payload dtype": "--dtype",
         "Placement": "--placement", "Replicas of hot experts": "--replicas", "Router": "--router",
         "Zipf exponent s": "--zipf", "Hot expert share": "--hot-share", "Seed": "--seed"}


def run(args: argparse.Namespace) -> CommandResult:
    """The what-if tables, the measured per-rank and summary tables of a launch, or the
    training check's steps."""
    import pandas as pd

    from engine.cli import CommandResult
    from engine.ep_dispatch import launch
    from engine.expert_parallel import ep_stats, parse_placement, rank_table

    if args.train_check:
        from engine.ep_training import launch_check

        doc = launch_check(2, steps=3, timeout_s=args.timeout)
        steps = pd.DataFrame([r for rank in doc["per_rank"] for r in rank["rows"]])
        keys = ("backend", "world", "device", "date", "torch", "max_loss_abs_err",
                "max_grad_abs_err", "max_grad_abs")
        return CommandResult({"expert-parallel training against one process, per step": steps},
                             {k: doc[k] for k in keys})
    if args.launch is not None:
        doc = launch(_settings(args, args.launch), args.launch, reps=args.reps,
                     timeout_s=args.timeout, placement_map=args.map, chunks=args.chunks)
        per_rank = pd.DataFrame(doc["per_rank"]).drop(columns=["pairs_sent"])
        env = {k: doc[k] for k in ("backend", "world", "device", "date", "torch")}
        return CommandResult({"measured per rank": per_rank,
                              "slowest rank (ratio = plain all_to_all time / phase time)":
                                  pd.DataFrame(doc["summary"])}, {"environment": env})
    settings = _settings(args, args.ranks)
    placement = parse_placement(args.map, settings.experts) if args.map else None
    if placement is not None:
        settings = dataclasses.replace(settings, ranks=placement.num_ranks)
    ranks = settings.ranks
    stats = ep_stats(settings, placement)
    # As the page's heatmap: off-rank MB only, same-rank cells "–" (their sum is the summary's).
    traffic = pd.DataFrame(stats.off_rank_mb(), dtype=float)
    traffic.insert(0, "src \\ dst", range(ranks))
    summary = pd.DataFrame([{"placement": stats.placement.name, "balancedness": stats.balancedness,
                             "leave_share": stats.leave_share, "max_load": max(stats.load),
                             "dispatch_off_rank_MB": stats.off_rank_bytes() / 1e6}])
    return CommandResult({"per rank": rank_table(stats), "off-rank dispatch MB (combine = transpose)": traffic,
                          "summary": summary}, {"placement": [list(s) for s in stats.placement.slots]})
