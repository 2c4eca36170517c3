"""Attention lab on a GPU: FA3 correctness, the FA3-paper sweep, timer cross-check, wrapper overhead.

Run from the repo root:  python benchmarks/bench_attention.py --out DIR   (--smoke: tiny CPU dry run)

Writes DIR/attention_sweep_<tag>.json (the sweep, loadable by the page and `--load`) and
DIR/attention_checks_<tag>.json (everything else), and prints a short table last. Ratios are
measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import flash_attention3 as fa  # noqa: E402
from engine.attention_bench import (PRESETS, SweepSettings, attention_flops, run_sweep,  # noqa: E402
                                    settings_for)
from engine.env_info import environment  # noqa: E402
from engine.timing import alternating, time_fn  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    return float(torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref))


def reference_bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """fp32 SDPA-math on (B, H, S, D) inputs, kv heads repeated for GQA."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(g, dim=1) for x in (k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, is_causal=causal)


def correctness(dev: torch.device, smoke: bool) -> list[dict]:
    """attention() against an fp32 math reference: both layouts, GQA, causal, head dims, fallbacks."""
    cases = [  # (B, S, Hq, Hkv, D, causal, dtype, layout)
        (2, 1024, 16, 16, 128, False, torch.bfloat16, "bshd"),
        (2, 1024, 16, 16, 128, True, torch.bfloat16, "bshd"),
        (2, 1024, 16, 16, 128, True, torch.bfloat16, "bhsd"),
        (2, 1024, 16, 4, 128, True, torch.bfloat16, "bshd"),
        (1, 2048, 32, 32, 64, False, torch.bfloat16, "bshd"),
        (1, 2048, 8, 8, 256, True, torch.bfloat16, "bshd"),
        (1, 4096, 16, 2, 128, False, torch.bfloat16, "bhsd"),
        (2, 1024, 16, 16, 128, False, torch.float16, "bshd"),  # fa3-fwd: no fp16 -> SDPA
        (2, 1024, 8, 8, 512, False, torch.bfloat16, "bshd"),  # head dim > 256 -> SDPA
    ]
    if smoke:
        cases = [(1, 128, 4, c[3] * 4 // c[2], 64, c[5], torch.float32, c[7]) for c in cases[:4]]
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for b, s, hq, hkv, d, causal, dt, layout in cases:
        shp = (lambda h: (b, s, h, d)) if layout == "bshd" else (lambda h: (b, h, s, d))
        q, k, v = (torch.randn(*shp(h), generator=gen, device=dev, dtype=dt) for h in (hq, hkv, hkv))
        out, path = fa.attention_with_path(q, k, v, causal=causal, layout=layout)
        to_bhsd = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
        ref = reference_bhsd(to_bhsd(q), to_bhsd(k), to_bhsd(v), causal)
        err = rel_err(to_bhsd(out), ref)
        rows.append({"B": b, "S": s, "Hq": hq, "Hkv": hkv, "D": d, "causal": causal,
                     "dtype": str(dt).removeprefix("torch."), "layout": layout, "path": path.backend,
                     "reason": path.reason, "rel_err": err, "pass": bool(err < 1e-2 and math.isfinite(err))})
    return rows


def _inputs(dev: torch.device, b: int, s: int, h: int, d: int, dt: torch.dtype):
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(b, s, h, d, generator=gen, device=dev, dtype=dt) for _ in range(3))
    return q, k, v, *(x.transpose(1, 2).contiguous() for x in (q, k, v))


def _ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b))


def timer_crosscheck(dev: torch.device) -> list[dict]:
    """engine.timing.time_fn against triton.testing.do_bench (median) on the same FA3 and cuDNN calls."""
    from triton.testing import do_bench

    b, s, h, d = 1, 16384, 16, 128  # FA3 paper: 16k tokens, hidden 2048, head dim 128, non-causal
    q, k, v, qt, kt, vt = _inputs(dev, b, s, h, d, torch.bfloat16)
    flops = attention_flops(b, h, s, s, d, causal=False)

    def cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return fa.sdpa_call(qt, kt, vt)

    calls = {"sdpa-cudnn": cudnn}
    if fa._HAS_FLASH3:
        calls = {"fa3": lambda: fa.fa3_call(q, k, v), **calls}
    rows = []
    with torch.no_grad():
        for name, fn in calls.items():
            harness, triton_ms = alternating(lambda: time_fn(fn, dev, warmup=10, reps=50).median_ms,
                                             lambda: do_bench(fn, warmup=25, rep=150, return_mode="median"), 9)
            h_ms, t_ms = statistics.median(harness), statistics.median(triton_ms)
            rows.append({"backend": name, "harness_ms": h_ms, "do_bench_ms": t_ms,
                         "harness_tflops": flops / h_ms / 1e9, "do_bench_tflops": flops / t_ms / 1e9,
                         "diff_pct": 100 * (_ratio(harness, triton_ms) - 1),
                         "rounds_ms": {"harness": harness, "do_bench": triton_ms}})
    return rows


def wrapper_overhead(dev: torch.device) -> list[dict]:
    """attention() against fa3_call on the same inputs in paired rounds; event-timed and back-to-back."""
    rows = []
    for s in (2048, 4096, 8192, 16384):
        for causal in (False, True):
            b, h, d = 16384 // s, 16, 128
            q, k, v = _inputs(dev, b, s, h, d, torch.bfloat16)[:3]
            direct = lambda: fa.fa3_call(q, k, v, causal)  # noqa: E731
            wrapped = lambda: fa.attention(q, k, v, causal)  # noqa: E731
            with torch.no_grad():
                ev_w, ev_d = alternating(lambda: time_fn(wrapped, dev, warmup=3, reps=20).median_ms,
                                         lambda: time_fn(direct, dev, warmup=3, reps=20).median_ms, 11)
                bb_w, bb_d = alternating(lambda: _back_to_back_ms(wrapped, 20), lambda: _back_to_back_ms(direct, 20), 11)
            rows.append({"S": s, "causal": causal, "direct_ms": statistics.median(ev_d),
                         "wrapper_ms": statistics.median(ev_w), "overhead_pct": 100 * (_ratio(ev_w, ev_d) - 1),
                         "b2b_direct_ms": statistics.median(bb_d), "b2b_wrapper_ms": statistics.median(bb_w),
                         "b2b_overhead_pct": 100 * (_ratio(bb_w, bb_d) - 1)})
    return rows


def _back_to_back_ms(fn, n: int) -> float:
    """Mean ms per call of n calls issued back to back (host dispatch included if it is the bottleneck)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def oom_capture(dev: torch.device) -> list[dict]:
    """Cap this process at 4 GiB so SDPA-math's 8 GiB of scores runs out of memory in one row only."""
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / total, index)
    try:
        s = SweepSettings(seqlens=(8192,), head_dims=(128,), backends=("sdpa-math", "sdpa-flash"),
                          tokens=16384, reps=3)
        table = run_sweep(s).table
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    return table[["backend", "status", "ms", "note"]].to_dict(orient="records")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = environment()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    env["fa3_provider"] = f"{fa.PROVIDER.module} {fa.PROVIDER.version}" if fa._HAS_FLASH3 else fa.PROVIDER.reason
    print(json.dumps(env, indent=1), flush=True)
    checks: dict = {"env": env, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    checks["correctness"] = correctness(dev, args.smoke)
    print("correctness:", *[f"{r['layout']} D={r['D']} Hq/Hkv={r['Hq']}/{r['Hkv']} causal={r['causal']} "
                            f"{r['dtype']}: {r['path']} err={r['rel_err']:.2e} ({r['reason']})"
                            for r in checks["correctness"]], sep="\n  ", flush=True)

    paper = settings_for("quick") if args.smoke else PRESETS["fa3-paper"]
    t0 = time.perf_counter()
    sweep = run_sweep(paper, progress=None)
    checks["paper_sweep_wall_s"] = time.perf_counter() - t0
    (args.out / f"attention_sweep_{args.tag}.json").write_text(sweep.to_json())
    print(f"paper sweep: {checks['paper_sweep_wall_s']:.1f} s wall, matmul ceiling "
          f"{sweep.matmul_tflops} TFLOP/s", flush=True)

    if dev.type == "cuda":
        extra = SweepSettings(seqlens=(4096,), causal=(False, True), gqa=(1, 4),
                              backends=("fa3", "wrapper", "sdpa-flash", "sdpa-cudnn", "flex"))
        bwd = SweepSettings(seqlens=(4096,), causal=(True,), mode="fwd+bwd",
                            backends=("fa3", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"))
        sections = {"flex_gqa": lambda: run_sweep(extra).table.to_dict(orient="records"),
                    "fwd_bwd": lambda: run_sweep(bwd).table.to_dict(orient="records"),
                    "timer_crosscheck": lambda: timer_crosscheck(dev),
                    "wrapper_overhead": lambda: wrapper_overhead(dev) if fa._HAS_FLASH3 else [],
                    "oom_capture": lambda: oom_capture(dev)}
        for key, section in sections.items():
            try:  # one failing section must not lose the others' results
                checks[key] = section()
            except Exception as exc:  # noqa: BLE001
                checks[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"{key} failed: {checks[f'{key}_error']}", flush=True)
    (args.out / f"attention_checks_{args.tag}.json").write_text(json.dumps(checks, indent=1, default=str))

    t = sweep.table
    ok = t[t["status"] == "ok"]
    piv = ok.pivot_table(index=["head_dim", "causal", "seqlen"], columns="backend", values="tflops")
    print("\nTFLOP/s (forward):\n" + piv.round(0).to_string())
    print("\nFA3 speed-up over best SDPA:\n" + sweep.speedups()[["head_dim", "causal", "seqlen", "best_sdpa",
                                                                 "speedup"]].round(2).to_string(index=False))
    for key in ("flex_gqa", "fwd_bwd"):
        for r in checks.get(key, []):
            print(f"{key}: gqa {r['heads']}/{r['kv_heads']} causal={r['causal']} {r['backend']}: {r['status']} "
                  f"{r['tflops']:.0f} TFLOP/s err={r['rel_err']:.1e} {r['note'][:60]}")
    for r in checks.get("oom_capture", []):
        print(f"oom capture: {r['backend']}: {r['status']} {r['note'][:80]}")
    for r in checks.get("wrapper_overhead", []):
        print(f"wrapper S={r['S']} causal={r['causal']}: events {r['direct_ms']:.3f} vs {r['wrapper_ms']:.3f} ms "
              f"({r['overhead_pct']:+.2f}% median paired), back-to-back {r['b2b_overhead_pct']:+.2f}%")
    for r in checks.get("timer_crosscheck", []):
        print(f"timer {r['backend']}: harness {r['harness_ms']:.3f} ms ({r['harness_tflops']:.0f} TFLOP/s) vs "
              f"do_bench {r['do_bench_ms']:.3f} ms ({r['do_bench_tflops']:.0f} TFLOP/s): {r['diff_pct']:+.2f}% (paired)")
    print(f"correctness: {sum(r['pass'] for r in checks['correctness'])}/{len(checks['correctness'])} pass; "
          f"paper sweep {checks['paper_sweep_wall_s']:.1f} s")


if __name__ == "__main__":
    main()
