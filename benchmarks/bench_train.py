"""The training lab, timed: the page's default run on CPU, or a larger sweep over seeds on a GPU.

    python benchmarks/bench_train.py                       # CPU: the page's default run, 1 thread
    python benchmarks/bench_train.py --save-corpus /tmp/c.pt --data stdlib --vocab 4096
    python benchmarks/bench_train.py --sweep --corpus c.pt --device cuda --dtype bf16 --graphs on \
        --seeds 0,1,2 --parallel 6 --time-limit 400 --throughput dense,topk,hash \
        --out benchmarks/results/train_h200
    python benchmarks/bench_train.py --corpus c.pt --device cuda --dtype bf16 \
        --throughput dense,topk --graphs off,on --throughput-batches 8,32   # ratios only
    python benchmarks/bench_train.py --corpus c.pt --device cuda --dtype bf16 --profile dense,topk

CPU mode prints seconds (wall and process CPU) and tokens/s per router, the total, and `uptime`
(the machine may be shared: wall times then stretch, CPU seconds much less).
--sweep runs every (router, seed) as its own process, `--parallel` at once on one device, each
stopping at the first evaluation after --time-limit; all runs are then compared at the last
evaluation step every run reached. --throughput (after the sweep, if any: nothing else runs) times
the training loop's own step (engine.train_step) for dense and MoE models one at a time in this
process, interleaved rounds of >= 0.5 s after a 2 s warm-up, and prints ms/step, tokens/s and the
ratio to dense side by side, per --graphs mode and batch. --profile prints torch.profiler's
busiest kernels and host against GPU time per step. --out writes <out>.json (the page reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.train_data import Corpus, builtin_text, tokenize  # noqa: E402
from engine.env_info import environment  # noqa: E402
from engine.train_loop import TrainSettings, resolve_device, train_run  # noqa: E402
from engine.train_metrics import summary_table, summary_text  # noqa: E402
from engine.train_model import MoELM  # noqa: E402
from engine.train_step import TrainStep  # noqa: E402

INTS = ("d_model", "layers", "heads", "experts", "k", "d_expert", "moe_every", "steps", "batch",
        "seq_len", "warmup", "eval_every", "eval_batches", "vocab")
FLOATS = ("lr", "alpha", "capacity", "gamma")


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from the flags that were given (the rest keep the page's defaults)."""
    kw = {f: getattr(args, f) for f in INTS + FLOATS if getattr(args, f) is not None}
    if args.routers:
        kw["routers"] = tuple(args.routers.split(","))
    kw["seeds"] = tuple(int(v) for v in args.seeds.split(","))
    return TrainSettings(**kw, data=args.data, tokenizer=args.tokenizer, device=args.device,
                         dtype=args.dtype, cuda_graphs=args.graphs == "on")


def load_corpus(args: argparse.Namespace, s: TrainSettings) -> Corpus:
    """The corpus from --corpus (a saved file: no tokenizers needed) or tokenized here."""
    if args.corpus:
        d = torch.load(args.corpus)
        return Corpus(d["train"], d["val"], tuple(d["strings"]), d["tokenizer"], d["text_sha"],
                      d["chars"])
    return tokenize(builtin_text(s.data), s.tokenizer, s.vocab)


def uptime() -> str:
    """`uptime` output (load averages), for timings on a shared machine."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cpu_run(s: TrainSettings, corpus: Corpus) -> None:
    """The page's run, one router after another, timed (one torch thread, as the page uses)."""
    torch.set_num_threads(1)
    print(f"load before: {uptime()}")
    rows, t_all, c_all = [], time.perf_counter(), time.process_time()
    for router in s.routers:
        t0, c0 = time.perf_counter(), time.process_time()
        h = train_run(s, corpus, router, s.seeds[0])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tps = statistics.median(h.tokens_per_s[2:] or h.tokens_per_s[1:])
        rows.append((router, wall, cpu, tps, h.val_loss[0], h.val_loss[-1]))
        print(f"{router:14s} {wall:6.1f} s wall {cpu:6.1f} s CPU {tps:8.0f} tokens/s  "
              f"val loss {h.val_loss[0]:.3f} -> {h.val_loss[-1]:.3f}", flush=True)
    print(f"{'total':14s} {time.perf_counter() - t_all:6.1f} s wall "
          f"{time.process_time() - c_all:6.1f} s CPU  (target <= 120 s)")
    print(f"load after: {uptime()}")


def sweep(args: argparse.Namespace, s: TrainSettings, corpus_path: str) -> dict:
    """Every (router, seed) in its own process, --parallel at once; runs cut at a common step."""
    jobs = [(r, seed) for seed in s.seeds for r in s.routers]
    tmp = Path(tempfile.mkdtemp())
    deadline_s = args.time_limit
    procs: list[tuple[subprocess.Popen, Path]] = []
    pending = list(jobs)
    t0 = time.monotonic()
    base = [sys.executable, __file__, "--corpus", corpus_path, "--seeds", args.seeds,
            "--device", args.device, "--dtype", args.dtype, "--graphs", args.graphs]
    for f in INTS + FLOATS:
        if getattr(args, f) is not None:
            base += [f"--{f.replace('_', '-')}", str(getattr(args, f))]
    while pending or procs:
        while pending and len(procs) < args.parallel:
            router, seed = pending.pop(0)
            out = tmp / f"{router}_{seed}.json"
            left = max(10.0, deadline_s - (time.monotonic() - t0))
            # The job's own router only: the settings are checked for every router they name
            # (Expert Choice, a default router, cannot be captured in a CUDA graph).
            cmd = base + ["--routers", router, "--job", f"{router}:{seed}", "--job-out", str(out),
                          "--time-limit", str(left)]
            procs.append((subprocess.Popen(cmd), out))
        time.sleep(1)
        for p, out in list(procs):
            if p.poll() is not None:
                procs.remove((p, out))
            elif time.monotonic() - t0 > deadline_s + 120:  # a hang must not eat the budget
                p.kill()
    runs = [json.loads(p.read_text()) for _, p in [(0, tmp / f"{r}_{sd}.json") for r, sd in jobs]
            if p.exists()]
    print(f"sweep: {len(runs)}/{len(jobs)} runs in {time.monotonic() - t0:.0f} s", flush=True)
    return cut_to_common_step(runs)


def cut_to_common_step(runs: list[dict]) -> dict:
    """Truncate every run's lists to the last evaluation step all runs reached."""
    common = min(r["step"][-1] for r in runs)
    for r in runs:
        n, evals = r["step"].index(common) + 1, len(r["step"])
        for k, v in r.items():
            if isinstance(v, list) and len(v) == evals:
                r[k] = v[:n]
        if r["stopped"] and r["stopped"].startswith("time limit"):
            r["stopped"] = None
    return {"runs": runs, "compared_at_step": common}


def job(args: argparse.Namespace) -> None:
    """One (router, seed) run of a sweep, written as JSON to --job-out."""
    s = settings_from(args)
    if s.device == "cpu":
        torch.set_num_threads(1)  # jobs run side by side
    corpus = load_corpus(args, s)
    router, seed = args.job.split(":")
    h = train_run(s, corpus, router, int(seed), deadline=time.monotonic() + args.time_limit)
    Path(args.job_out).write_text(json.dumps(h.as_dict()))
    print(f"job {router}:{seed} step {h.step[-1]} val {h.val_loss[-1]:.4f} "
          f"{statistics.median(h.tokens_per_s[1:] or [0]):.0f} tok/s", flush=True)


def _models(s: TrainSettings, corpus: Corpus, routers: tuple[str, ...], graphs: bool
            ) -> dict[str, tuple[TrainStep, tuple[int, int]]]:
    """One model and its TrainStep (the training loop's own step) per router, seed 0."""
    dev = resolve_device(s.device)
    freq = torch.bincount(corpus.train, minlength=corpus.vocab).double()
    out = {}
    for r in routers:
        m = MoELM(s.model_config(r, 0, corpus.vocab), freq).to(dev)
        out[r] = (TrainStep(m, 1e-4, 0, 10**6, s.dtype == "bf16", graphs), m.param_counts())
    return out


def _batch(s: TrainSettings, corpus: Corpus, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, corpus.train.numel() - s.seq_len, (batch,), generator=gen)
    return corpus.train[starts[:, None] + torch.arange(s.seq_len)].to(resolve_device(s.device))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def throughput(s: TrainSettings, corpus: Corpus, routers: tuple[str, ...], batch: int,
               graphs: bool, rounds: int = 5, window_s: float = 0.5) -> list[dict]:
    """Training tokens/s of each router's model, one at a time in this process: warm-up for 2 s,
    then interleaved rounds of >= window_s each, the host synced only at a window's ends."""
    dev = resolve_device(s.device)
    models = _models(s, corpus, routers, graphs)
    ids = _batch(s, corpus, batch)
    done = {r: 0 for r in routers}

    def run(r: str, n: int) -> float:
        trainer = models[r][0]
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            done[r] += 1
            trainer.step(done[r], ids)
        _sync(dev)
        return time.perf_counter() - t0

    per_step = {}
    for r in routers:  # warm-up for a time, not a count (clocks, allocator, capture)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 2.0:
            run(r, 5)
            n += 5
        per_step[r] = run(r, 10) / 10
    rates: dict[str, list[float]] = {r: [] for r in routers}
    for _ in range(rounds):
        for r in routers:
            n = max(1, math.ceil(window_s / per_step[r]))
            rates[r].append(n * batch * s.seq_len / run(r, n))
    dense = statistics.median(rates["dense"]) if "dense" in rates else float("nan")
    out = []
    for r in routers:
        tps = statistics.median(rates[r])
        total, active = models[r][1]
        out.append({"router": r, "batch_tokens": batch * s.seq_len, "cuda_graphs": graphs,
                    "tokens_per_s": tps, "ms_per_step": 1e3 * batch * s.seq_len / tps,
                    "vs_dense": tps / dense, "total_params": total, "active_params": active})
        print(f"  {r:14s} {batch * s.seq_len:6d} tokens/step graphs {'on ' if graphs else 'off'} "
              f"{1e3 * batch * s.seq_len / tps:7.2f} ms/step {tps:10.0f} tokens/s  "
              f"{tps / dense:5.2f}x dense  active {active:,} total {total:,}", flush=True)
    return out


def profile(s: TrainSettings, corpus: Corpus, routers: tuple[str, ...], batch: int) -> None:
    """torch.profiler over 5 eager steps per router (after 10 warm-up steps): the busiest kernels
    and, per step, host time against time the GPU spent in kernels."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    dev = resolve_device(s.device)
    models = _models(s, corpus, routers, graphs=False)
    ids = _batch(s, corpus, batch)
    for r in routers:
        trainer = models[r][0]
        for i in range(10):
            trainer.step(i + 1, ids)
        _sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        t0 = time.perf_counter()
        with torch_profile(activities=acts) as prof:
            for i in range(5):
                trainer.step(11 + i, ids)
            _sync(dev)
        wall = (time.perf_counter() - t0) / 5
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events  # kernels, not the ops around them
                  if e.device_type == torch.autograd.DeviceType.CUDA) / 5 / 1e3
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                            "cudaLaunchKernelExC")) / 5
        print(f"profile {r}: {wall * 1e3:.2f} ms/step wall (profiled), GPU kernels {gpu:.2f} "
              f"ms/step, {launches:.0f} kernel launches/step")
        print(events.table(sort_by="self_device_time_total" if dev.type == "cuda"
                           else "self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    """Parse flags and run the chosen mode."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in INTS:
        p.add_argument(f"--{f.replace('_', '-')}", type=int, dest=f)
    for f in FLOATS:
        p.add_argument(f"--{f.replace('_', '-')}", type=float, dest=f)
    p.add_argument("--routers")
    p.add_argument("--seeds", default="0")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--tokenizer", default="bpe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--corpus", help="a corpus saved with --save-corpus")
    p.add_argument("--save-corpus", help="tokenize --data here and save it to this path")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=300.0)
    p.add_argument("--throughput", default="", help="comma-separated routers to time alone")
    p.add_argument("--throughput-batches", default="", help="comma-separated batch sizes")
    p.add_argument("--graphs", default="off", help="CUDA graphs for the sweep: on/off; for "
                   "--throughput a comma-separated list of modes to time")
    p.add_argument("--profile", default="", help="comma-separated routers to profile")
    p.add_argument("--job")
    p.add_argument("--job-out")
    p.add_argument("--out")
    args = p.parse_args()
    if args.job:
        return job(args)
    s = settings_from(args)
    if args.save_corpus:
        c = tokenize(builtin_text(s.data), s.tokenizer, s.vocab)
        torch.save({**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)},
                    "strings": list(c.strings)}, args.save_corpus)
        print(f"saved {c.train.numel()} + {c.val.numel()} tokens, V {c.vocab}, to {args.save_corpus}")
        return
    corpus = load_corpus(args, s)
    if args.profile:
        return profile(s, corpus, tuple(args.profile.split(",")),
                       int((args.throughput_batches or str(s.batch)).split(",")[0]))
    if not args.sweep and not args.throughput:
        return cpu_run(s, corpus)
    full: dict = {"settings": dataclasses.asdict(s), "environment": environment(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.sweep:
        doc = sweep(args, s, args.corpus)
        table = summary_table(doc["runs"])
        full.update({
            "corpus": {"tokenizer": corpus.tokenizer, "vocab": corpus.vocab,
                       "train_tokens": corpus.train.numel(), "val_tokens": corpus.val.numel(),
                       "chars": corpus.chars, "text_sha256": corpus.text_sha, "data": s.data},
            "runs": doc["runs"], "summary": table.to_dict(orient="records"),
            "compared_at_step": doc["compared_at_step"],
            "summary_text": summary_text(table, doc["compared_at_step"], corpus.train.numel())})
        with __import__("pandas").option_context("display.width", 200, "display.max_columns", 20):
            print(table.to_string(index=False))
        print(full["summary_text"])
    if args.throughput:  # after the sweep: nothing else runs on the device now
        print(f"throughput, one model at a time ({environment()['device']}):")
        full["throughput"] = []
        for mode in args.graphs.split(","):
            for b in [int(v) for v in (args.throughput_batches or str(s.batch)).split(",")]:
                full["throughput"] += throughput(dataclasses.replace(s, cuda_graphs=mode == "on"),
                                                 corpus, tuple(args.throughput.split(",")), b,
                                                 mode == "on")
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(full, indent=1, default=str))
        print(f"wrote {args.out}.json")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
