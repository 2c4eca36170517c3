"""One expert-parallel MoE layer on torch.distributed: dispatch, experts and combine on one rank.

dispatch: tally this rank's (token, slot) pairs per physical expert slot and send the counts to
the slots' ranks with all_to_all_single; put every pair's row in a send buffer grouped by slot
(engine.ep_place) and send the rows to their experts with all_to_all_single.
experts: every received row times its expert's gain. combine: the rows go back the same way and
each token's output is the gate-weighted sum of its returned rows, weighted at the sender (the
weights never travel) in one gather-and-sum (engine.ep_combine), no atomic adds.

Split sizes agreed in advance. all_to_all_single needs its split sizes on the host, and the
counts are on the device: waiting for them before sending the rows (a host sync) left the GPU
idle while the host caught up, which bound the dispatch at 8k tokens per rank. So the rows'
exchange does not wait for them. Both ends of every pair of ranks know how many rows the pair
moved in the layer's last call (one sent them, the other received them), and each sizes the
pair's main section from it and the section before (next_section: the rows plus `slack` square
roots of them, kept while routing only jitters), the same number on both ends. The rows go at
once in those sections; the counts' exchange and the host sync happen meanwhile. Rows beyond a
section (routing that moved more than the slack) follow in a second exchange of exactly those
rows, point to point (batch_isend_irecv), after the sync; the first call has no history and
sends everything that way. The combine mirrors both. A section's unused rows travel
as padding: the slack is paid in bytes (the benchmark counts only real rows).

Since the split sizes are known before a call, on CUDA everything the dispatch queues up to the
main exchange, both all_to_all_single calls included, is captured in a CUDA graph once the same
inputs come with the same sections, and replayed from then on (engine.cuda_graphs): the host
then costs one launch per call instead of some 25, and the GPU no longer waits for it. Only for
exchanges up to GRAPH_MAX_BYTES: larger ones take longer than the host's work, and ran slower
from a graph. A replayed dispatch returns with every chunk's main exchange joined to the stream
(a capture must join them), so its chunks' experts no longer overlap the later chunks' transfers.

Rows for this rank's own experts never go through NCCL: they are placed while the others travel
and are already where the combine needs them. chunks: the tokens go in this many micro-batches
whose exchanges run asynchronously, so one chunk's placing, experts and combine overlap another's
transfer; 1 is the plain sequential layer, and the result is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine import ep_place
from engine.cuda_graphs import CapturedCalls
from engine.ep_combine import weighted_rows_sum
from engine.ep_layout import Layout, split_sizes
from engine.ep_placement import Placement, destinations
from engine.ep_sections import SLACK, Dispatched, Sections, Splits, next_section
from engine.validation import check_float, check_int

# The (4, codes) table's last row: rows received per (chunk, source rank) in the main exchange.
RECV_CAP = 3

# The dispatch is replayed from CUDA graphs only while its main exchange moves at most this many
# bytes. On 2x H100 (2026-11-26, back to back, d_model 4096, benchmarks/results/README.md) graphs
# raised the dispatch's ratio at 8k tokens per rank (75 MB) from 0.35-0.54 to 0.72, and at 16k
# (150 MB) from 0.60-0.72 to 0.74. Where the transfer outlasts the host's work anyway they cost:
# 0.73-0.75 against 0.74-0.77 at 32k (290 MB), 0.68-0.69 against 0.70-0.71 at 64k (580 MB).
GRAPH_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Queued:
    """One dispatch's work on the device up to its main exchange, as queued or captured."""

    table: torch.Tensor
    received: torch.Tensor  # (R, chunks, my slots) counts received (a view of the layout's meta)
    position: torch.Tensor
    buf: torch.Tensor
    rows: list[torch.Tensor]
    works: list[dist.Work | None]  # None: already joined to the current stream
    copied: torch.cuda.Event | None  # after the counts' copy to the host; None: on the host


class ExpertParallelLayer:
    """One MoE layer's dispatch, experts and combine for this rank over the default process group
    (see the module docstring).

    The planning is written for few launches, as the dispatch is bound by the host at small token
    counts: the counts are tallied from the unsorted keys; on CUDA the rows are then placed in the
    send buffer on a side stream by one Triton kernel per chunk for the other ranks' rows and one
    for the own rows (engine.ep_place, instead of a sort and a gather). The worker gives NCCL
    high-priority streams so that transfers are not queued behind the placing of the own rows.
    """

    def __init__(self, placement: Placement, gains: torch.Tensor, rank: int, device: torch.device,
                 chunks: int = 1, slack: float = SLACK, graphs: bool = True) -> None:
        self.rank, self.world, self.device = rank, placement.num_ranks, device
        self.chunks = check_int("chunks", chunks, 1, 64)
        self.slack = check_float("slack", slack, 0.0, 1000.0)
        self.slots_per_rank = [len(s) for s in placement.slots]
        p_count = self.num_slots = sum(self.slots_per_rank)
        # First physical slot of every rank (slots are numbered rank by rank), and past the last.
        self.slot_start = [sum(self.slots_per_rank[:r]) for r in range(self.world + 1)]
        # Sort position of every physical slot: the other ranks' slots in rank order, then this
        # rank's own; position P (empty pairs, and the table's -1 padding) sorts last.
        own = range(self.slot_start[rank], self.slot_start[rank + 1])
        order = [s for s in range(p_count) if s not in own] + list(own)
        self.sort_slot = [0] * p_count
        for i, slot in enumerate(order):
            self.sort_slot[slot] = i
        # Destination rank of every sort position (the empty pairs' stay here).
        self.sort_rank = [next(r for r in range(self.world) if s < self.slot_start[r + 1])
                          for s in order] + [rank]
        # int32 keys: index_add_ takes them as indices, and the radix sort makes 4 passes, not 8.
        table, copies = placement.replica_table(empty=p_count)
        lookup = torch.tensor(self.sort_slot + [p_count], dtype=torch.int32)
        self.replicas = (lookup[table].to(device), copies.to(device))
        self.my_experts = torch.tensor(placement.slots[rank], dtype=torch.int64, device=device)
        # On the device: a list index would be copied from pageable memory, syncing the host.
        self.other_ranks = torch.tensor([r for r in range(self.world) if r != rank], dtype=torch.int64,
                                        device=device)
        # Gains by expert id, and 0 for a main section's padding rows (id E).
        self.gains = torch.cat([gains, gains.new_zeros(1)]).to(device)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._layouts: dict[tuple[int, int], Layout] = {}
        # Main-section rows sent to / received from every rank per chunk in the next call with
        # that many chunks (next_section). Not per (T, k): those may differ between ranks (Expert
        # Choice's k does), and both ends of a pair must size it from the same calls. The chunk
        # count is the same on every rank.
        self._caps: dict[int, tuple[list[list[int]], list[list[int]]]] = {}
        # The dispatch's work up to the main exchange, replayed from CUDA graphs (see dispatch).
        self.graphs = CapturedCalls[_Queued]() if graphs and device.type == "cuda" else None
        self.calls = self.overflow_calls = 0  # calls, and calls that sent or received overflow

    def _layout(self, t_count: int, k: int) -> Layout:
        """The index tensors of a (token count, k), built on its first call (Layout.build)."""
        if (t_count, k) not in self._layouts:
            self._layouts[t_count, k] = Layout.build(t_count, k, self.chunks, self.rank,
                                                     self.slot_start, self.sort_slot,
                                                     self.sort_rank, self.device)
        return self._layouts[t_count, k]

    @property
    def replays(self) -> int:
        """Dispatch calls replayed from a CUDA graph."""
        return 0 if self.graphs is None else self.graphs.replays

    def off_rank(self, sizes: list[int]) -> list[int]:
        """Split sizes for NCCL: this rank's own entry is 0, its rows are moved locally."""
        return [0 if r == self.rank else n for r, n in enumerate(sizes)]

    def _sections(self, lay: Layout, k: int) -> Sections:
        """Main sections of this call (none before a call with as many chunks)."""
        m_count = len(lay.bounds) - 1
        send, recv = self._caps.get(m_count, ([[0] * self.world] * m_count,) * 2)
        base = [0]
        for m in range(m_count):
            base.append(base[m] + sum(send[m]) + (lay.bounds[m + 1] - lay.bounds[m]) * k)
        return Sections(send, recv, base)

    def _fill_table(self, lay: Layout, s: Sections, k: int) -> None:
        """ep_place's table per code (chunk m, rank r): main section rows, its first buf row,
        the shift from exact positions to buf rows; then the rows received in the main exchange."""
        cap, main, shift, recv = [], [], [], []
        for m, sizes in enumerate(s.send):
            for r in range(self.world):
                cap.append(sizes[r])
                main.append(s.base[m] + sum(sizes[:r]))
                shift.append(s.spill(m) - lay.bounds[m] * k)
                recv.append(s.recv[m][r])
        lay.table.copy_(torch.tensor([cap, main, shift, recv]))

    def _next_caps(self, s: Sections, moved: tuple[list[list[int]], list[list[int]]]) -> None:
        """The next call's sections from this call's (s) and the rows each pair moved in it."""
        self._caps[len(s.send)] = tuple(
            [self.off_rank([next_section(c, n, self.slack) for c, n in zip(cap, rows)])
             for cap, rows in zip(caps, moved_m)]
            for caps, moved_m in zip((s.send, s.recv), moved))

    def _place(self, x: torch.Tensor, key: torch.Tensor, lay: Layout, table: torch.Tensor,
               position: torch.Tensor, buf: torch.Tensor, tallied: torch.cuda.Event | None
               ) -> list[torch.cuda.Event | None]:
        """Put every pair p's row x[p // k] in the send buffer (engine.ep_place); key (T * k,).

        x must be contiguous and stay alive until the side stream is joined. Fills position
        (T * k,) and buf; returns per chunk the event after which its rows for the other ranks
        are in buf (None: they already are). With Triton on CUDA the rows are placed on the side
        stream once `tallied` has passed, every chunk's rows for the other ranks first, then this
        rank's own; elsewhere by a stable sort and a scatter on this stream.
        """
        k = key.numel() // x.shape[0]
        if tallied is None or not ep_place.available(x):
            exact = torch.empty_like(position).scatter_(
                0, torch.sort(key, stable=True).indices,
                torch.arange(key.numel(), device=key.device))
            starts = lay.range_starts()
            position.copy_(ep_place.buffer_position(exact, lay.key_cd[key.long()], starts, table))
            buf.index_copy_(0, position, x.repeat_interleave(k, dim=0))
            return [None] * (len(lay.bounds) - 1)
        p1, others = self.num_slots + 1, self.num_slots - self.slots_per_rank[self.rank]
        self.side.wait_event(tallied)
        events, cursor = [], lay.cursor[1:]
        with torch.cuda.stream(self.side):
            starts = lay.range_starts()  # before the kernels count the cursor down
            args = (x, key, cursor, lay.key_cd, starts, table, position, buf)
            for lo, hi in zip(lay.bounds, lay.bounds[1:]):
                ep_place.place_rows(*args, lo * k, hi * k, p1, 0, others)
                events.append(self.side.record_event())
            ep_place.place_rows(*args, 0, key.numel(), p1, others, p1)
        return events

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, token_index: torch.Tensor,
                 replay: bool = True) -> Dispatched:
        """Start sending x's rows (T, D) to their experts (experts (T, k), token_index (T,));
        every chunk's transfer is in flight on return.

        On CUDA the work up to the main exchange is replayed from a CUDA graph once the same
        inputs (addresses, shapes) come with the same sections (engine.cuda_graphs), if it moves
        at most GRAPH_MAX_BYTES: one launch instead of some 25, which bound the dispatch at small
        token counts. The Dispatched then holds the graph's buffers: combine it before the same
        inputs are dispatched again, or pass replay=False for buffers of its own.
        """
        x = x.contiguous()  # held until _queue has joined the side stream, which reads it
        t_count, k = experts.shape
        lay = self._layout(t_count, k)
        m_count = len(lay.bounds) - 1
        sections = self._sections(lay, k)
        self._fill_table(lay, sections, k)

        def queue(capturing: bool) -> _Queued:
            return self._queue(x, experts, token_index, lay, sections, capturing)

        main_bytes = max(sum(map(sum, sections.send)), sum(map(sum, sections.recv))) \
            * x.shape[1] * x.element_size()
        if replay and self.graphs is not None and experts.is_cuda and token_index.is_cuda \
                and main_bytes <= GRAPH_MAX_BYTES:
            q = self.graphs((x.data_ptr(), x.shape, x.dtype, experts.data_ptr(), experts.shape,
                             experts.stride(), experts.dtype, token_index.data_ptr(),
                             token_index.shape, token_index.stride(), token_index.dtype,
                             tuple(map(tuple, sections.send)), tuple(map(tuple, sections.recv))),
                            queue)
        else:
            q = queue(False)
        if q.copied is not None:
            q.copied.synchronize()  # the host sync, while the rows travel
        send, recv = split_sizes(lay.host.tolist(), m_count, self.slots_per_rank, self.rank)
        self._next_caps(sections, (send, recv))
        over = [x.new_empty(sum(sections.beyond(m, recv[m], self.rank, received=True)),
                            x.shape[1]) for m in range(m_count)]
        d = Dispatched(self.rank, t_count, lay.bounds, send, recv, sections, q.table,
                       q.received.clone(), q.position, q.buf, q.rows, over, list(q.works), [])
        self.calls += 1
        ops = d.overflow(back=False)
        if ops:  # one batch for every chunk's overflow: each chunk waits for all of it
            self.overflow_calls += 1
            d.late = dist.batch_isend_irecv(ops)
        return d

    def _queue(self, x: torch.Tensor, experts: torch.Tensor, token_index: torch.Tensor,
               lay: Layout, sections: Sections, capturing: bool) -> _Queued:
        """The dispatch's work on the device up to its main exchange: counts tallied and
        exchanged, then copied to the host; rows placed and sent in the main sections.
        capturing: inside a CUDA graph's capture, which needs every stream joined at its end,
        the main exchange's included, and an external event for the host to wait on."""
        m_count, w, mine = len(lay.bounds) - 1, self.world, self.slots_per_rank[self.rank]
        stream = torch.cuda.current_stream(self.device) if self.side is not None else None
        table = lay.table.to(self.device, non_blocking=True, copy=True)
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
        buf = x.new_empty(sections.base[-1], x.shape[1])
        tallied = None if stream is None else stream.record_event()
        dist.all_to_all_single(lay.meta[n_send:], lay.meta[:n_send], [m_count * mine] * w,
                               [m_count * n for n in self.slots_per_rank], async_op=True).wait()
        copied = None
        if stream is not None:  # the counts' copy is queued before the rows are placed
            lay.host.copy_(lay.meta, non_blocking=True)
            copied = torch.cuda.Event(external=capturing)
            copied.record(stream)
        placed = self._place(x, key, lay, table, position, buf, tallied)
        rows, works = [], []
        for m in range(m_count):  # the main exchange goes before the counts are known
            if placed[m] is not None:
                stream.wait_event(placed[m])
            rows.append(x.new_empty(sum(sections.recv[m]), x.shape[1]))
            lo = sections.base[m]
            works.append(dist.all_to_all_single(rows[m], buf[lo:lo + sum(sections.send[m])],
                                                sections.recv[m], sections.send[m], async_op=True))
        if capturing:
            for work in works:
                work.wait()
            works = [None] * m_count
        if self.side is not None:
            # Later work on this stream (experts, combine, and new allocations in blocks the
            # side stream still reads, such as the freed keys) waits for every row to be placed;
            # the transfers above were queued before and wait only for theirs.
            stream.wait_stream(self.side)
        received = lay.meta[n_send:].view(w, m_count, mine)
        return _Queued(table, received, position, buf, rows, works, copied)

    def received(self, d: Dispatched, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Chunk m's rows on this rank once in place, as (rows, expert id of every row) for the
        main rows, the overflow and the own rows; rows are views of d's buffers, and a main
        section's padding rows have id E."""
        main, over = d.wait(m)
        counts = d.recv_counts.index_select(0, self.other_ranks)[:, m]  # (R - 1, my slots)
        # A section holds the first `cap` rows of its source in slot order, then padding.
        cap = d.table[RECV_CAP].view(-1, self.world)[m].index_select(0, self.other_ranks)
        in_main = torch.minimum(counts.cumsum(1), cap[:, None])
        in_main = torch.diff(in_main, dim=1, prepend=in_main.new_zeros(len(cap), 1))
        ids = torch.cat([self.my_experts, self.my_experts.new_full((1,), len(self.gains) - 1)])
        per_row = [(main, ids, torch.cat([in_main, (cap - in_main.sum(1))[:, None]], 1)),
                   (over, self.my_experts, counts - in_main),
                   (d.own_rows(m), self.my_experts, d.recv_counts[self.rank, m][None])]
        return [(rows, expert_ids.repeat(n.shape[0]).repeat_interleave(
                     n.reshape(-1), output_size=rows.shape[0])) for rows, expert_ids, n in per_row]

    def experts(self, d: Dispatched, m: int) -> None:
        """Chunk m's experts, in place: every received row and own row times its expert's gain."""
        gains = self.gains.to(d.buf.dtype)
        for rows, row_expert in self.received(d, m):
            rows.mul_(gains[row_expert][:, None])

    def resend(self, d: Dispatched) -> None:
        """Send what d.buf holds at the pairs' positions along the dispatch's routes again, into
        d.rows and d.over (own rows stay where they are), and wait: the combine's exchange
        reversed, which carries the gradients of the experts' outputs back to the experts."""
        s = d.sections
        works = [dist.all_to_all_single(d.rows[m], d.buf[s.base[m]:s.base[m] + sum(s.send[m])],
                                        s.recv[m], s.send[m], async_op=True)
                 for m in range(len(d.rows))]
        ops = d.overflow(back=False)
        for work in works + (dist.batch_isend_irecv(ops) if ops else []):
            work.wait()

    def combine(self, d: Dispatched, weights: torch.Tensor, run_experts: bool = False
                ) -> torch.Tensor:
        """Every chunk back and summed per token with its gate weights (T, k); output (T, D).

        Returned rows land at their pairs' positions in d.buf, beside the own rows;
        empty pairs' rows are zeroed. run_experts: apply each chunk's experts just before
        sending it back (the whole layer).
        """
        k, s, works = d.k, d.sections, []
        for m in range(len(d.rows)):  # chunk m goes back while later chunks still arrive
            if run_experts:
                self.experts(d, m)
            main, _ = d.wait(m)
            lo = s.base[m]
            works.append(dist.all_to_all_single(d.buf[lo:lo + sum(s.send[m])], main, s.send[m],
                                                s.recv[m], async_op=True))
            d.empty_rows(m).zero_()
        ops = d.overflow(back=True)
        late = dist.batch_isend_irecv(ops) if ops else []
        position = d.position.view(d.tokens, k)  # where every pair's returned row is
        outs = []
        for m, work in enumerate(works):  # sum chunk m while later chunks still return
            for w in [work] + (late if m == 0 else []):
                w.wait()
            lo, hi = d.bounds[m], d.bounds[m + 1]
            outs.append(weighted_rows_sum(d.buf, position[lo:hi], weights[lo:hi]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                 token_index: torch.Tensor) -> tuple[torch.Tensor, Splits]:
        """MoE output for this rank's tokens: x (T, D), experts/weights (T, k), token_index (T,).

        Returns the output (T, D) in x's dtype and the total rows sent to / received from each rank.
        """
        d = self.dispatch(x, experts, token_index)
        return self.combine(d, weights, run_experts=True), d.splits()
