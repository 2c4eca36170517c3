"""Routing speed, measured side by side in one run, printed as ratios against same-run floors.

    python benchmarks/bench_routing.py                       # CPU, one thread (the issue's setting)
    python benchmarks/bench_routing.py --device cuda --out benchmarks/results
    python benchmarks/bench_routing.py --page [--baseline DIR]   # the /routing page in Chromium

--page drives the routing page in headless Chromium on a fresh server per round: a cold link at
T = 1,048,576, the first render at the defaults, and Zipf s changes (widget change to settled
page). With --baseline DIR (another checkout, e.g. `git archive main | tar -x -C DIR`) the same
rounds run against it, alternating, and the ratios are printed.

Targets (issue #2): id hash with counts >= 70M tokens/s on one CPU core and >= 1G tokens/s on a
GPU; hidden-state (LSH) hash <= 3x one read of x (x.sum()); learned top-k <= 1.2x its floor
(gate matmul + topk). Writes routing-<device>-<date>.json and .md into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import lsh_triton  # noqa: E402
from engine.moe_router import (HashRouter, TopKRouter, expert_utilization, lsh_bits,  # noqa: E402
                               lsh_codes, top_k)
from engine.timing import alternating, time_fn  # noqa: E402


def _row(name: str, ms: float, tokens: int, ref_name: str, ref_ms: float, target: str,
         ok: bool | None, cpu_ms: float | None = None) -> dict[str, object]:
    return {"case": name, "ms": round(ms, 4), "Mtokens/s": round(tokens / ms / 1e3, 1),
            "cpu ms/call": None if cpu_ms is None else round(cpu_ms, 4),
            "reference": ref_name, "ref ms": round(ref_ms, 4), "ratio": round(ms / ref_ms, 3),
            "target": target, "met": ok}


def run(device: str, tokens: int, hidden_tokens: int, experts: int, k: int, d_model: int,
        reps: int) -> list[dict[str, object]]:
    """Time the id hash, the LSH hash and learned top-k against their same-run references."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50_000, (tokens,), generator=gen).to(dev)
    x = torch.randn(hidden_tokens, d_model, generator=gen).to(dev)
    hash_router, topk = HashRouter(experts, k, 0), TopKRouter(experts, k, d_model, 0)
    gate = topk.gate.to(dev)

    def pair(fn, ref) -> tuple[float, float, float]:
        """Median ms of fn and of ref, timed in alternating order (engine.timing.alternating) so
        both see the same machine state, and this process's CPU ms per call of fn (on a shared
        CPU wall time also counts the time other processes hold the core; CPU time does not)."""
        for _ in range(3):
            fn(), ref()
        cpu = []

        def timed_fn() -> float:
            c0 = time.process_time()
            ms = time_fn(fn, device=dev, warmup=0, reps=1).median_ms
            cpu.append(time.process_time() - c0)
            return ms

        a, b = alternating(timed_fn, lambda: time_fn(ref, device=dev, warmup=0, reps=1).median_ms,
                           reps)
        return statistics.median(a), statistics.median(b), sum(cpu) * 1e3 / reps

    on_cpu = dev.type == "cpu"
    rows = []
    ms, ref, cpu = pair(lambda: expert_utilization(hash_router(ids)), lambda: ids.sum())
    floor = 1e3 / (70e6 if on_cpu else 1e9)  # ms per token at the target rate
    rows.append(_row(f"hash ids + counts (T={tokens}, E={experts}, k={k})", ms, tokens,
                     "ids.sum()", ref, ">= 70 Mtok/s" if on_cpu else ">= 1000 Mtok/s",
                     ms <= floor * tokens, cpu if on_cpu else None))
    ms, ref, cpu = pair(lambda: expert_utilization(hash_router(x)), lambda: x.sum())
    rows.append(_row(f"hash hidden (LSH) + counts (T={hidden_tokens}, D={d_model})", ms,
                     hidden_tokens, "x.sum()", ref, "ratio <= 3", ms <= 3 * ref,
                     cpu if on_cpu else None))
    if lsh_triton.available(x):  # the torch path it replaces, and whether both give one code
        nbits, planes = lsh_bits(experts), hash_router._planes[d_model].to(dev)
        same = float((lsh_triton.lsh_codes(x, planes, nbits) == lsh_codes(x, planes, nbits))
                     .all(dim=1).double().mean())
        ms, ref, _ = pair(lambda: lsh_codes(x, planes, nbits), lambda: x.sum())
        rows.append(_row(f"LSH codes alone, torch path, for comparison (T={hidden_tokens}, "
                         f"D={d_model}; Triton's codes equal on {same:.6%} of tokens)", ms,
                         hidden_tokens, "x.sum()", ref, "-", None))
    # Floor: the gate matmul and the router's own top-k (max passes for k <= 2 on CPU).
    ms, ref, cpu = pair(lambda: topk(x), lambda: top_k(x @ gate, k))
    rows.append(_row(f"top-k softmax router (T={hidden_tokens}, D={d_model}, E={experts})",
                     ms, hidden_tokens, "x @ W + topk", ref, "ratio <= 1.2", ms <= 1.2 * ref,
                     cpu if on_cpu else None))
    return rows


def page_round(root: Path, changes: int) -> dict[str, object]:
    """One fresh server on `root`'s app: cold T = 1,048,576 link, first render at the defaults,
    then `changes` Zipf s steps timed from the change to the settled page (ms, in the page)."""
    from tests import browser_support as bs

    bs.ROOT = root  # streamlit_server runs `streamlit run app.py` in bs.ROOT
    with bs.streamlit_server(log_path=Path("/dev/null")) as base, bs.launch_browser() as browser:
        page = bs.new_app_page(browser)
        cold = bs.open_page(page, base, "routing", {"T": 1_048_576}, figures=3, timeout_s=300)
        page.context.close()
        page = bs.new_app_page(browser)
        first = bs.open_page(page, base, "routing", figures=3, timeout_s=120)
        redraws = [bs.timed_rerun(page, lambda v=1.0 + 0.05 * (i + 1): bs.set_widget(page, "s", v),
                                  figures=3) / 1e3 for i in range(changes)]
        page.context.close()
    return {"cold_T1M_s": cold, "first_render_s": first, "redraw_s": redraws}


def run_pages(roots: dict[str, Path], rounds: int, changes: int) -> dict[str, dict[str, float]]:
    """Alternate page_round over the checkouts; per checkout the medians (and redraw p95)."""
    seen: dict[str, list[dict[str, object]]] = {name: [] for name in roots}
    for _ in range(rounds):
        for name, root in roots.items():
            seen[name].append(page_round(root, changes))
    out = {}
    for name, rows in seen.items():
        redraws = sorted(r for row in rows for r in row["redraw_s"])
        out[name] = {"cold_T1M_s": statistics.median(r["cold_T1M_s"] for r in rows),
                     "first_render_s": statistics.median(r["first_render_s"] for r in rows),
                     "redraw_median_s": statistics.median(redraws),
                     "redraw_p95_s": redraws[min(len(redraws) - 1, int(0.95 * len(redraws)))]}
    return out


def environment(device: str, threads: int) -> dict[str, object]:
    """Device, date and library versions for the result file."""
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "threads": threads}
    if device == "cuda":
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    else:
        env.update(device="cpu")
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, default=1_000_000, help="token ids for the id hash")
    p.add_argument("--hidden-tokens", type=int, default=65_536, help="tokens of hidden states")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the target is one core)")
    p.add_argument("--reps", type=int, default=21, help="alternating timed pairs per case")
    p.add_argument("--repeat", type=int, default=3, help="whole runs; the table shows each")
    p.add_argument("--out", type=Path, default=None, help="directory for the .json and .md result")
    p.add_argument("--page", action="store_true", help="time the /routing page in Chromium")
    p.add_argument("--baseline", type=Path, default=None, help="--page: also time this checkout")
    p.add_argument("--changes", type=int, default=5, help="--page: Zipf s changes per round")
    a = p.parse_args()
    if a.page:
        roots = {"this checkout": Path(__file__).resolve().parents[1]}
        if a.baseline is not None:
            roots = {"baseline": a.baseline.resolve(), **roots}
        res = run_pages(roots, a.repeat, a.changes)
        print(f"# /routing in headless Chromium, {platform.node()}, load {os.getloadavg()}")
        print("| checkout | cold T=1,048,576 s | first render s | redraw median s | redraw p95 s |")
        print("|---|---|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r['cold_T1M_s']:.2f} | {r['first_render_s']:.2f} | "
                  f"{r['redraw_median_s']:.3f} | {r['redraw_p95_s']:.3f} |")
        if a.baseline is not None:
            base, this = res["baseline"], res["this checkout"]
            print("ratios this / baseline: " + ", ".join(
                f"{k} {this[k] / base[k]:.2f}" for k in this))
        print(json.dumps(res))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    torch.set_num_threads(a.threads)
    env = environment(a.device, a.threads)
    runs = [run(a.device, a.tokens, a.hidden_tokens, a.experts, a.k, a.d_model, a.reps)
            for _ in range(a.repeat)]
    lines = [f"# Routing benchmark, {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, python {env['python']}, threads {env['threads']}"
             + (f", CUDA {env['cuda']}" if a.device == "cuda" else ""), "",
             "| run | case | ms | Mtok/s | cpu ms/call | reference | ref ms | ratio | target "
             "| met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, rows in enumerate(runs):
        lines += [f"| {i} | {r['case']} | {r['ms']} | {r['Mtokens/s']} | {r['cpu ms/call']} | "
                  f"{r['reference']} | "
                  f"{r['ref ms']} | {r['ratio']} | {r['target']} | {r['met']} |" for r in rows]
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        stem = f"routing-{a.device}-{env['date'][:10]}"
        (a.out / f"{stem}.json").write_text(json.dumps({"env": env, "args": {
            k: str(v) for k, v in vars(a).items()}, "runs": runs}, indent=2))
        (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out / stem}.json and .md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
