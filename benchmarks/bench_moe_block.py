"""Dense FFN against MoE blocks (hash and learned top-k) at matched active FLOPs, timed side by side.

    python benchmarks/bench_moe_block.py                                    # CPU: d 512, E 8, k 2, 16k tokens
    python benchmarks/bench_moe_block.py --device cuda --dtype bf16 --d-model 2048 --tokens 65536 \
        --out benchmarks/results/h100_moe_block

Prints the cost model's latency per preset, then a table whose last column is each block's
forward+backward time over the dense block's, measured in the same run (target <= 1.5).
With --out, writes result.json and result.md there (device, date, library versions).
Needs torch; pandas only for the cost-model latency section (skipped without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.env_info import environment  # noqa: E402
from engine.moe_block import BlockBenchSettings, time_blocks  # noqa: E402

COLUMNS = (("block", "{}"), ("d_ff", "{}"), ("forward_gflop", "{:.3g}"), ("flop_ratio", "{:.3f}"),
           ("forward_ms", "{:.2f}"), ("fwd_bwd_ms", "{:.2f}"), ("tokens_per_s", "{:.0f}"),
           ("saved_activations_mib", "{:.0f}"), ("peak_mib", "{:.0f}"), ("time_ratio", "{:.3f}"))


def cost_model_latency(calls: int = 20) -> dict[str, float]:
    """Median ms per preset of what the cost page recomputes on every change (estimate + tables)."""
    try:
        from engine.cost_model import PRESETS, compare, estimate, flops_table, params_table
        compare(PRESETS["Mixtral 8x7B"])  # import pandas outside the timed calls
    except ImportError as exc:
        print(f"cost model latency skipped: {exc}")
        return {}
    out = {}
    for name, cfg in PRESETS.items():
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            est = estimate(cfg)
            params_table(est), flops_table(est)
            if cfg.is_moe:
                compare(cfg)
            samples.append((time.perf_counter() - t0) * 1e3)
        out[name] = sorted(samples)[calls // 2]
    return out


def markdown(rows: list[dict], env: dict, settings: dict, latency: dict) -> str:
    """The result as a markdown document."""
    lines = [f"# MoE block vs dense, {env['date']}", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f.format(r[c]) for c, f in COLUMNS) + " |" for r in rows]
    if latency:
        lines += ["", "Cost model, median ms per preset: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in latency.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bf16", "float16"))
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=None, help="expert hidden width (default 4 x d_model)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--ffn", default="gelu", choices=("gelu", "swiglu"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--routers", default="hash,learned", help="comma-separated: hash, learned")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for result.json and result.md")
    args = p.parse_args(argv)
    s = BlockBenchSettings(args.d_model, args.d_ff or 4 * args.d_model, args.experts, args.k, args.ffn,
                           args.tokens, tuple(args.routers.split(",")), args.dtype, args.device,
                           args.warmup, args.reps, args.seed)
    env = {**environment(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    latency = cost_model_latency()
    for name, ms in latency.items():
        print(f"cost model {name}: {ms:.2f} ms (target < 10 ms)")
    def progress(fraction: float, message: str) -> None:
        print(f"  [{fraction:4.0%}] {message}", flush=True)

    rows = [dataclasses.asdict(r) for r in time_blocks(s, progress)]
    settings = dataclasses.asdict(s)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"environment": env, "settings": settings, "rows": rows, "cost_model_ms": latency}
        (args.out / "result.json").write_text(json.dumps(doc, indent=2, default=str))
        (args.out / "result.md").write_text(markdown(rows, env, settings, latency))
        print(f"wrote {args.out / 'result.json'} and result.md")
    print(f"\n{env['device']}, torch {env['torch']}, {s.dtype}, d_model {s.d_model}, expert d_ff {s.d_ff}, "
          f"E {s.num_experts}, k {s.top_k}, {s.tokens} tokens, {s.reps} reps")
    print("  ".join(f"{c:>12}" for c, _ in COLUMNS))
    for r in rows:
        print("  ".join(f"{f.format(r[c]):>12}" for c, f in COLUMNS))
    print("time_ratio = fwd+bwd time / dense fwd+bwd time, same run (target <= 1.5)")


if __name__ == "__main__":
    main()
