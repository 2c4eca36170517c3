"""One rank's measurement of the expert-parallel layer (engine.ep_layer) on torch.distributed.

Every rank makes its tokens and routing (engine.ep_settings.rank_batch) and runs the layer:
dispatch (counts and rows to the experts), experts (each received row times its expert's gain),
combine (rows back, gate-weighted sum per token). With chunks M the tokens go in M micro-batches
whose exchanges overlap; with batches B the calls cycle through B batches, so that each call's
routing differs from the last one's (the layer sizes its main exchange from the last calls'
counts; see engine.ep_layer).

The dispatch, the combine and the whole layer are each timed next to a plain all_to_all_single of
exactly the rows that cross ranks (the layer's split sizes with a rank's own set to 0, as the layer
moves those locally; one way, one way back, both ways) in the same run; ratio = plain time / phase
time on the slowest rank (engine.ep_report). The issue's bandwidth target is the dispatch's ratio.

Pure torch and stdlib: the GPU box runs it without pandas or streamlit.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from engine.ep_layer import GRAPH_MAX_BYTES, ExpertParallelLayer
from engine.ep_placement import Placement
from engine.ep_sections import SLACK, Dispatched, Splits
from engine.ep_settings import DTYPES, EPSettings, make_placement, rank_batch, token_features
from engine.timing import gpu_work, time_fn


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
