"""The expert-parallel layer (engine.ep_layer) measured on torch.distributed, launched with torchrun.

Every rank makes its tokens and routing (engine.expert_parallel.rank_batch) and runs the layer:
dispatch (counts and rows to the experts), experts (each received row times its expert's gain),
combine (rows back, gate-weighted sum per token). With --chunks M the tokens go in M
micro-batches whose exchanges overlap; with --batches B the calls cycle through B batches, so
that each call's routing differs from the last one's (the layer sizes its main exchange from the
last calls' counts; see engine.ep_layer).

The dispatch, the combine and the whole layer are each timed next to a plain all_to_all_single of
exactly the rows that cross ranks (the layer's split sizes with a rank's own set to 0, as the layer
moves those locally; one way, one way back, both ways) in the same run; ratio = plain time / phase
time on the slowest rank. The issue's bandwidth target is the dispatch's ratio.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.ep_dispatch \
        --tokens 1024 --d-model 1024 --out DIR

Backend: gloo on CPU, NCCL on CUDA (one GPU per local rank). A rank that dies makes the others fail
within `--timeout` seconds (process-group timeout; gloo also runs a monitored barrier first), and
torchrun tears the job down. `launch()` runs this from Python with a bounded wall time.

Pure torch and stdlib: the GPU box runs it without pandas or streamlit.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from engine.cuda_graphs import GRAPH_LIMIT, release_all
from engine.ep_layer import GRAPH_MAX_BYTES, ExpertParallelLayer
from engine.ep_sections import SLACK, Dispatched, Splits
from engine.ep_launch import (MAX_CPU_PROCESSES, add_job_arguments, committed, init_group,
                              torchrun)
from engine.expert_parallel import (DTYPES, EPSettings, Placement, make_placement,
                                    parse_placement, rank_batch, token_features)
from engine.timing import gpu_work, time_fn
from engine.validation import MAX_BYTES, check_bytes, check_float, check_int



def expert_gains(num_experts: int, seed: int) -> torch.Tensor:
    """The experts: expert e multiplies its rows by gain[e] in [0.5, 1.5); shape (E,) float32.

    A per-expert scale keeps compute negligible so the layer's time is the exchange's, and makes
    every expert's output distinct so a row sent to the wrong expert changes the result.
    """
    gen = torch.Generator().manual_seed(seed + 13)
    return 0.5 + torch.rand(num_experts, generator=gen)


def reference_layer(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                    gains: torch.Tensor) -> torch.Tensor:
    """Single-process MoE output: sum_j w[t, j] * (x[t] * gains[experts[t, j]]); shape (T, D).

    Rounded like the layer: the expert's product x * gain in x's dtype, then the weighted sum
    over slots in float32 with the weights first rounded to x's dtype, one rounding at the end.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    g = gains.to(x.device, x.dtype)
    for j in range(experts.shape[1]):
        valid = experts[:, j] >= 0
        y = x[valid] * g[experts[valid, j]][:, None]
        out[valid] += y.float() * weights[valid, j].to(x.dtype).float()[:, None]
    return out.to(x.dtype)


def plain_exchange(send_buf: torch.Tensor, recv_buf: torch.Tensor, splits: Splits,
                   there: bool = True, back: bool = True) -> None:
    """all_to_all_single of a payload, nothing else (the yardstick): `splits` there (the
    dispatch's way), back, or both; send_buf (sum(send), D), recv_buf (sum(recv), D)."""
    if there:
        dist.all_to_all_single(recv_buf, send_buf, splits.recv, splits.send)
    if back:
        dist.all_to_all_single(send_buf, recv_buf, splits.send, splits.recv)


def working_set_bytes(settings: EPSettings, batches: int = 1, slack: float = SLACK,
                      chunks: int = 1, graphs: int = 0) -> int:
    """Estimated peak bytes of one rank: every batch's tokens, the output, pair rows (the send
    buffer with its main sections, rows received, overflow, one dispatch kept for the combine's
    timing besides the one in flight, the plain exchange's two buffers, and the send and
    receive buffers of each of `graphs` CUDA graphs), index tensors.

    A main section exceeds the n rows its pair moves by at most 3 slack sqrt(n) (next_section),
    which adds at most 3 slack sqrt(pairs R chunks) rows per buffer (Cauchy-Schwarz). A graph's
    main exchange moves at most GRAPH_MAX_BYTES each way (engine.ep_layer)."""
    pairs = settings.tokens * settings.top_k
    padding = 3 * slack * math.sqrt(pairs * settings.ranks * chunks)
    main = min(pairs + padding, GRAPH_MAX_BYTES / settings.row_bytes)
    buffers = 10 * pairs + 4 * padding + graphs * (pairs + 2 * main)
    return int(settings.row_bytes * ((batches + 1) * settings.tokens + buffers)) + 64 * pairs


# Timed on every rank, each against its plain all_to_all_single of the rows that cross ranks:
# (name, what it covers). Ratio = plain time / phase time on the slowest rank.
PHASES = {"dispatch": "counts + their exchange + rows placed by slot + rows to their experts",
          "combine": "rows back + weighted sum per token into (T, D)",
          "layer": "dispatch + experts + combine (plain: there and back)"}


def warm_up(fn: Callable[[], object], device: torch.device, seconds: float) -> None:
    """Call fn untimed for `seconds` of rank 0's clock; every rank makes the same calls.

    The dispatch is bound by the host at small token counts, and a fresh process ran it slower
    for its first seconds: 0.79 ms at 8k tokens on 2x H100, then 0.45 ms later in the same run.
    """
    start, go = time.perf_counter(), torch.ones(1, device=device)
    while seconds > 0 and go.item():
        fn()
        go.fill_(time.perf_counter() - start < seconds)
        dist.broadcast(go, 0)


def lined_up_work(ms: float, device: torch.device) -> Callable[[], None] | None:
    """`ms` of GPU work on every rank, then an all_reduce of one value, so that what is queued
    next starts on every GPU at once, not each when its own work ends (the first to start would
    wait for the others); None for 0 ms or on CPU."""
    if ms <= 0 or device.type != "cuda":
        return None
    work, flag = gpu_work(ms, device), torch.zeros(1, device=device)

    def lead() -> None:
        work()
        dist.all_reduce(flag)

    return lead


def measure(settings: EPSettings, rank: int, device: torch.device, warmup: int, reps: int,
            dump: Path | None = None, placement: Placement | None = None, chunks: int = 1,
            warmup_s: float = 0.0, batches: int = 1, slack: float = SLACK,
            lead_ms: float = 0.0, graphs: bool = True) -> dict:
    """Run and time the layer and its dispatch and combine phases on this rank, each next to a
    plain all_to_all_single of the rows that cross ranks (the layer's splits, own rank's set to 0);
    returns this rank's row (plain values, ms, MB).

    batches: the calls cycle through this many batches (rank_batch's `batch`), so that every
    call's routing differs from the last one's, from which the layer sizes its main exchange; the
    plain exchange cycles through their splits in step (the combine is timed on one kept
    dispatch, and its plain exchange on that batch's splits). With 1, only the first call differs.
    placement: a fixed one (e.g. parsed from --map), else built from settings and global loads.
    warmup_s: seconds of untimed layer calls first (see warm_up), besides `warmup` calls per timing.
    lead_ms: milliseconds of GPU work queued before every timed call (time_fn's `lead`), ended by
    an all_reduce that lines the ranks up; 0: none, the GPU is idle when a call starts, and the
    host's time before a transfer is exposed.
    graphs: let the layer replay its dispatch from CUDA graphs (see engine.ep_layer).
    """
    s = settings
    lead = lined_up_work(lead_ms, device)
    data = []
    for b in range(batches):
        ids, experts, weights = rank_batch(s, rank, device, batch=b)
        x = token_features(ids, s.d_model, s.seed, DTYPES[s.dtype])
        data.append((ids, x, experts, weights))
    counts = sum(torch.bincount(e[e >= 0], minlength=s.experts) for _, _, e, _ in data)
    dist.all_reduce(counts)  # global loads, as EPLB collects them, for the greedy placement
    placement = placement or make_placement(s, counts.cpu())
    token_index = rank * s.tokens + torch.arange(s.tokens, device=device)
    gains = expert_gains(s.experts, s.seed)
    layer = ExpertParallelLayer(placement, gains, rank, device, chunks, slack, graphs)
    turn = itertools.count()

    def layer_call() -> tuple[torch.Tensor, Splits]:
        _, x, experts, weights = data[next(turn) % batches]
        return layer(x, experts, weights, token_index)

    def dispatch_phase() -> Dispatched:
        _, x, experts, _ = data[next(turn) % batches]
        d = layer.dispatch(x, experts, token_index)
        for m in range(len(d.rows)):
            d.wait(m)
        return d

    references = [reference_layer(x, experts, weights, gains).float()
                  for _, x, experts, weights in data]

    def checked_calls() -> tuple[float, list[Splits], torch.Tensor]:
        """The layer's largest error over every batch, and batch 0 again; each batch's splits;
        batch 0's output."""
        err, splits, out0 = 0.0, [], None
        for b, (ids, x, experts, weights) in enumerate(data + data[:1]):
            out, split = layer(x, experts, weights, token_index)
            err = max(err, float((out.float() - references[b % batches]).abs().max()))
            if b < batches:
                splits.append(split)
            if b == 0:
                out0 = out
        return err, splits, out0

    # Both paths (whole layer, and phases run apart) must give the reference's output: the
    # layer's first call sends every row point to point (no last call to size the main exchange
    # from), the later ones mostly in the main exchange, with overflow where routing changed;
    # once timed (below), from CUDA graphs too.
    err, splits, out0 = checked_calls()
    # Kept: the combine phase sends these rows back every rep. With several batches it is
    # another batch than the last call's, as every timed dispatch is. Not from a graph, whose
    # buffers the later calls of the same batch would overwrite.
    kept = 1 % batches
    _, x, experts, weights = data[kept]
    d = layer.dispatch(x, experts, token_index, replay=False)
    for m in range(len(d.rows)):
        layer.experts(d, m)

    def kept_error() -> float:
        return float((layer.combine(d, weights).float() - references[kept]).abs().max())

    err = max(err, kept_error())
    if dump is not None:
        ids, _, experts, weights = data[0]
        torch.save({"ids": ids.cpu(), "experts": experts.cpu(), "weights": weights.cpu(),
                    "out": out0.cpu(), "send": splits[0].send}, dump / f"rank{rank}.pt")
    warm_up(layer_call, device, warmup_s)
    # The yardstick moves the same bytes over the wire: the own rows stay out of it, as they
    # stay out of the layer's exchanges (with them NCCL also copies them locally).
    wires = [Splits(layer.off_rank(sp.send), layer.off_rank(sp.recv)) for sp in splits]
    send_buf = data[0][1].new_empty(max(sum(w.send) for w in wires), s.d_model)
    recv_buf = data[0][1].new_empty(max(sum(w.recv) for w in wires), s.d_model)

    def plain(there: bool = True, back: bool = True, batch: int | None = None) -> None:
        wire = wires[next(turn) % batches if batch is None else batch]
        plain_exchange(send_buf[:sum(wire.send)], recv_buf[:sum(wire.recv)], wire, there, back)

    runs = {"layer": (layer_call, plain),
            "dispatch": (dispatch_phase, lambda: plain(back=False)),
            "combine": (lambda: layer.combine(d, weights), lambda: plain(there=False, batch=kept))}
    row = {"rank": rank, "tokens": s.tokens, "chunks": chunks, "batches": batches,
           "lead_ms": lead_ms if lead else 0.0, "graphs": layer.graphs is not None,
           "pairs_sent": splits[0].send}
    calls, overflow_calls, replays = layer.calls, layer.overflow_calls, layer.replays
    for name, (phase, plain_fn) in runs.items():
        for label, fn in ((name, phase), (f"plain_{name}", plain_fn)):
            turn = itertools.count()  # both sides go through the batches in the same order
            dist.barrier()
            t = time_fn(fn, device, warmup, reps, lead=lead)
            row[f"{label}_ms"], row[f"{label}_p10_ms"], row[f"{label}_p90_ms"] = \
                t.median_ms, t.p10_ms, t.p90_ms
    timed = max(1, layer.calls - calls)
    # Off-rank bytes sent in the dispatch and in the combine, averaged over the batches.
    there = sum(sum(w.send) for w in wires) / batches * s.row_bytes
    back = sum(sum(w.recv) for w in wires) / batches * s.row_bytes
    back_kept = sum(wires[kept].recv) * s.row_bytes  # the timed combine's
    row.update({"off_rank_MB": (there + back) / 1e6,
                "dispatch_GBps": there / row["dispatch_ms"] / 1e6,
                "plain_dispatch_GBps": there / row["plain_dispatch_ms"] / 1e6,
                "combine_GBps": back_kept / row["combine_ms"] / 1e6,
                "layer_GBps": (there + back) / row["layer_ms"] / 1e6,
                "plain_GBps": (there + back) / row["plain_layer_ms"] / 1e6,
                "overflow_share": (layer.overflow_calls - overflow_calls) / timed,
                "graph_share": (layer.replays - replays) / timed})
    # Again after timing: the layer from the graphs captured meanwhile, the kept dispatch after
    # all the calls since.
    row["max_abs_err"] = max(err, checked_calls()[0], kept_error())
    return row


def summarize(rows: list[dict]) -> dict:
    """One configuration: per phase the slowest rank's time, its plain exchange's slowest time and
    ratio = plain / phase (1 = as fast as the bare all_to_all_single; the target is dispatch's)."""
    out = {"tokens": rows[0]["tokens"], "chunks": rows[0]["chunks"],
           "lead_ms": rows[0].get("lead_ms", 0.0)}
    for name in PHASES:
        phase = max(r[f"{name}_ms"] for r in rows)
        plain = max(r[f"plain_{name}_ms"] for r in rows)
        out.update({f"{name}_ms": phase, f"plain_{name}_ms": plain, f"{name}_ratio": plain / phase})
    out["max_abs_err"] = max(r["max_abs_err"] for r in rows)
    out["overflow_share"] = max(r.get("overflow_share", 0.0) for r in rows)
    out["graph_share"] = min(r.get("graph_share", 0.0) for r in rows)
    return out


def median_round(rounds: list[dict]) -> dict:
    """The summary of the round with the median dispatch ratio (the lower middle one for an even
    count), with every round's dispatch ratio in `dispatch_ratio_rounds`.

    A round measures a configuration afresh. On the H100 machines measured the host of one rank at times
    ran about 1.8x slower for a whole round (every host step slower, the other ranks waiting in
    the host sync), which at 8k-16k tokens halved the round's dispatch ratio.
    """
    ranked = sorted(rounds, key=lambda r: r["dispatch_ratio"])
    return {**ranked[(len(ranked) - 1) // 2],
            "dispatch_ratio_rounds": [r["dispatch_ratio"] for r in rounds]}


def format_table(rows: list[dict], keys: list[str]) -> str:
    """Rows as a right-aligned text table of `keys` (floats to 4 significant digits)."""
    def fmt(v: object) -> str:
        if isinstance(v, list):
            return " ".join(map(fmt, v))
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [keys] + [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(keys))) for c in cells)


def environment(device: torch.device) -> dict:
    """Device, date and library versions recorded with every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    nccl = None
    if device.type == "cuda":
        v = torch.cuda.nccl.version()  # a tuple on recent torch, an int on old ones
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "python": platform.python_version()}


def build_parser() -> argparse.ArgumentParser:
    """Worker arguments (the settings of EPSettings plus timing, output and fault injection)."""
    p = argparse.ArgumentParser(description="expert-parallel dispatch worker (run under torchrun)")
    d = EPSettings()
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--tokens", default=str(d.tokens), help="tokens per rank; a comma list sweeps")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--placement", default=d.placement)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--map", default="", help="custom placement 'ids;ids;...', one group per rank")
    p.add_argument("--router", default=d.router)
    p.add_argument("--zipf", type=float, default=d.zipf)
    p.add_argument("--hot-share", type=float, default=d.hot_share)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--chunks", default="4",
                   help="micro-batches overlapped in the layer; a comma list sweeps")
    p.add_argument("--batches", type=int, default=4,
                   help="calls cycle through this many batches, so routing changes every call")
    p.add_argument("--slack", type=float, default=SLACK,
                   help="main-exchange headroom per pair of ranks over the rows it moved in "
                        "the last call, in square roots of those rows (see next_section)")
    p.add_argument("--lead-ms", type=float, default=0.0,
                   help="GPU work (ms) queued before every timed call, standing for the rest of "
                        "a model step, so the host reaches the call ahead of the GPU; 0: none")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: replay the dispatch from CUDA graphs once its inputs repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--warmup-s", type=float, default=2.0,
                   help="seconds of untimed layer calls per configuration before timing")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times afresh; report the round "
                        "with the median dispatch ratio")
    add_job_arguments(p, 120.0, "directory for ep_<backend>_<N>ranks.json and .md")
    p.add_argument("--dump", type=Path, help="directory for each rank's tensors (tests)")
    return p


def parse_ints(name: str, text: str) -> list[int]:
    """'8192,16384' -> [8192, 16384]; ValueError naming `name` otherwise."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma list of integers, got {text!r}") from None


def settings_from_args(args: argparse.Namespace, world: int, tokens: int) -> EPSettings:
    """EPSettings for `world` ranks from worker or CLI arguments."""
    return EPSettings(experts=args.experts, ranks=world, top_k=args.top_k, tokens=tokens,
                      d_model=args.d_model, dtype=args.dtype, placement=args.placement,
                      replicas=args.replicas, router=args.router, zipf=args.zipf,
                      hot_share=args.hot_share, seed=args.seed).validated()


def checked_map(text: str, settings: EPSettings) -> Placement | None:
    """The custom placement in `text` (None if empty), checked against the settings' E and R."""
    if not text:
        return None
    placement = parse_placement(text, settings.experts)
    if placement.num_ranks != settings.ranks:
        raise ValueError(f"placement map has {placement.num_ranks} rank groups; the job has "
                         f"{settings.ranks} ranks")
    return placement


def worker(argv: list[str] | None = None) -> None:
    """Entry point of every torchrun process: measure each (tokens, chunks), rank 0 reports."""
    args = build_parser().parse_args(argv)
    # High-priority NCCL streams: exchanges get SMs ahead of the placing of own rows.
    rank, world, device = init_group(args.backend, args.timeout, args.fail_rank, high_priority=True)
    backend = dist.get_backend()
    try:
        check_int("rounds", args.rounds, 1, 100)
        check_int("batches", args.batches, 1, 16)
        check_float("lead-ms", args.lead_ms, 0.0, 100.0)
        check_float("slack", args.slack, 0.0, 1000.0)
        summaries, per_rank = [], []
        for tokens in parse_ints("tokens", args.tokens):
            s = settings_from_args(args, world, tokens)
            limit = int(0.8 * torch.cuda.get_device_properties(device).total_memory) \
                if device.type == "cuda" else MAX_BYTES
            check_bytes("dispatch working set per rank",
                        working_set_bytes(s, args.batches, args.slack,
                                          max(parse_ints("chunks", args.chunks)),
                                          GRAPH_LIMIT if args.graphs and device.type == "cuda"
                                          else 0), limit)
            for chunks in parse_ints("chunks", args.chunks):
                rounds = []
                for i in range(args.rounds):
                    row = measure(s, rank, device, args.warmup, args.reps, args.dump,
                                  checked_map(args.map, s), chunks, args.warmup_s, args.batches,
                                  args.slack, args.lead_ms, args.graphs)
                    rows: list[dict] = [{}] * world
                    dist.all_gather_object(rows, {**row, "round": i})
                    per_rank += rows
                    rounds.append(summarize(rows))
                summaries.append(median_round(rounds))
        if rank == 0:
            _report(args, backend, world, device, s, summaries, per_rank)
    finally:
        release_all()
        dist.destroy_process_group()


def _report(args: argparse.Namespace, backend: str, world: int, device: torch.device,
            settings: EPSettings, summaries: list[dict], per_rank: list[dict]) -> None:
    doc = {"backend": backend, "world": world, **environment(device),
           "settings": {k: v for k, v in asdict(settings).items() if k != "tokens"},
           "summary": summaries, "per_rank": per_rank}
    keys = ["rank", "round", "tokens", "chunks", "batches", "lead_ms", "off_rank_MB", "dispatch_ms",
            "plain_dispatch_ms", "combine_ms", "plain_combine_ms", "layer_ms", "plain_layer_ms",
            "dispatch_GBps", "plain_dispatch_GBps", "overflow_share", "graph_share", "max_abs_err"]
    phases = "\n".join(f"  {name}: {what}" for name, what in PHASES.items())
    summary_keys = ["tokens", "chunks", "lead_ms"] + [f"{n}_ratio" for n in PHASES] + \
        [f"{p}{n}_ms" for n in PHASES for p in ("", "plain_")] + ["overflow_share", "graph_share",
                                                              "max_abs_err",
                                                              "dispatch_ratio_rounds"]
    text = (f"Expert-parallel dispatch, {backend}, {world} ranks, {doc['device']}, {doc['date']}\n"
            f"torch {doc['torch']}, CUDA {doc['cuda']}, NCCL {doc['nccl']}; settings "
            f"{json.dumps(doc['settings'])}\n\nphases, each timed next to a plain all_to_all_single "
            f"of the rows that cross ranks (one way for dispatch and combine, both ways for the "
            f"layer):"
            f"\n{phases}\n\nper rank (GB/s = off-rank bytes sent per second):\n\n"
            f"{format_table(per_rank, keys)}\n\nslowest rank (max over ranks of each median) in the "
            f"round with the median dispatch ratio of {args.rounds} (every round's ratio last); "
            f"ratio = plain time / phase time (target: dispatch_ratio >= 0.7):\n\n"
            f"{format_table(summaries, summary_keys)}\n")
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"ep_{backend}_{world}ranks"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
        stem.with_suffix(".md").write_text(f"```text\n{text}```\n")


def committed_results(directory: Path | None = None) -> list[dict]:
    """Every committed dispatch result (ep_*.json written by the worker), newest first."""
    # The sweep's and the training's results (ep_sweep_*, ep_train_*) have no summary table.
    return [d for d in committed("ep_*.json", directory) if "summary" in d]


def launch(settings: EPSettings, processes: int, warmup: int = 2, reps: int = 5,
           timeout_s: float = 120.0, placement_map: str = "", chunks: int = 1,
           fail_rank: int = -1, dump: Path | None = None, batches: int = 1,
           slack: float = SLACK) -> dict:
    """Run the dispatch on `processes` local CPU processes (gloo) via torchrun; returns rank 0's JSON.

    Everything is checked before launching; the whole job is killed after `timeout_s` seconds.
    """
    processes = check_int("processes", processes, 1, MAX_CPU_PROCESSES)
    s = replace(settings, ranks=processes).validated()
    checked_map(placement_map, s)
    check_int("warmup", warmup, 0, 100)
    check_int("reps", reps, 1, 1000)
    check_int("chunks", chunks, 1, 64)
    check_int("batches", batches, 1, 16)
    check_float("slack", slack, 0.0, 1000.0)
    check_bytes("dispatch working set (all processes)",
                processes * working_set_bytes(s, batches, slack, chunks))
    with tempfile.TemporaryDirectory(prefix="ep_dispatch_") as tmp:
        args = ["--experts", str(s.experts), "--top-k", str(s.top_k), "--tokens", str(s.tokens),
               "--d-model", str(s.d_model), "--dtype", s.dtype, "--placement", s.placement,
               "--replicas", str(s.replicas), "--router", s.router, "--zipf", str(s.zipf),
               "--hot-share", str(s.hot_share), "--seed", str(s.seed), "--warmup", str(warmup),
               "--reps", str(reps), "--warmup-s", "0", "--chunks", str(chunks), "--batches", str(batches),
               "--slack", str(slack), "--backend", "gloo", "--timeout", str(max(5.0, timeout_s / 2)),
               "--map", placement_map, "--out", tmp, "--fail-rank", str(fail_rank)] + (["--dump", str(dump)] if dump else [])
        torchrun("engine.ep_dispatch", args, processes, timeout_s, "dispatch")
        return json.loads((Path(tmp) / f"ep_gloo_{processes}ranks.json").read_text())


if __name__ == "__main__":
    worker()
