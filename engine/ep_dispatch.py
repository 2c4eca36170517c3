"""A real expert-parallel MoE layer on torch.distributed, launched with torchrun.

Every rank makes its tokens and routing (engine.expert_parallel.rank_batch), then per layer:
dispatch: tally its (token, slot) pairs per physical expert slot and exchange the counts with
all_to_all_single (the layer's one host sync), group the pairs' rows by slot into a send buffer
(on CUDA while the counts travel), then send the rows to their experts;
experts: each rank multiplies every received row by its expert's gain; combine: rows go back and
each token's output is the gate-weighted sum of its returned rows, weighted at the sender (the
weights never travel) in one gather-and-sum (engine.ep_combine), no atomic adds. With --chunks M the
tokens go in M micro-batches whose exchanges are asynchronous, so one chunk's placing, experts and
combine overlap another's transfer.

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
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from engine import ep_place
from engine.ep_combine import weighted_rows_sum
from engine.expert_parallel import (DTYPES, EPSettings, Placement, destinations, make_placement,
                                    parse_placement, rank_batch, token_features)
from engine.timing import time_fn
from engine.validation import MAX_BYTES, check_bytes, check_int

ROOT = Path(__file__).resolve().parents[1]
MAX_CPU_PROCESSES = 8


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


@dataclass(frozen=True)
class Splits:
    """Rows this rank sends to / receives from every rank in the dispatch (combine: reversed)."""

    send: list[int]
    recv: list[int]


@dataclass
class Dispatched:
    """One layer call in flight on this rank: what the dispatch received and how to put it back.

    Pairs p = t * k + j are grouped by (chunk, slot), with this rank's own slots after every other
    rank's and the empty pairs last, so chunk m's pairs sit at positions bounds[m] * k ..
    bounds[m + 1] * k of `buf`: first the rows for the other ranks, rank by rank (all_to_all_single
    sends them), then this rank's own rows (they never go through NCCL), then the empty pairs.
    rows[m] receives chunk m's rows from the other ranks (grouped by source rank, then by this
    rank's slot); the combine returns them into `buf`, where the own rows already are.
    """

    tokens: int
    bounds: list[int]
    send: list[list[int]]  # [chunk][rank] rows sent in the dispatch (own rank included)
    recv: list[list[int]]  # [chunk][rank] rows received
    recv_counts: torch.Tensor  # (R, chunks, my slots) rows received per source rank and slot,
    # on the layer's device (a pageable host-to-device copy in the experts would sync the host)
    position: torch.Tensor  # (T * k,) int64 position of every pair's row in buf
    buf: torch.Tensor  # (T * k, D) the pairs' rows, grouped (the combine's return buffer too)
    rows: list[torch.Tensor]  # [chunk] (rows received from the other ranks, D)
    works: list[dist.Work | None]  # [chunk] pending all_to_all into rows[m], None once done

    def splits(self) -> Splits:
        """Rows sent to / received from each rank in the dispatch, all chunks together."""
        return Splits([sum(c) for c in zip(*self.send)], [sum(c) for c in zip(*self.recv)])

    def own_rows(self, m: int, rank: int) -> torch.Tensor:
        """Chunk m's rows for this rank's own experts (a view of buf), grouped by slot."""
        lo = self.bounds[m] * self.k + sum(self.send[m]) - self.send[m][rank]
        return self.buf[lo:lo + self.send[m][rank]]

    @property
    def k(self) -> int:
        """Slots per token."""
        return self.position.numel() // self.tokens

    def wait(self, m: int) -> torch.Tensor:
        """Chunk m's rows from the other ranks, once they are in place (the own rows already are,
        for work queued after dispatch() returned)."""
        if self.works[m] is not None:
            self.works[m].wait()
            self.works[m] = None
        return self.rows[m]


@dataclass(frozen=True)
class _Layout:
    """Index tensors of one (token count, k), built once: see ExpertParallelLayer._layout."""

    bounds: list[int]
    chunk_key: torch.Tensor | None  # (T, 1) sort-key offset of every token's chunk; None: 1 chunk
    ones: torch.Tensor  # (T * k,) int32 ones, what index_add_ adds per pair
    tally: torch.Tensor  # (chunks * (P + 1),) int32 pairs per sort key, refilled every call
    cursor: torch.Tensor  # like tally: each key's range end in the send buffer, counted down (CUDA)
    slot_keys: torch.Tensor  # (chunks * P,) keys of the real slots, grouped by destination rank
    meta: torch.Tensor  # (chunks * P + R * chunks * my slots,) counts sent, then counts received
    host: torch.Tensor  # meta's copy on the host (pinned on CUDA; meta itself on CPU)


class ExpertParallelLayer:
    """One MoE layer's dispatch, experts and combine for this rank over the default process group.

    dispatch(): tally the pairs per slot, exchange the counts (the layer's one host sync), group
    the rows by slot in a send buffer and send them to their experts. experts(): each received
    row times its expert's gain. combine(): rows back, each scaled by its gate weight at the
    sender (the weights never travel) and summed per token in one gather (engine.ep_combine), no
    atomics.
    chunks: the tokens are cut into this many micro-batches whose exchanges run asynchronously,
    so one chunk's placing, expert work and combine overlap another's transfer (NCCL runs on its
    own stream). 1 is the plain sequential layer; the result is the same.

    Rows for this rank's own experts never go through NCCL: they come after the other ranks'
    rows in the send buffer, are placed while those travel, and are already where the combine
    needs them. The planning is written for few launches, as it is bound by the host at small
    token counts: the counts are tallied from the unsorted keys, so their exchange starts at
    once; on CUDA the rows are then placed in the send buffer on a side stream by one Triton
    kernel per chunk for the other ranks' rows and one for the own rows (engine.ep_place,
    instead of a sort and a gather), during the counts exchange and the host sync; after the
    sync the transfers are launched before any bookkeeping. The worker gives NCCL high-priority
    streams so that transfers are not queued behind the placing of this rank's own rows.
    """

    def __init__(self, placement: Placement, gains: torch.Tensor, rank: int, device: torch.device,
                 chunks: int = 1) -> None:
        self.rank, self.world, self.device = rank, placement.num_ranks, device
        self.chunks = check_int("chunks", chunks, 1, 64)
        self.slots_per_rank = [len(s) for s in placement.slots]
        p_count = self.num_slots = sum(self.slots_per_rank)
        # First physical slot of every rank (slots are numbered rank by rank), and past the last.
        self.slot_start = [sum(self.slots_per_rank[:r]) for r in range(self.world + 1)]
        # Sort position of every physical slot: the other ranks' slots in rank order, then this
        # rank's own; position P (empty pairs, and the table's -1 padding) sorts last.
        own = range(self.slot_start[rank], self.slot_start[rank + 1])
        self.sort_slot = [0] * p_count
        for i, slot in enumerate([s for s in range(p_count) if s not in own] + list(own)):
            self.sort_slot[slot] = i
        # int32 keys: index_add_ takes them as indices, and the radix sort makes 4 passes, not 8.
        table, copies = placement.replica_table(empty=p_count)
        lookup = torch.tensor(self.sort_slot + [p_count], dtype=torch.int32)
        self.replicas = (lookup[table].to(device), copies.to(device))
        self.my_experts = torch.tensor(placement.slots[rank], dtype=torch.int64, device=device)
        # On the device: a list index would be copied from pageable memory, syncing the host.
        self.other_ranks = torch.tensor([r for r in range(self.world) if r != rank], dtype=torch.int64,
                                        device=device)
        self.gains = gains.to(device)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._layouts: dict[tuple[int, int], _Layout] = {}

    def _layout(self, t_count: int, k: int) -> _Layout:
        """Chunk bounds and the tensors that tally keys into counts, per (token count, k).

        Sort key of a pair: chunk * (P + 1) + its slot's sort position.
        """
        if (t_count, k) not in self._layouts:
            m_count, p1, dev, w = min(self.chunks, t_count), self.num_slots + 1, self.device, self.world
            first = self.slot_start
            chunk_key = (torch.arange(t_count, device=dev) * m_count // t_count * p1)[:, None]
            # Counts go rank by rank: every chunk's counts for rank r's slots, then rank r + 1's.
            slot_keys = [m * p1 + self.sort_slot[s] for r in range(w) for m in range(m_count)
                         for s in range(first[r], first[r + 1])]
            meta = torch.empty(m_count * (self.num_slots + w * self.slots_per_rank[self.rank]),
                               dtype=torch.int32, device=dev)
            self._layouts[t_count, k] = _Layout(
                [-(-m * t_count // m_count) for m in range(m_count + 1)],
                chunk_key.to(torch.int32) if m_count > 1 else None,
                torch.ones(t_count * k, dtype=torch.int32, device=dev),
                torch.empty(m_count * p1, dtype=torch.int32, device=dev),
                torch.empty(m_count * p1, dtype=torch.int32, device=dev),
                torch.tensor(slot_keys, dtype=torch.int64, device=dev),
                meta, meta if dev.type == "cpu" else torch.empty_like(meta, device="cpu").pin_memory())
        return self._layouts[t_count, k]

    def off_rank(self, sizes: list[int]) -> list[int]:
        """Split sizes for NCCL: this rank's own entry is 0, its rows are moved locally."""
        return [0 if r == self.rank else n for r, n in enumerate(sizes)]

    def _sizes(self, counts: list[int], m_count: int) -> tuple[list[list[int]], list[list[int]]]:
        """Rows sent to / received from each rank per chunk, [chunk][rank], from the exchanged
        counts (sent ones grouped [rank][chunk][its slots], then received [rank][chunk][my slots])."""
        w, mine = self.world, self.slots_per_rank[self.rank]
        send, recv, i = [[0] * w for _ in range(m_count)], [[0] * w for _ in range(m_count)], 0
        for sizes, per_rank in ((send, self.slots_per_rank), (recv, [mine] * w)):
            for r, n in enumerate(per_rank):
                for m in range(m_count):
                    sizes[m][r] = sum(counts[i:i + n])
                    i += n
        return send, recv

    def _place(self, x: torch.Tensor, key: torch.Tensor, lay: _Layout, position: torch.Tensor,
               buf: torch.Tensor, tallied: torch.cuda.Event | None) -> list[torch.cuda.Event | None]:
        """Group the pairs by key (T * k,) into the send buffer: buf[position[p]] = x[p // k].

        x must be contiguous and stay alive until the side stream is joined. Fills position
        (T * k,) and buf (T * k, D); returns per chunk the event after which its rows for the
        other ranks are in buf (None: they already are). With Triton on CUDA the rows are placed
        on the side stream (engine.ep_place) once `tallied` has passed, every chunk's rows for
        the other ranks first, then this rank's own; elsewhere by a stable sort and a gather on
        this stream.
        """
        k = key.numel() // x.shape[0]
        if tallied is None or not ep_place.available(x):
            order = torch.sort(key, stable=True).indices
            position.scatter_(0, order, torch.arange(key.numel(), device=key.device))
            torch.index_select(x, 0, order // k, out=buf)
            return [None] * (len(lay.bounds) - 1)
        p1, others = self.num_slots + 1, self.num_slots - self.slots_per_rank[self.rank]
        self.side.wait_event(tallied)
        events = []
        with torch.cuda.stream(self.side):
            torch.cumsum(lay.tally, 0, dtype=torch.int32, out=lay.cursor)
            for lo, hi in zip(lay.bounds, lay.bounds[1:]):
                ep_place.place_rows(x, key, lay.cursor, position, buf, lo * k, hi * k, p1, 0, others)
                events.append(self.side.record_event())
            ep_place.place_rows(x, key, lay.cursor, position, buf, 0, key.numel(), p1, others, p1)
        return events

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor,
                 token_index: torch.Tensor) -> Dispatched:
        """Start sending x's rows (T, D) to their experts (experts (T, k), token_index (T,));
        every chunk's transfer is in flight on return."""
        # Made contiguous before the side stream's event, and held until that stream is joined:
        # the side stream reads it.
        x = x.contiguous()
        t_count, k = experts.shape
        lay = self._layout(t_count, k)
        m_count, w, mine, me = len(lay.bounds) - 1, self.world, self.slots_per_rank[self.rank], self.rank
        key = destinations(experts, token_index, self.replicas)
        if lay.chunk_key is not None:
            key = key + lay.chunk_key
        key = key.view(-1)
        # Counts per physical slot, tallied from the unsorted keys, go to the slot's rank, so the
        # receiver knows which of its experts every row is for and expert ids never travel.
        lay.tally.zero_().index_add_(0, key, lay.ones)
        n_send = lay.slot_keys.numel()
        torch.index_select(lay.tally, 0, lay.slot_keys, out=lay.meta[:n_send])
        # Both are read on this stream later, so they are allocated on it, before the event
        # after which the side stream may write them.
        position = torch.empty(key.numel(), dtype=torch.int64, device=key.device)
        buf = x.new_empty(key.numel(), x.shape[1])
        tallied = None if self.side is None else torch.cuda.current_stream(self.device).record_event()
        work = dist.all_to_all_single(lay.meta[n_send:], lay.meta[:n_send], [m_count * mine] * w,
                                      [m_count * n for n in self.slots_per_rank], async_op=True)
        work.wait()
        if lay.host is not lay.meta:  # the counts' copy is queued before the rows are placed
            lay.host.copy_(lay.meta, non_blocking=True)
        placed = self._place(x, key, lay, position, buf, tallied)
        if lay.host is not lay.meta:
            # Wait for this stream alone: with Triton the rows are still placed on the side stream.
            torch.cuda.current_stream(self.device).synchronize()  # the host sync
        counts = lay.host.tolist()
        send, recv = self._sizes(counts, m_count)
        rows, works = [], []
        for m in range(m_count):  # the transfers first: everything after the sync is exposed
            lo, n = lay.bounds[m] * k, sum(send[m]) - send[m][me]
            if n and placed[m] is not None:
                torch.cuda.current_stream(self.device).wait_event(placed[m])
            rows.append(x.new_empty(sum(recv[m]) - recv[m][me], x.shape[1]))
            works.append(dist.all_to_all_single(rows[m], buf[lo:lo + n], self.off_rank(recv[m]),
                                                self.off_rank(send[m]), async_op=True))
        if self.side is not None:
            # Later work on this stream (experts, combine, and new allocations in blocks the
            # side stream still reads, such as the freed keys) waits for every row to be placed;
            # the transfers above were queued before and wait only for theirs.
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        return Dispatched(t_count, lay.bounds, send, recv,
                          lay.meta[n_send:].view(w, m_count, mine).clone(), position, buf, rows,
                          works)

    def experts(self, d: Dispatched, m: int) -> None:
        """Chunk m's experts, in place: every received row and own row times its expert's gain."""
        gains = self.gains.to(d.buf.dtype)
        for rows, counts in ((d.wait(m), d.recv_counts.index_select(0, self.other_ranks)[:, m]),
                             (d.own_rows(m, self.rank), d.recv_counts[self.rank, m])):
            row_expert = self.my_experts.repeat(counts.numel() // self.my_experts.numel()) \
                .repeat_interleave(counts.reshape(-1), output_size=rows.shape[0])
            rows.mul_(gains[row_expert][:, None])

    def combine(self, d: Dispatched, weights: torch.Tensor, run_experts: bool = False
                ) -> torch.Tensor:
        """Every chunk back and summed per token with its gate weights (T, k); output (T, D).

        Returned rows land at their pairs' positions in d.buf, beside the own rows;
        empty pairs' rows are zeroed. run_experts: apply each chunk's experts just before
        sending it back (the whole layer).
        """
        k, me, back = d.k, self.rank, d.buf
        works = []
        for m in range(len(d.rows)):  # chunk m goes back while later chunks still arrive
            if run_experts:
                self.experts(d, m)
            rows, lo = d.wait(m), d.bounds[m] * k
            n = sum(d.send[m]) - d.send[m][me]
            works.append(dist.all_to_all_single(back[lo:lo + n], rows, self.off_rank(d.send[m]),
                                                self.off_rank(d.recv[m]), async_op=True))
            back[lo + sum(d.send[m]):d.bounds[m + 1] * k].zero_()
        position = d.position.view(d.tokens, k)  # where every pair's returned row is
        outs = []
        for m, work in enumerate(works):  # sum chunk m while later chunks still return
            work.wait()
            lo, hi = d.bounds[m], d.bounds[m + 1]
            outs.append(weighted_rows_sum(back, position[lo:hi], weights[lo:hi]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                 token_index: torch.Tensor) -> tuple[torch.Tensor, Splits]:
        """MoE output for this rank's tokens: x (T, D), experts/weights (T, k), token_index (T,).

        Returns the output (T, D) in x's dtype and the total rows sent to / received from each rank.
        """
        d = self.dispatch(x, experts, token_index)
        return self.combine(d, weights, run_experts=True), d.splits()


def plain_exchange(send_buf: torch.Tensor, recv_buf: torch.Tensor, splits: Splits,
                   there: bool = True, back: bool = True) -> None:
    """all_to_all_single of a payload, nothing else (the yardstick): `splits` there (the
    dispatch's way), back, or both; send_buf (sum(send), D), recv_buf (sum(recv), D)."""
    if there:
        dist.all_to_all_single(recv_buf, send_buf, splits.recv, splits.send)
    if back:
        dist.all_to_all_single(send_buf, recv_buf, splits.send, splits.recv)


def working_set_bytes(settings: EPSettings) -> int:
    """Estimated peak bytes of one rank: tokens, output, pair rows (sent, received, returned,
    one dispatch kept for the combine's timing, the plain exchange's two buffers), index tensors."""
    pairs = settings.tokens * settings.top_k
    return settings.row_bytes * (2 * settings.tokens + 6 * pairs) + 64 * pairs


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


def measure(settings: EPSettings, rank: int, device: torch.device, warmup: int, reps: int,
            dump: Path | None = None, placement: Placement | None = None, chunks: int = 1,
            warmup_s: float = 0.0) -> dict:
    """Run and time the layer and its dispatch and combine phases on this rank, each next to a
    plain all_to_all_single of the rows that cross ranks (the layer's splits, own rank's set to 0);
    returns this rank's row (plain values, ms, MB).

    placement: a fixed one (e.g. parsed from --map), else built from settings and global loads.
    warmup_s: seconds of untimed layer calls first (see warm_up), besides `warmup` calls per timing.
    """
    s = settings
    ids, experts, weights = rank_batch(s, rank, device)
    counts = torch.bincount(experts[experts >= 0], minlength=s.experts)
    dist.all_reduce(counts)  # global loads, as EPLB collects them, for the greedy placement
    placement = placement or make_placement(s, counts.cpu())
    x = token_features(ids, s.d_model, s.seed, DTYPES[s.dtype])
    token_index = rank * s.tokens + torch.arange(s.tokens, device=device)
    gains = expert_gains(s.experts, s.seed)
    layer = ExpertParallelLayer(placement, gains, rank, device, chunks)

    def dispatch_phase() -> Dispatched:
        d = layer.dispatch(x, experts, token_index)
        for m in range(len(d.rows)):
            d.wait(m)
        return d

    warm_up(lambda: layer(x, experts, weights, token_index), device, warmup_s)
    out, splits = layer(x, experts, weights, token_index)
    d = dispatch_phase()  # kept: the combine phase sends these expert outputs back every rep
    for m in range(len(d.rows)):
        layer.experts(d, m)
    reference = reference_layer(x, experts, weights, gains).float()
    # Both paths (whole layer, and phases run apart) must give the reference's output.
    err = max(float((o.float() - reference).abs().max()) for o in (out, layer.combine(d, weights)))
    if dump is not None:
        torch.save({"ids": ids.cpu(), "experts": experts.cpu(), "weights": weights.cpu(),
                    "out": out.cpu(), "send": splits.send}, dump / f"rank{rank}.pt")
    # The yardstick moves the same bytes over the wire: the own rows stay out of it, as they
    # stay out of the layer's exchanges (with them NCCL also copies them locally).
    wire = Splits(layer.off_rank(splits.send), layer.off_rank(splits.recv))
    send_buf = x.new_empty(sum(wire.send), s.d_model)
    recv_buf = x.new_empty(sum(wire.recv), s.d_model)
    runs = {"layer": (lambda: layer(x, experts, weights, token_index),
                      lambda: plain_exchange(send_buf, recv_buf, wire)),
            "dispatch": (dispatch_phase, lambda: plain_exchange(send_buf, recv_buf, wire, back=False)),
            "combine": (lambda: layer.combine(d, weights),
                        lambda: plain_exchange(send_buf, recv_buf, wire, there=False))}
    row = {"rank": rank, "tokens": s.tokens, "chunks": chunks, "pairs_sent": splits.send}
    for name, (phase, plain) in runs.items():
        for label, fn in ((name, phase), (f"plain_{name}", plain)):
            dist.barrier()
            t = time_fn(fn, device, warmup, reps)
            row[f"{label}_ms"], row[f"{label}_p10_ms"], row[f"{label}_p90_ms"] = \
                t.median_ms, t.p10_ms, t.p90_ms
    there = (sum(splits.send) - splits.send[rank]) * s.row_bytes  # off-rank bytes sent, dispatch
    back = (sum(splits.recv) - splits.recv[rank]) * s.row_bytes  # and combine
    row.update({"off_rank_MB": (there + back) / 1e6,
                "dispatch_GBps": there / row["dispatch_ms"] / 1e6,
                "plain_dispatch_GBps": there / row["plain_dispatch_ms"] / 1e6,
                "combine_GBps": back / row["combine_ms"] / 1e6,
                "layer_GBps": (there + back) / row["layer_ms"] / 1e6,
                "plain_GBps": (there + back) / row["plain_layer_ms"] / 1e6, "max_abs_err": err})
    return row


def summarize(rows: list[dict]) -> dict:
    """One configuration: per phase the slowest rank's time, its plain exchange's slowest time and
    ratio = plain / phase (1 = as fast as the bare all_to_all_single; the target is dispatch's)."""
    out = {"tokens": rows[0]["tokens"], "chunks": rows[0]["chunks"]}
    for name in PHASES:
        phase = max(r[f"{name}_ms"] for r in rows)
        plain = max(r[f"plain_{name}_ms"] for r in rows)
        out.update({f"{name}_ms": phase, f"plain_{name}_ms": plain, f"{name}_ratio": plain / phase})
    out["max_abs_err"] = max(r["max_abs_err"] for r in rows)
    return out


def median_round(rounds: list[dict]) -> dict:
    """The summary of the round with the median dispatch ratio (the lower middle one for an even
    count), with every round's dispatch ratio in `dispatch_ratio_rounds`.

    A round measures a configuration afresh. On the lent machines the host of one rank at times
    ran about 1.8x slower for a whole round (every host step slower, the other ranks waiting in
    the host sync), which at 8k-16k tokens halved the round's dispatch ratio.
    """
    ranked = sorted(rounds, key=lambda r: r["dispatch_ratio"])
    return {**ranked[(len(ranked) - 1) // 2],
            "dispatch_ratio_rounds": [r["dispatch_ratio"] for r in rounds]}


def _print_table(rows: list[dict], keys: list[str]) -> str:
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
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--warmup-s", type=float, default=2.0,
                   help="seconds of untimed layer calls per configuration before timing")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times afresh; report the round "
                        "with the median dispatch ratio")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--timeout", type=float, default=120.0, help="process-group timeout, seconds")
    p.add_argument("--out", type=Path, help="directory for ep_<backend>_<N>ranks.json and .md")
    p.add_argument("--dump", type=Path, help="directory for each rank's tensors (tests)")
    p.add_argument("--fail-rank", type=int, default=-1, help="fault injection: this rank exits at once")
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
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=args.timeout)
    if backend == "nccl":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        # High-priority NCCL streams: exchanges get SMs ahead of the placing of own rows.
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
        dist.init_process_group("nccl", timeout=timeout, device_id=device, pg_options=options)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    if rank == args.fail_rank:
        os._exit(3)  # fault injection: die without a word, as a crashed rank would
    if backend == "gloo":  # names the missing rank instead of hanging in the first collective
        dist.monitored_barrier(timeout=timeout)
    try:
        check_int("rounds", args.rounds, 1, 100)
        summaries, per_rank = [], []
        for tokens in parse_ints("tokens", args.tokens):
            s = settings_from_args(args, world, tokens)
            limit = int(0.8 * torch.cuda.get_device_properties(device).total_memory) \
                if device.type == "cuda" else MAX_BYTES
            check_bytes("dispatch working set per rank", working_set_bytes(s), limit)
            for chunks in parse_ints("chunks", args.chunks):
                rounds = []
                for i in range(args.rounds):
                    row = measure(s, rank, device, args.warmup, args.reps, args.dump,
                                  checked_map(args.map, s), chunks, args.warmup_s)
                    rows: list[dict] = [{}] * world
                    dist.all_gather_object(rows, {**row, "round": i})
                    per_rank += rows
                    rounds.append(summarize(rows))
                summaries.append(median_round(rounds))
        if rank == 0:
            _report(args, backend, world, device, s, summaries, per_rank)
    finally:
        dist.destroy_process_group()


def _report(args: argparse.Namespace, backend: str, world: int, device: torch.device,
            settings: EPSettings, summaries: list[dict], per_rank: list[dict]) -> None:
    doc = {"backend": backend, "world": world, **environment(device),
           "settings": {k: v for k, v in asdict(settings).items() if k != "tokens"},
           "summary": summaries, "per_rank": per_rank}
    keys = ["rank", "round", "tokens", "chunks", "off_rank_MB", "dispatch_ms", "plain_dispatch_ms",
            "combine_ms", "plain_combine_ms", "layer_ms", "plain_layer_ms", "dispatch_GBps",
            "plain_dispatch_GBps", "max_abs_err"]
    phases = "\n".join(f"  {name}: {what}" for name, what in PHASES.items())
    summary_keys = ["tokens", "chunks"] + [f"{n}_ratio" for n in PHASES] + \
        [f"{p}{n}_ms" for n in PHASES for p in ("", "plain_")] + ["max_abs_err", "dispatch_ratio_rounds"]
    text = (f"Expert-parallel dispatch, {backend}, {world} ranks, {doc['device']}, {doc['date']}\n"
            f"torch {doc['torch']}, CUDA {doc['cuda']}, NCCL {doc['nccl']}; settings "
            f"{json.dumps(doc['settings'])}\n\nphases, each timed next to a plain all_to_all_single "
            f"of the rows that cross ranks (one way for dispatch and combine, both ways for the "
            f"layer):"
            f"\n{phases}\n\nper rank (GB/s = off-rank bytes sent per second):\n\n"
            f"{_print_table(per_rank, keys)}\n\nslowest rank (max over ranks of each median) in the "
            f"round with the median dispatch ratio of {args.rounds} (every round's ratio last); "
            f"ratio = plain time / phase time (target: dispatch_ratio >= 0.7):\n\n"
            f"{_print_table(summaries, summary_keys)}\n")
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"ep_{backend}_{world}ranks"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
        stem.with_suffix(".md").write_text(f"```text\n{text}```\n")


def committed_results(directory: Path = ROOT / "benchmarks" / "results") -> list[dict]:
    """Every committed dispatch result (ep_*.json written by the worker), newest first."""
    docs = [json.loads(p.read_text()) for p in sorted(directory.glob("ep_*.json"))]
    return sorted(docs, key=lambda d: d.get("date", ""), reverse=True)


class LaunchError(RuntimeError):
    """torchrun failed or exceeded its wall time; the message carries the workers' last output."""


def launch(settings: EPSettings, processes: int, warmup: int = 2, reps: int = 5,
           timeout_s: float = 120.0, placement_map: str = "", chunks: int = 1,
           fail_rank: int = -1, dump: Path | None = None) -> dict:
    """Run the dispatch on `processes` local CPU processes (gloo) via torchrun; returns rank 0's JSON.

    Everything is checked before launching; the whole job is killed after `timeout_s` seconds.
    """
    processes = check_int("processes", processes, 1, MAX_CPU_PROCESSES)
    s = replace(settings, ranks=processes).validated()
    checked_map(placement_map, s)
    check_bytes("dispatch working set (all processes)", processes * working_set_bytes(s))
    check_int("warmup", warmup, 0, 100)
    check_int("reps", reps, 1, 1000)
    check_int("chunks", chunks, 1, 64)
    with tempfile.TemporaryDirectory(prefix="ep_dispatch_") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(processes), "--max-restarts", "0", "-m", "engine.ep_dispatch",
               "--experts", str(s.experts), "--top-k", str(s.top_k), "--tokens", str(s.tokens),
               "--d-model", str(s.d_model), "--dtype", s.dtype, "--placement", s.placement,
               "--replicas", str(s.replicas), "--router", s.router, "--zipf", str(s.zipf),
               "--hot-share", str(s.hot_share), "--seed", str(s.seed), "--warmup", str(warmup),
               "--reps", str(reps), "--warmup-s", "0", "--chunks", str(chunks), "--backend", "gloo", "--timeout", str(max(5.0, timeout_s / 2)),
               "--map", placement_map, "--out", tmp, "--fail-rank", str(fail_rank)] + (["--dump", str(dump)] if dump else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        # Own session: on timeout the whole tree (torchrun and its workers) is killed at once.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise LaunchError(f"dispatch did not finish within {timeout_s:.0f} s:\n{output[-2000:]}")
        if proc.returncode != 0:
            raise LaunchError(f"dispatch failed (torchrun exit {proc.returncode}):\n{output[-2000:]}")
        return json.loads((Path(tmp) / f"ep_gloo_{processes}ranks.json").read_text())


if __name__ == "__main__":
    worker()
