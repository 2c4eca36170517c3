"""The expert-parallel layer's split sizes and one call in flight (see engine.ep_layer).

Both ends of a pair of ranks size the pair's main section of the next call from the rows it moved
in the last ones (next_section), so the rows' exchange need not wait for this call's counts; the
rows beyond a section follow point to point (Dispatched.overflow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Headroom of a main section in units of sqrt(rows), the scale of a count's sampling noise. Over 8
# of the benchmark's batches (2 and 4 ranks, 8k and 64k tokens, hash routing of Zipf ids) a pair's
# count had a standard deviation of 0.5-0.9 sqrt(rows) and rose by at most 2.8 sqrt(rows) from one
# batch to the next: 4 leaves overflow rare, for 4% more bytes at 9k rows and 1.5% at 70k (5.2%
# and 1.9% over 4 batches in turn with sections kept while they fit: next_section).
SLACK = 4.0


def headroom(rows: int, slack: float) -> int:
    """Main-section rows for a pair of ranks whose last call moved `rows`: rows + slack
    sqrt(rows), rounded up."""
    return rows + math.ceil(slack * math.sqrt(rows))


def next_section(current: int, rows: int, slack: float) -> int:
    """A pair's main-section rows for the next call, from its current section and the rows it
    moved in the last call: grown to headroom(rows) when below it, cut back to it when over
    2 slack sqrt(rows) above it, else kept. So while routing only jitters from call to call the
    split sizes stay the same, and with them the dispatch's CUDA graph (engine.cuda_graphs)."""
    need = headroom(rows, slack)
    if current < need or current > need + 2 * math.ceil(slack * math.sqrt(rows)):
        return need
    return current


@dataclass(frozen=True)
class Splits:
    """Rows this rank sends to / received from every rank in the dispatch (combine: reversed)."""

    send: list[int]
    recv: list[int]


@dataclass(frozen=True)
class Sections:
    """Where one call's rows go, fixed before its counts are known.

    Chunk m owns buf rows base[m] .. base[m + 1]: first the main sections, send[m][r] rows for
    each other rank r in rank order (recv[m][s]: rows from rank s, in the receiving rows[m]); then
    every pair of the chunk at its exact position (pairs sorted by chunk, destination, slot), where
    only the overflow, the own rows and the empty pairs are filled.
    """

    send: list[list[int]]  # [chunk][rank] main rows sent (own rank 0)
    recv: list[list[int]]  # [chunk][rank] main rows received
    base: list[int]  # [chunk + 1]

    def spill(self, m: int) -> int:
        """First buf row of chunk m's exact-position region."""
        return self.base[m] + sum(self.send[m])

    def beyond(self, m: int, rows: list[int], rank: int, received: bool) -> list[int]:
        """Rows per rank beyond chunk m's main sections (received ones, or sent ones) of the
        `rows` this rank (`rank`, whose own entry is 0) received from or sent to each rank."""
        caps = self.recv[m] if received else self.send[m]
        return [0 if q == rank else max(0, n - c) for q, (n, c) in enumerate(zip(rows, caps))]


@dataclass
class Dispatched:
    """One layer call in flight on this rank: what the dispatch received and how to put it back."""

    rank: int
    tokens: int
    bounds: list[int]  # chunk m holds tokens bounds[m] .. bounds[m + 1]
    send: list[list[int]]  # [chunk][rank] rows sent in the dispatch (own rank included)
    recv: list[list[int]]  # [chunk][rank] rows received
    sections: Sections
    table: torch.Tensor  # (4, chunks * R) int64: ep_place's table, then the received main rows
    recv_counts: torch.Tensor  # (R, chunks, my slots) rows received per source rank and slot
    position: torch.Tensor  # (T * k,) int64 position of every pair's row in buf
    buf: torch.Tensor  # the pairs' rows (see Sections); the combine's return buffer too
    rows: list[torch.Tensor]  # [chunk] main rows received, by source rank, then by my slot
    over: list[torch.Tensor]  # [chunk] overflow rows received, by source rank, then by my slot
    works: list[dist.Work | None]  # [chunk] pending main exchange into rows[m]
    late: list[dist.Work]  # pending overflow exchange into every chunk's over[m]

    def splits(self) -> Splits:
        """Rows sent to / received from each rank in the dispatch, all chunks together."""
        return Splits([sum(c) for c in zip(*self.send)], [sum(c) for c in zip(*self.recv)])

    @property
    def k(self) -> int:
        """Slots per token."""
        return self.position.numel() // self.tokens

    def _exact(self, m: int, r: int) -> int:
        """First buf row of chunk m's pairs for rank r at their exact positions (own rank last)."""
        before = sum(n for q, n in enumerate(self.send[m])
                     if q != self.rank and (q < r or r == self.rank))
        return self.sections.spill(m) + before

    def own_rows(self, m: int) -> torch.Tensor:
        """Chunk m's rows for this rank's own experts (a view of buf), grouped by slot."""
        lo = self._exact(m, self.rank)
        return self.buf[lo:lo + self.send[m][self.rank]]

    def empty_rows(self, m: int) -> torch.Tensor:
        """Chunk m's rows of pairs without an expert (a view of buf)."""
        pairs = (self.bounds[m + 1] - self.bounds[m]) * self.k
        return self.buf[self.sections.spill(m) + sum(self.send[m]):self.sections.spill(m) + pairs]

    def overflow(self, back: bool) -> list[dist.P2POp]:
        """Point-to-point ops for the rows beyond the main sections, every chunk's (the dispatch's
        way, or back); both ends list them in the same order. Tagged by chunk: gloo mismatched
        two messages of different sizes between the same ranks with one tag (a hang)."""
        ops, s = [], self.sections
        for m in range(len(self.rows)):
            lo = 0
            beyond_in = s.beyond(m, self.recv[m], self.rank, received=True)
            beyond_out = s.beyond(m, self.send[m], self.rank, received=False)
            for q, (n_in, n_out) in enumerate(zip(beyond_in, beyond_out)):
                if n_in > 0:
                    ops.append(dist.P2POp(dist.isend if back else dist.irecv,
                                          self.over[m][lo:lo + n_in], q, tag=m))
                    lo += n_in
                if n_out > 0:
                    first = self._exact(m, q) + s.send[m][q]
                    ops.append(dist.P2POp(dist.irecv if back else dist.isend,
                                          self.buf[first:first + n_out], q, tag=m))
        return ops

    def wait(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk m's main and overflow rows from the other ranks, once they are in place (the own
        rows already are, for work queued after dispatch() returned)."""
        # A point-to-point work of gloo can be waited for once: a second wait times out.
        for work in [self.works[m]] + self.late:
            if work is not None:
                work.wait()
        self.works[m], self.late = None, []
        return self.rows[m], self.over[m]
