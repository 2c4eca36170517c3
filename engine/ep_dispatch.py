"""The expert-parallel dispatch benchmark's job: the torchrun worker and its launcher.

Every process measures the layer on its rank (engine.ep_measure) for each (tokens, chunks) and
rank 0 writes the report (engine.ep_report):

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.ep_dispatch \
        --tokens 1024 --d-model 1024 --out DIR

Backend: gloo on CPU, NCCL on CUDA (one GPU per local rank). A rank that dies makes the others fail
within `--timeout` seconds (process-group timeout; gloo also runs a monitored barrier first), and
torchrun tears the job down. `launch()` runs this from Python with a bounded wall time.

Pure torch and stdlib: the GPU box runs it without pandas or streamlit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from engine.cuda_graphs import GRAPH_LIMIT, release_all
from engine.ep_launch import (MAX_CPU_PROCESSES, add_job_arguments, committed, in_group, init_group,
                              torchrun)
# expert_gains and reference_layer are imported from here by the tests, as before the split.
from engine.ep_measure import expert_gains, measure, reference_layer, working_set_bytes  # noqa: F401
from engine.ep_placement import Placement, parse_placement
from engine.ep_report import PHASES, environment, format_table, median_round, summarize
from engine.ep_sections import SLACK
from engine.ep_settings import DTYPES, EPSettings
from engine.validation import MAX_BYTES, check_bytes, check_float, check_int


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
    with in_group(release_all):
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
