"""The training lab, timed: the page's default run on CPU, or a larger sweep over seeds on a GPU.

    python benchmarks/bench_train.py                       # CPU: the page's default run, 1 thread
    python benchmarks/bench_train.py --save-corpus /tmp/c.pt --data stdlib --vocab 4096
    python benchmarks/bench_train.py --sweep --corpus c.pt --device cuda --dtype bf16 \
        --seeds 0,1,2 --parallel 18 --time-limit 300 --out benchmarks/results/train_h200

CPU mode prints seconds (wall and process CPU) and tokens/s per router, the total, and `uptime`
(the machine may be shared: wall times then stretch, CPU seconds much less).
--sweep runs every (router, seed) as its own process, `--parallel` at once on one device, each
stopping at the first evaluation after --time-limit; all runs are then compared at the last
evaluation step every run reached. --throughput then times dense against MoE models one at a time
(nothing else running), interleaved rounds of >= 0.5 s after warm-up, and prints tokens/s side by
side with the ratio. --out writes <out>.json (the page can show it) and <out>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from engine.train_model import MoELM, lm_loss  # noqa: E402

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
                         dtype=args.dtype)


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
            "--device", args.device, "--dtype", args.dtype]
    for f in INTS + FLOATS:
        if getattr(args, f) is not None:
            base += [f"--{f.replace('_', '-')}", str(getattr(args, f))]
    while pending or procs:
        while pending and len(procs) < args.parallel:
            router, seed = pending.pop(0)
            out = tmp / f"{router}_{seed}.json"
            left = max(10.0, deadline_s - (time.monotonic() - t0))
            cmd = base + ["--job", f"{router}:{seed}", "--job-out", str(out),
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


def throughput(s: TrainSettings, corpus: Corpus, routers: tuple[str, ...], batch: int,
               rounds: int = 3, window_s: float = 0.5) -> list[dict]:
    """Training tokens/s of each router's model alone, interleaved rounds of >= window_s."""
    dev = resolve_device(s.device)
    autocast = torch.autocast(dev.type, torch.bfloat16, enabled=s.dtype == "bf16")
    models = {}
    for r in routers:
        cfg = s.model_config(r, 0, corpus.vocab)
        freq = torch.bincount(corpus.train, minlength=corpus.vocab).double()
        m = MoELM(cfg, freq).to(dev)
        models[r] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), m.param_counts())
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, corpus.train.numel() - s.seq_len, (batch,), generator=gen)
    ids = corpus.train[starts[:, None] + torch.arange(s.seq_len)].to(dev)

    def steps(r: str, seconds: float) -> float:
        model, opt, _ = models[r]
        n, t0 = 0, time.perf_counter()
        while True:
            with autocast:
                logits, aux = model(ids)
                loss = lm_loss(logits, ids) + 0.01 * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if time.perf_counter() - t0 >= seconds:
                return n * batch * s.seq_len / (time.perf_counter() - t0)

    for r in routers:  # warm-up for a time, not a count (clocks, allocator, kernels)
        steps(r, 2.0)
    rates: dict[str, list[float]] = {r: [] for r in routers}
    for _ in range(rounds):
        for r in routers:
            rates[r].append(steps(r, window_s))
    dense = statistics.median(rates["dense"]) if "dense" in rates else float("nan")
    out = []
    for r in routers:
        tps = statistics.median(rates[r])
        total, active = models[r][2]
        out.append({"router": r, "batch_tokens": batch * s.seq_len, "tokens_per_s": tps,
                    "vs_dense": tps / dense, "total_params": total, "active_params": active})
        print(f"  {r:14s} {batch * s.seq_len:6d} tokens/step {tps:10.0f} tokens/s  "
              f"{tps / dense:5.2f}x dense  active {active:,} total {total:,}", flush=True)
    return out


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
    if not args.sweep:
        return cpu_run(s, corpus)
    doc = sweep(args, s, args.corpus)
    table = summary_table(doc["runs"])
    full = {"settings": dataclasses.asdict(s), "environment": environment(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "corpus": {"tokenizer": corpus.tokenizer, "vocab": corpus.vocab,
                       "train_tokens": corpus.train.numel(), "val_tokens": corpus.val.numel(),
                       "chars": corpus.chars, "text_sha256": corpus.text_sha, "data": s.data},
            "runs": doc["runs"], "summary": table.to_dict(orient="records"),
            "compared_at_step": doc["compared_at_step"],
            "summary_text": summary_text(table, doc["compared_at_step"], corpus.train.numel())}
    with __import__("pandas").option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(full["summary_text"])
    if args.throughput:
        full["throughput"] = []
        for b in [int(v) for v in (args.throughput_batches or str(s.batch)).split(",")]:
            full["throughput"] += throughput(s, corpus, tuple(args.throughput.split(",")), b)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(full, indent=1, default=str))
        print(f"wrote {args.out}.json")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
