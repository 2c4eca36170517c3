"""A dense feed-forward block against its MoE version around HashRouter, timed (the seed's script).

    python scripts/moe_vs_dense.py --d-model 512 --experts 8 --k 2 --tokens 16384

The dense block has width k x d_ff so both do the same FLOPs per token (matched active FLOPs).
Prints the analytic FLOP ratio and the measured forward and forward+backward time ratio, from
engine.moe_block.time_blocks (the same function the cost page and the benchmark use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.attention_estimate import format_seconds  # noqa: E402
from engine.validation import relabel  # noqa: E402
from engine.moe_block import BlockBenchSettings, estimate_seconds, time_blocks  # noqa: E402

# BlockBenchSettings' field names in the engine's messages -> the flags typed here.
FLAGS = {"d_model": "--d-model", "d_ff": "--d-ff", "num_experts": "--experts", "top_k": "--k",
         "tokens": "--tokens", "reps": "--reps", "seed": "--seed", "ffn": "--ffn"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=None, help="expert hidden width (default 4 x d_model)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2, help="experts per token, 1 or 2 for HashRouter")
    p.add_argument("--ffn", choices=("gelu", "swiglu"), default="gelu")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        d_ff = 4 * args.d_model if args.d_ff is None else args.d_ff
        s = BlockBenchSettings(args.d_model, d_ff, args.experts, args.k,
                               args.ffn, args.tokens, ("hash",), reps=args.reps, seed=args.seed)
        print(f"timing 2 blocks over {s.warmup + s.reps} rounds ({s.warmup} warm-up) on the CPU: "
              f"about {format_seconds(estimate_seconds(s))} (scaled from a timed probe)",
              file=sys.stderr, flush=True)
        dense, moe = time_blocks(s, lambda f, msg: print(f"  [{f:4.0%}] {msg}", file=sys.stderr,
                                                         flush=True))
    except ValueError as exc:
        print(f"error: {relabel(str(exc), FLAGS)}", file=sys.stderr)
        return 2
    for r in (dense, moe):
        print(f"{r.block:10s} d_ff {r.d_ff:>7d}  forward GFLOP {r.forward_gflop:.6g}  "
              f"forward {r.forward_ms:9.2f} ms  fwd+bwd {r.fwd_bwd_ms:9.2f} ms  "
              f"{r.tokens_per_s:10.0f} tokens/s")
    print(f"FLOP ratio (MoE / dense, analytic): {moe.flop_ratio:.6f}")
    print(f"forward time ratio: {moe.forward_ms / dense.forward_ms:.3f}")
    print(f"fwd+bwd time ratio: {moe.time_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
