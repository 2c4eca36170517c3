"""Parameters and training FLOPs of a transformer with and without its MoE layers (the seed's script).

    python scripts/benchmark_moe.py --preset "Mixtral 8x7B"
    python scripts/benchmark_moe.py --d-model 1024 --layers 12 --experts 16 --k 2

"Without" is the same model with a dense FFN of the same d_ff in place of every MoE layer (no
experts, no router). Prints the parameter growth (MoE / dense total parameters) and the FLOP ratio
(MoE / dense training FLOPs per token), from engine.cost_model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cost_model import PRESETS, dense_counterpart, estimate, human, preset_config  # noqa: E402
from engine.validation import relabel  # noqa: E402
from engine.validation import check_float, check_int  # noqa: E402

# The config's field names in the engine's messages -> the flags typed here.
FLAGS = {"d_model": "--d-model", "n_layers": "--layers", "n_heads": "--heads", "n_kv_heads": "--kv-heads",
         "d_ff": "--d-ff", "num_experts": "--experts", "top_k": "--k", "router": "--router"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="Mixtral 8x7B", choices=tuple(PRESETS))
    p.add_argument("--d-model", type=int, help="override d_model")
    p.add_argument("--layers", type=int, help="override n_layers")
    p.add_argument("--heads", type=int, help="override n_heads")
    p.add_argument("--kv-heads", type=int, help="override n_kv_heads")
    p.add_argument("--d-ff", type=int, help="override d_ff (per expert)")
    p.add_argument("--experts", type=int, help="override num_experts (>= 1 here)")
    p.add_argument("--k", type=int, help="override top_k")
    p.add_argument("--router", choices=("learned", "hash"), help="override router")
    p.add_argument("--tokens", type=float, default=1e12, help="D, training tokens (default 1e12)")
    args = p.parse_args(argv)
    try:
        check_float("--tokens", args.tokens, 0.0, lo_open=True)
        if args.experts is not None:  # 0 would be the dense model, which this script builds itself
            check_int("--experts", args.experts, 1)
        moe_cfg = preset_config(args.preset, d_model=args.d_model, n_layers=args.layers,
                                n_heads=args.heads, n_kv_heads=args.kv_heads, d_ff=args.d_ff,
                                num_experts=args.experts, top_k=args.k, router=args.router)
        moe, dense = estimate(moe_cfg), estimate(dense_counterpart(moe_cfg, "same_ff"))
    except ValueError as exc:
        print(f"error: {relabel(str(exc), FLAGS)}", file=sys.stderr)
        return 2
    for label, est in (("with MoE", moe), ("without MoE", dense)):
        print(f"{label:12s} total params {est.total_params:>16,d} ({human(est.total_params)})  "
              f"active {est.active_params:>16,d}  training FLOPs/token {est.train_flops:>16,d}  "
              f"for D={args.tokens:g}: {est.train_flops * args.tokens:.4e}")
    print(f"parameter growth: {moe.total_params / dense.total_params:.6f}")
    print(f"active parameter growth: {moe.active_params / dense.active_params:.6f}")
    print(f"FLOP ratio: {moe.train_flops / dense.train_flops:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
