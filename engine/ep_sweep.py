"""The dispatch and combine against the wire: a sweep over the bytes each rank sends.

For every payload size P (bytes of the (token, slot) rows one rank sends, its own rows included)
the worker times, in one run and on every rank (engine.ep_measure.measure for the last three):

- even: NCCL's own all-to-all as nccl-tests' alltoall_perf measures it, all_to_all_single of P
  bytes in R equal parts (a rank's own part included);
- plain: all_to_all_single of exactly the layer's rows that cross ranks (the yardstick of the
  dispatch's ratio), and the same back for the combine;
- dispatch and combine of engine.ep_layer on a DeepSeek-V3-like layer (256 experts, k 8,
  d_model 7168, bf16, softmax top-k routing) with as many tokens as make P.

Algorithm bandwidth = P / time; bus bandwidth = the bytes that leave the GPU / time, which is
(R - 1) / R of P for the even exchange (nccl-tests' busBw for all-to-all) and the measured
off-rank bytes for the others (about the same for routing this even). The slowest rank counts.
NVLink 4 (H100, H200) carries 450 GB/s per direction, the line a bus bandwidth can approach.

    NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        -m engine.ep_sweep --out benchmarks/results

--decode adds the decoding case (128 tokens per rank) beside the published figures of DeepEP
and pplx-kernels (PUBLISHED). On CPU (gloo) it checks the plumbing at small sizes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch
import torch.distributed as dist

from engine.cuda_graphs import GRAPH_LIMIT
from engine.ep_launch import add_job_arguments, committed, in_group, init_group
from engine.ep_measure import measure, working_set_bytes
from engine.ep_report import environment, format_table
from engine.ep_settings import EPSettings
from engine.timing import time_fn
from engine.validation import MAX_BYTES, check_bytes, check_float, check_int

NVLINK_GBPS = 450.0  # NVLink 4 on H100 / H200: 18 links x 25 GB/s, per direction
DEFAULT_MB = "1,2,4,8,16,32,64,128,256"
DECODE_TOKENS = 128

# Published latencies for scale (microseconds), 128 tokens per rank, hidden 7168, top-8.
PUBLISHED = [
    {"source": "DeepEP V1 low-latency kernels, docs/legacy.md (github.com/deepseek-ai/DeepEP)",
     "setting": "8 ranks, H800 with pure RDMA (CX7 400 Gb/s), FP8 dispatch, BF16 combine",
     "dispatch_us": 77.0, "combine_us": 114.0},
    {"source": "pplx-kernels README, Benchmark Results, 128 tok per GPU "
               "(github.com/perplexityai/pplx-kernels)",
     "setting": "EP8 over NVLink (one node); the README does not state the shape beside the table",
     "dispatch_us": 83.6, "combine_us": 102.3},
]


def sweep_settings(payload_bytes: float, base: EPSettings) -> EPSettings:
    """The layer of the sweep with as many tokens as make `payload_bytes` of rows per rank."""
    tokens = max(1, round(payload_bytes / (base.top_k * base.row_bytes)))
    return EPSettings(**{**asdict(base), "tokens": tokens}).validated()


def even_ms(payload_bytes: int, world: int, device: torch.device, warmup: int, reps: int) -> float:
    """Median ms of all_to_all_single of `payload_bytes` per rank in R equal parts."""
    part = max(1, payload_bytes // world)
    send = torch.empty(part * world, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    dist.barrier()
    return time_fn(lambda: dist.all_to_all_single(recv, send), device, warmup, reps).median_ms


def point(s: EPSettings, rank: int, world: int, device: torch.device, args: argparse.Namespace
          ) -> dict:
    """This rank's times and bytes at one size."""
    payload = s.tokens * s.top_k * s.row_bytes
    row = measure(s, rank, device, args.warmup, args.reps, warmup_s=args.warmup_s,
                  batches=args.batches)
    return {"tokens": s.tokens, "payload_bytes": payload,
            "even_ms": even_ms(payload, world, device, args.warmup, args.reps),
            **{k: row[k] for k in ("dispatch_ms", "plain_dispatch_ms", "combine_ms",
                                   "plain_combine_ms", "max_abs_err")},
            # Bytes this rank sent off-rank in the timed dispatches (their mean over the batches)
            # and in the timed combine (one kept batch's): measure's GB/s times its ms.
            "off_rank_bytes": row["dispatch_GBps"] * row["dispatch_ms"] * 1e6,
            "combine_off_rank_bytes": row["combine_GBps"] * row["combine_ms"] * 1e6}


def summarize(rows: list[dict], world: int) -> dict:
    """One size over the ranks: the slowest rank's times, bandwidths (GB/s), ratios."""
    out = {"tokens": rows[0]["tokens"], "payload_MB": rows[0]["payload_bytes"] / 1e6,
           "max_abs_err": max(r["max_abs_err"] for r in rows)}
    off = max(r["off_rank_bytes"] for r in rows)
    back = max(r["combine_off_rank_bytes"] for r in rows)
    wire = {"even": rows[0]["payload_bytes"] * (world - 1) / world, "plain_dispatch": off,
            "dispatch": off, "plain_combine": back, "combine": back}
    for name, bus_bytes in wire.items():
        ms = max(r[f"{name}_ms"] for r in rows)
        out[f"{name}_ms"] = ms
        out[f"{name}_algbw_GBps"] = rows[0]["payload_bytes"] / ms / 1e6
        out[f"{name}_busbw_GBps"] = bus_bytes / ms / 1e6
    out["dispatch_ratio"] = out["plain_dispatch_ms"] / out["dispatch_ms"]
    out["combine_ratio"] = out["plain_combine_ms"] / out["combine_ms"]
    return out


def build_parser() -> argparse.ArgumentParser:
    """Sizes, the layer's shape and the timing."""
    p = argparse.ArgumentParser(description="EP bandwidth sweep worker (run under torchrun)")
    p.add_argument("--mb", default=DEFAULT_MB, help="payload per rank in MB (1e6 bytes), a list")
    p.add_argument("--decode", action="store_true",
                   help=f"also the decoding case: {DECODE_TOKENS} tokens per rank")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--d-model", type=int, default=7168)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batches", type=int, default=4)
    add_job_arguments(p, 120.0, "directory for ep_sweep_<backend>_<N>ranks.json")
    return p


def parse_sizes(text: str) -> list[float]:
    """'1,2,4' -> [1e6, 2e6, 4e6] bytes; ValueError naming --mb otherwise."""
    try:
        sizes = [float(t) * 1e6 for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--mb must be a comma list of numbers, got {text!r}") from None
    if not sizes:
        raise ValueError("--mb must list at least one size")
    for b in sizes:
        check_float("--mb", b / 1e6, 0.0, 4096.0, lo_open=True)
    return sizes


def worker(argv: list[str] | None = None) -> None:
    """Entry point of every torchrun process; rank 0 prints the table and writes the JSON."""
    args = build_parser().parse_args(argv)
    rank, world, device = init_group(args.backend, args.timeout, args.fail_rank,
                                     high_priority=True)
    with in_group():
        check_int("--reps", args.reps, 1, 1000)
        check_int("--batches", args.batches, 1, 16)
        base = EPSettings(experts=args.experts, ranks=world, top_k=args.top_k, tokens=1,
                          d_model=args.d_model, dtype=args.dtype, router="topk").validated()
        points = [("sweep", sweep_settings(b, base)) for b in parse_sizes(args.mb)]
        if args.decode:
            points.append(("decode", EPSettings(**{**asdict(base), "tokens": DECODE_TOKENS})))
        limit = int(0.8 * torch.cuda.get_device_properties(device).total_memory) \
            if device.type == "cuda" else MAX_BYTES
        graphs = GRAPH_LIMIT if device.type == "cuda" else 0
        for _, s in points:  # refused before anything is allocated
            check_bytes(f"--mb {s.tokens * s.top_k * s.row_bytes / 1e6:g}: working set per rank",
                        working_set_bytes(s, args.batches, graphs=graphs), limit)
        summaries = []
        for case, s in points:
            rows: list[dict] = [{}] * world
            dist.all_gather_object(rows, point(s, rank, world, device, args))
            summaries.append({"case": case, **summarize(rows, world)})
        if rank == 0:
            _report(args, world, device, base, summaries)


def _report(args: argparse.Namespace, world: int, device: torch.device, base: EPSettings,
            summaries: list[dict]) -> None:
    doc = {"kind": "ep_sweep", "backend": dist.get_backend(), "world": world,
           **environment(device), "nvlink_GBps": NVLINK_GBPS,
           "settings": {k: v for k, v in asdict(base).items() if k not in ("tokens", "ranks")},
           "sweep": summaries, "published": PUBLISHED if args.decode else []}
    keys = ["case", "payload_MB", "tokens", "even_busbw_GBps", "plain_dispatch_busbw_GBps",
            "dispatch_busbw_GBps", "combine_busbw_GBps", "dispatch_ratio", "combine_ratio",
            "dispatch_ms", "combine_ms", "max_abs_err"]
    print(f"EP bandwidth sweep, {doc['backend']}, {world} ranks, {doc['device']}, {doc['date']}, "
          f"torch {doc['torch']}, NCCL {doc['nccl']}; GB/s = 1e9 bytes/s, slowest rank\n"
          f"{format_table(summaries, keys)}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"ep_sweep_{doc['backend']}_{world}ranks.json").write_text(
            json.dumps(doc, indent=2))


def committed_sweeps() -> list[dict]:
    """Every committed result (ep_sweep_*.json), newest first."""
    return committed("ep_sweep_*.json")

if __name__ == "__main__":
    worker()
