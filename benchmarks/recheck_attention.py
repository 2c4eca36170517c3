"""Re-time the rows of a committed attention sweep that missed the 3% agreement with do_bench, with
more windows of each timer, and print each window: tells a timer's bias from the GPU's own
window-to-window variation (its SM clock can differ by 20% between 100 ms windows at one load).

    python benchmarks/recheck_attention.py benchmarks/results/attention_sweep_h200_..._paper-train.json --rounds 8

Only plain (unmasked) rows; a backend this machine lacks is reported and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.attention_bench as ab  # noqa: E402
from engine.attention_shapes import SweepSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="a document written by bench_attention.py")
    ap.add_argument("--rounds", type=int, default=8, help="windows of each timer per row (ABBA order)")
    ap.add_argument("--limit-pct", type=float, default=3.0, help="rows whose |vs_do_bench_pct| exceeds this")
    args = ap.parse_args()
    from triton.testing import do_bench

    doc = ab.load_result(args.sweep)
    base = SweepSettings(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in doc.settings.items() if k != "device"})
    misses = [r for r in doc.table.to_dict("records") if r["status"] == "ok" and r["mask"] in ("none", "causal")
              and abs(r["vs_do_bench_pct"]) > args.limit_pct]
    ours: list[float] = []
    theirs: list[float] = []
    steady = ab.steady_time

    def recorded(*a, **k):  # every window of ours, as _timed calls it
        t = steady(*a, **k)
        ours.append(t.median_ms)
        return t

    def check(fn) -> float:
        theirs.append(do_bench(fn, return_mode="median"))
        return theirs[-1]

    ab.steady_time = recorded
    within = timed = 0
    for r in misses:
        s = ab.replace(base, seqlens=(r["seqlen"],), head_dims=(r["head_dim"],), causal=(r["causal"],),
                       backends=(r["backend"],), dtypes=(r["dtype"],), gqa=(r["heads"] // r["kv_heads"],),
                       windows=args.rounds)
        ours.clear()
        theirs.clear()
        t = ab.run_sweep(s, crosscheck=check).table.iloc[0]
        label = f"{r['backend']} S={r['seqlen']} D={r['head_dim']} causal={r['causal']}"
        if t["status"] != "ok":
            print(f"{label}: {t['status']} {t['note'][:120]}")
            continue
        timed += 1
        within += abs(t["vs_do_bench_pct"]) <= args.limit_pct
        print(f"{label}: was {r['vs_do_bench_pct']:+.2f}% with {base.windows} windows, now "
              f"{t['vs_do_bench_pct']:+.2f}% with {args.rounds} (own window range {t['window_range_pct']:.1f}%)")
        # The row's own windows are the last ones: run_sweep first times a matmul for its ceiling.
        print("   steady_time", " ".join(f"{m:.3f}" for m in ours[-args.rounds:]))
        print("   do_bench   ", " ".join(f"{m:.3f}" for m in theirs))
    print(f"{within} of {timed} rows timed again within {args.limit_pct:g}% with {args.rounds} windows per timer "
          f"({len(misses) - timed} of the {len(misses)} not timed here)")


if __name__ == "__main__":
    main()
