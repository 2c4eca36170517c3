"""The memory and step-time model against real training steps: predicted beside measured, one JSON.

    python benchmarks/bench_cost_memory.py --size tiny                     # CPU, seconds
    python benchmarks/bench_cost_memory.py --size gpu --device cuda --out benchmarks/results/X.json

Each configuration trains engine.moe_block.TinyTransformer (AdamW, persistent gradients, fp32
loss) for a warm-up and a timed window, then records peak memory and the median step time. Step
times are predicted from the first configuration's (its MFU carried over by hardware FLOPs);
memory from the model alone. Every configuration is reported, misses included.
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

from engine.cost_measure import block_key, compare_runs, extra_ms, measure_step  # noqa: E402
from engine.cost_memory import TrainLayout  # noqa: E402
from engine.cost_model import TransformerConfig  # noqa: E402
from engine.env_info import environment  # noqa: E402
from engine.moe_block import BlockBenchSettings, time_blocks  # noqa: E402

# name -> (config changes, layout changes, sequences per step), over the base sizes below.
RUNS = {
    "dense S2k": ({}, {}, 1.0),
    "dense S4k": ({"seq_len": 2}, {}, 0.5),
    "dense S4k ckpt": ({"seq_len": 2}, {"checkpointing": True}, 0.5),
    "MoE E8 k2 S2k": ({"num_experts": 8, "top_k": 2}, {}, 1.0),
    "MoE E8 k2 S4k ckpt": ({"num_experts": 8, "top_k": 2, "seq_len": 2}, {"checkpointing": True}, 0.5),
    "dense S1k math attention": ({"seq_len": 0.5}, {"attention": "math"}, 1.0),
    "dense S2k fp32": ({}, {"precision": "fp32"}, 0.5),
}
SIZES = {  # base config and micro-batch
    "gpu": (TransformerConfig(1024, 8, 16, 16, 2816, 32000, 2048, "swiglu"), 8),
    "tiny": (TransformerConfig(64, 2, 4, 4, 176, 512, 64, "swiglu"), 2),
}


def build(size: str) -> list[tuple[str, TransformerConfig, TrainLayout]]:
    """The configurations of RUNS at `size`."""
    base, batch = SIZES[size]
    out = []
    for name, (cfg_changes, layout_changes, batch_scale) in RUNS.items():
        changes = {k: (round(base.seq_len * v) if k == "seq_len" else v) for k, v in cfg_changes.items()}
        layout = TrainLayout(**{"precision": "bf16", **layout_changes},
                             micro_batch=max(1, round(batch * batch_scale)))
        out.append((name, base.replace(**changes), layout))
    return out


def moe_block_extra(configs: list[tuple[str, TransformerConfig, TrainLayout]], device: str
                    ) -> dict[str, dict[str, float]]:
    """Per MoE shape: the MoE FFN block's (forward, forward+backward) ms and its dense
    counterpart's FFN block (width d_ff, as in the calibration model), timed side by side."""
    out: dict[str, dict[str, float]] = {}
    for _, cfg, layout in configs:
        key = block_key(cfg, layout)
        if not cfg.is_moe or key in out:
            continue
        common = dict(d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=cfg.num_experts, ffn=cfg.ffn,
                      tokens=layout.micro_batch * cfg.seq_len, routers=(cfg.router,),
                      dtype=layout.precision.replace("fp32", "float32"), device=device,
                      warmup=5, reps=20)
        _, moe = time_blocks(BlockBenchSettings(top_k=cfg.top_k, **common))
        dense, _ = time_blocks(BlockBenchSettings(top_k=1, **common))  # dense width 1 x d_ff
        out[key] = {"moe_forward_ms": moe.forward_ms, "moe_fwd_bwd_ms": moe.fwd_bwd_ms,
                    "dense_forward_ms": dense.forward_ms, "dense_fwd_bwd_ms": dense.fwd_bwd_ms}
        print(f"MoE block {key}: {out[key]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up per configuration, seconds")
    p.add_argument("--time-s", type=float, default=2.0, help="timed window per configuration")
    p.add_argument("--only", default=None, help="comma-separated run names")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = p.parse_args(argv)
    env = {**environment(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    runs = []
    for name, cfg, layout in build(args.size):
        if args.only and name not in args.only.split(","):
            continue
        run = {"name": name, "config": dataclasses.asdict(cfg), "layout": dataclasses.asdict(layout)}
        t0 = time.perf_counter()
        try:
            run["measured"] = dataclasses.asdict(measure_step(cfg, layout, args.device, args.warmup_s,
                                                              args.time_s))
        except (ValueError, RuntimeError) as exc:  # out of memory included: report, go on
            run["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"{name}: {time.perf_counter() - t0:.1f} s {run.get('measured', run.get('error'))}",
              flush=True)
        runs.append(run)
    blocks = moe_block_extra(build(args.size), args.device)
    rows = compare_runs(runs, runs[0]["name"], extra_ms(blocks))
    doc = {"environment": env, "size": args.size, "calibration": runs[0]["name"], "runs": runs,
           "moe_blocks": blocks,
           "settings": {"warmup_s": args.warmup_s, "time_s": args.time_s, "optimizer": "AdamW",
                        "loss": "fp32 cross-entropy", "gradients": "persistent (zeroed in place)"}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.out}")
    print(f"\n{env['device']}, torch {env['torch']}")
    for r in rows:
        mem = r.get("memory error %")
        tim = r.get("time error %")
        print(f"{r['run']:28s} peak {r.get('measured peak bytes', 0) / 1e9:7.3f} GB "
              f"(pred {r.get('predicted peak bytes', 0) / 1e9:7.3f}, "
              f"{'n/a' if mem is None else f'{mem:+.1f}%'})  step {r.get('measured step ms') or 0:8.2f} ms "
              f"(pred {r.get('predicted step ms') or 0:8.2f}, {'n/a' if tim is None else f'{tim:+.1f}%'})"
              f"  {r['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
