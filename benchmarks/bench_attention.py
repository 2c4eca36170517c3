"""Attention lab on a GPU: correctness, the FA3-paper sweeps (forward, forward+backward), masks,
FA4 compile time and wrapper overhead, each sweep row cross-checked against triton's do_bench.

Run from the repo root, one section per process so one failure or hang loses only itself:
    python benchmarks/bench_attention.py --section paper-train --out DIR --tag h200_2026-12-03
Sections: correctness, paper-fwd, paper-train, masks, fa4-extras, fa4-overhead (--smoke: tiny CPU
dry run of a sweep).

Sweep sections write DIR/attention_sweep_<tag>_<section>.json (loadable by the page and
`python -m engine attention --load`); the others DIR/attention_<section>_<tag>.json. Every
timed row runs at steady clocks (engine.timing.steady_time, warmed up until the SM clock stops
falling) and is cross-checked by `do_bench` with its defaults (25 ms warm-up, 100 ms of
repetitions, median) on the same callable in this process, `--rounds` windows of each in ABBA
order (default 4): `vs_do_bench_pct` compares their medians,
`window_range_pct` is the larger of the two timers' own window-to-window ranges. A short table
is printed last, with every row outside 3%.
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
from engine.attention_bench import run_sweep, settings_for, sweep_environment  # noqa: E402
from engine.timing import alternating, steady_time  # noqa: E402

SWEEPS = {"paper-fwd": "fa3-paper", "paper-train": "fa3-paper-train", "masks": "masks"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    out, ref = out.detach().double(), ref.detach()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def reference_bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """fp64 softmax(q k^T / sqrt(D)) v on (B, H, S, D), kv heads repeated for GQA, top-left causal."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return torch.softmax(s, -1) @ v


def correctness(dev: torch.device, smoke: bool) -> list[dict]:
    """attention() forward and, with grads, backward against fp64 for each path and `prefer`."""
    cases = [  # (B, S, Hq, Hkv, D, causal, dtype, layout, grad, prefer)
        (2, 1024, 16, 16, 128, True, torch.bfloat16, "bshd", True, "auto"),
        (2, 1024, 16, 4, 128, True, torch.bfloat16, "bhsd", True, "auto"),
        (1, 2048, 8, 8, 256, False, torch.bfloat16, "bshd", True, "auto"),
        (1, 2048, 32, 32, 64, True, torch.float16, "bshd", True, "auto"),
        (2, 1024, 16, 16, 128, True, torch.bfloat16, "bshd", False, "auto"),  # forward only: FA3 first
        (2, 1024, 16, 16, 128, True, torch.bfloat16, "bshd", False, "fa4"),
        (2, 1024, 16, 16, 128, True, torch.bfloat16, "bshd", True, "fa3"),  # fa3-fwd has no bwd -> FA4
        (2, 512, 8, 8, 264, False, torch.bfloat16, "bshd", True, "fa4"),  # head dim > 256 -> SDPA
        (2, 512, 8, 8, 64, False, torch.float32, "bshd", True, "fa4"),  # fp32 -> SDPA
    ]
    if smoke:
        cases = [(1, 64, 4, 2, 16, True, torch.float32, "bshd", True, "fa4"), (1, 64, 4, 4, 16, False,
                                                                               torch.float32, "bhsd", False, "auto")]
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for b, s, hq, hkv, d, causal, dt, layout, grad, prefer in cases:
        shp = (lambda h: (b, s, h, d)) if layout == "bshd" else (lambda h: (b, h, s, d))
        q, k, v = (torch.randn(*shp(h), generator=gen, device=dev, dtype=dt).requires_grad_(grad)
                   for h in (hq, hkv, hkv))
        row = {"B": b, "S": s, "Hq": hq, "Hkv": hkv, "D": d, "causal": causal, "layout": layout, "grad": grad,
               "dtype": str(dt).removeprefix("torch."), "prefer": prefer}
        try:
            out, path = fa.attention_with_path(q, k, v, causal=causal, layout=layout, prefer=prefer)
            to_bhsd = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
            qr, kr, vr = (to_bhsd(x).detach().requires_grad_(grad) for x in (q, k, v))
            ref = reference_bhsd(qr, kr, vr, causal)
            row.update(path=path.backend, reason=path.reason, out_err=rel_err(to_bhsd(out), ref))
            if grad:
                dout = torch.randn_like(out)
                got = torch.autograd.grad(out, (q, k, v), dout)
                want = torch.autograd.grad(ref, (qr, kr, vr), to_bhsd(dout).double())
                row.update({f"d{n}_err": rel_err(to_bhsd(g), w) for n, g, w in zip("qkv", got, want)})
            errs = [row[c] for c in ("out_err", "dq_err", "dk_err", "dv_err") if c in row]
            row["pass"] = all(math.isfinite(e) and e < 2e-2 for e in errs)
        except Exception as exc:  # noqa: BLE001 - one case's failure is a row
            row.update(path="error", reason=f"{type(exc).__name__}: {exc}"[:300], **{"pass": False})
        rows.append(row)
        print(f"  {layout} D={d} {hq}/{hkv} causal={causal} {row['dtype']} grad={grad} prefer={prefer}: "
              f"{row['path']} out {row.get('out_err', math.nan):.1e} dq {row.get('dq_err', math.nan):.1e} "
              f"pass={row['pass']} ({row['reason'][:90]})", flush=True)
    return rows


def _do_bench():
    """triton's do_bench with its defaults (median), or None without triton."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return lambda fn: do_bench(fn, return_mode="median")


def sweep(section: str, out: Path, tag: str, smoke: bool, rounds: int) -> dict:
    """One preset as the page runs it, each row cross-checked with do_bench; writes the document."""
    s = settings_for(SWEEPS[section], windows=rounds)
    if smoke:
        s = settings_for(SWEEPS[section], seqlens=(64, 128), head_dims=(16,), hidden=32, tokens=256,
                         dtypes=("fp32",), rep_ms=5.0, warmup_ms=1.0, windows=rounds)
    t0 = time.perf_counter()

    def progress(done: int, total: int, label: str) -> None:
        print(f"  [{done}/{total}] {time.perf_counter() - t0:5.0f} s  {label}", flush=True)

    # Smoke: a CPU stand-in for do_bench, so the cross-check path runs too.
    check = (lambda fn: steady_time(fn, "cpu", 1.0, 5.0).median_ms) if smoke else _do_bench()
    result = run_sweep(s, progress=progress, crosscheck=check)
    (out / f"attention_sweep_{tag}_{section}.json").write_text(result.to_json())
    t = result.table
    ok = t[t["status"] == "ok"]
    within = ok["vs_do_bench_pct"].abs() <= 3
    print(f"{section}: {len(ok)} timed rows in {result.elapsed_s:.0f} s; within 3% of do_bench: "
          f"{int(within.sum())}/{int(ok['vs_do_bench_pct'].notna().sum())}; "
          f"max |diff| {ok['vs_do_bench_pct'].abs().max():.2f}%", flush=True)
    cols = ["mask" if s.masks else "causal", "seqlen", "backend"]
    view = ok[ok["head_dim"] == (128 if not smoke else 16)]
    print(view.pivot_table(index=cols[:2], columns="backend", values="tflops").round(0).to_string())
    cols = ["head_dim", "causal", "mask", "batch", "seqlen", "backend", "ms", "do_bench_ms", "vs_do_bench_pct",
            "window_range_pct", "host_ms", "sm_mhz", "warmup_ms"]
    if (~within & ok["vs_do_bench_pct"].notna()).any():
        print("outside 3%:\n" + ok.loc[~within & ok["vs_do_bench_pct"].notna(), cols].round(3).to_string())
    for r in t[t["status"] != "ok"].drop_duplicates(["backend", "note"]).itertuples():
        print(f"  {r.backend} {r.status}: {r.note[:120]}")
    return {"rows": len(t), "timed": len(ok), "elapsed_s": result.elapsed_s}


def _paired(a, b, rounds: int, bench) -> dict:
    """Median of per-round ratios a/b, do_bench medians, alternating order."""
    ta, tb = alternating(lambda: bench(a), lambda: bench(b), rounds)
    return {"a_ms": statistics.median(ta), "b_ms": statistics.median(tb),
            "ratio_pct": 100 * (statistics.median(x / y for x, y in zip(ta, tb)) - 1), "rounds": [ta, tb]}


def fa4_extras(dev: torch.device) -> dict:
    """FA4: compile time apart from kernel time, and SDPA with FA4 activated inside
    (torch.nn.attention.activate_flash_attention_impl)."""
    bench = _do_bench()
    res: dict = {"compile": []}
    for d, causal in ((128, True), (64, False)):
        q, k, v = (torch.randn(1, 16384, 2048 // d, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        t0 = time.perf_counter()
        out = fa.fa4_call(q, k, v, causal)
        torch.cuda.synchronize()
        fwd_first = time.perf_counter() - t0
        dout = torch.randn_like(out)
        t0 = time.perf_counter()
        torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
        bwd_first = time.perf_counter() - t0
        with torch.no_grad():
            fwd_ms = bench(lambda: fa.fa4_call(q, k, v, causal))
        step_ms = bench(lambda: torch.autograd.grad(fa.fa4_call(q, k, v, causal), (q, k, v), dout))
        res["compile"].append({"head_dim": d, "causal": causal, "fwd_first_call_s": fwd_first,
                               "bwd_first_call_s": bwd_first, "fwd_ms": fwd_ms, "fwd_bwd_ms": step_ms,
                               "fwd_compile_s": fwd_first - fwd_ms / 1e3,
                               "bwd_compile_s": bwd_first - (step_ms - fwd_ms) / 1e3})
        print(f"  compile D={d} causal={causal}: first fwd {fwd_first:.2f} s, first bwd {bwd_first:.2f} s; "
              f"steady fwd {fwd_ms:.3f} ms, fwd+bwd {step_ms:.3f} ms", flush=True)
    inside = settings_for("fa3-paper-train", seqlens=(16384,), head_dims=(128,), causal=(True,),
                          backends=("sdpa-flash", "sdpa-fa4"))
    table = run_sweep(inside, crosscheck=bench).table  # sdpa-fa4 last: it switches SDPA's flash kernel
    res["sdpa_fa4"] = json.loads(table.to_json(orient="records"))
    for r in res["sdpa_fa4"]:
        print(f"  {r['backend']}: {r['status']} {r['tflops'] or math.nan:.0f} TFLOP/s {r['note'][:150]}", flush=True)
    return res


def fa4_overhead(dev: torch.device) -> dict:
    """attention(..., prefer="fa4") against flash_attn.cute.interface.flash_attn_func called directly,
    forward and forward+backward, after compilation: median of per-round ratios of paired do_bench runs."""
    from flash_attn.cute.interface import flash_attn_func  # what a user calls without the wrapper

    bench = _do_bench()
    res: dict = {"overhead": []}
    for s in (2048, 8192, 16384):
        for grad in (False, True):
            q, k, v = (torch.randn(16384 // s, s, 16, 128, device=dev, dtype=torch.bfloat16, requires_grad=grad)
                       for _ in range(3))
            if grad:
                dout = torch.randn_like(q)
                wrapped = lambda: torch.autograd.grad(  # noqa: E731
                    fa.attention(q, k, v, True, prefer="fa4"), (q, k, v), dout)
                direct = lambda: torch.autograd.grad(  # noqa: E731
                    flash_attn_func(q, k, v, causal=True)[0], (q, k, v), dout)
            else:
                wrapped = lambda: fa.attention(q, k, v, True, prefer="fa4")  # noqa: E731
                direct = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
            with torch.set_grad_enabled(grad):
                path = fa.choose_path(q, k, v, causal=True, prefer="fa4")
                r = _paired(wrapped, direct, 7, bench)
            res["overhead"].append({"S": s, "grad": grad, "path": path.backend, "wrapper_ms": r["a_ms"],
                                    "direct_ms": r["b_ms"], "overhead_pct": r["ratio_pct"], "rounds": r["rounds"],
                                    "direct": "flash_attn.cute.interface.flash_attn_func"})
            print(f"  attention() vs flash_attn.cute.interface.flash_attn_func S={s} grad={grad} ({path.backend}): "
                  f"{r['a_ms']:.3f} vs {r['b_ms']:.3f} ms, {r['ratio_pct']:+.2f}% (median of 7 paired do_bench "
                  "rounds)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", required=True, choices=["correctness", *SWEEPS, "fa4-extras", "fa4-overhead"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--rounds", type=int, default=4, help="sweeps: windows of each timer per row (ABBA order)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = sweep_environment()
    print(args.section, json.dumps(env), flush=True)
    doc: dict = {"env": env, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "section": args.section}
    if args.section == "correctness":
        doc["cases"] = correctness(dev, args.smoke)
        print(f"correctness: {sum(r['pass'] for r in doc['cases'])}/{len(doc['cases'])} pass")
    elif args.section in SWEEPS:
        doc.update(sweep(args.section, args.out, args.tag, args.smoke, args.rounds))
        return
    else:
        doc.update(fa4_extras(dev) if args.section == "fa4-extras" else fa4_overhead(dev))
    (args.out / f"attention_{args.section}_{args.tag}.json").write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
