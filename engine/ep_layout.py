"""The expert-parallel layer's index tensors for one (token count, k), built once, and the split
sizes read back from the exchanged counts (see engine.ep_layer).

P is the number of physical expert slots over all ranks, numbered rank by rank; a slot's sort
position puts the other ranks' slots first (in rank order), then this rank's own, and P (empty
pairs) last. Sort key of a pair: chunk * (P + 1) + its slot's sort position.

Pure torch and stdlib: the GPU box imports this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Index tensors of one (token count, k), built once (Layout.build)."""

    bounds: list[int]
    chunk_key: torch.Tensor | None  # (T, 1) sort-key offset of every token's chunk; None: 1 chunk
    ones: torch.Tensor  # (T * k,) int32 ones, what index_add_ adds per pair
    tally: torch.Tensor  # (chunks * (P + 1),) int32 pairs per sort key, refilled every call
    cursor: torch.Tensor  # (1 + chunks * (P + 1),) int32: 0, then each key's range end
    key_cd: torch.Tensor  # (chunks * (P + 1),) int32 (chunk, destination rank) code of every key
    first_key: torch.Tensor  # (chunks * R,) int64 first key of every code's range
    slot_keys: torch.Tensor  # (chunks * P,) keys of the real slots, grouped by destination rank
    meta: torch.Tensor  # (chunks * P + R * chunks * my slots,) counts sent, then counts received
    host: torch.Tensor  # meta's copy on the host (pinned on CUDA; meta itself on CPU)
    table: torch.Tensor  # (4, chunks * R) int64 on the host (pinned on CUDA), refilled every call

    @classmethod
    def build(cls, t_count: int, k: int, chunks: int, rank: int, slot_start: list[int],
              sort_slot: list[int], sort_rank: list[int], device: torch.device) -> Layout:
        """Chunk bounds and the tensors that tally keys into counts for T = t_count tokens.

        slot_start: first slot of every rank and past the last (R + 1,); sort_slot: every slot's
        sort position (P,); sort_rank: destination rank of every sort position (P + 1,). Every
        rank has `chunks` chunks, empty ones where it has fewer tokens, so that the exchanges
        match chunk for chunk.
        """
        m_count, dev, w = chunks, device, len(slot_start) - 1
        num_slots = slot_start[-1]
        p1, first = num_slots + 1, slot_start
        chunk_key = (torch.arange(t_count, device=dev) * m_count // t_count * p1)[:, None]
        # Counts go rank by rank: every chunk's counts for rank r's slots, then rank r + 1's.
        slot_keys = [m * p1 + sort_slot[s] for r in range(w) for m in range(m_count)
                     for s in range(first[r], first[r + 1])]
        key_cd = [m * w + sort_rank[i] for m in range(m_count) for i in range(p1)]
        first_key = [m * p1 + sort_slot[first[r]] for m in range(m_count) for r in range(w)]
        mine = first[rank + 1] - first[rank]
        meta = torch.empty(m_count * (num_slots + w * mine), dtype=torch.int32, device=dev)
        table = torch.empty(4, m_count * w, dtype=torch.int64)
        cursor = torch.zeros(1 + m_count * p1, dtype=torch.int32, device=dev)
        return cls(
            [-(-m * t_count // m_count) for m in range(m_count + 1)],
            chunk_key.to(torch.int32) if m_count > 1 else None,
            torch.ones(t_count * k, dtype=torch.int32, device=dev),
            torch.empty(m_count * p1, dtype=torch.int32, device=dev), cursor,
            torch.tensor(key_cd, dtype=torch.int32, device=dev),
            torch.tensor(first_key, dtype=torch.int64, device=dev),
            torch.tensor(slot_keys, dtype=torch.int64, device=dev),
            meta, meta if dev.type == "cpu" else torch.empty_like(meta, device="cpu").pin_memory(),
            table if dev.type == "cpu" else table.pin_memory())

    def range_starts(self) -> torch.Tensor:
        """Write the tally's inclusive prefix sums (each key's range end of exact positions) after
        cursor's leading 0; return every (chunk, rank) code's first exact position."""
        torch.cumsum(self.tally, 0, dtype=torch.int32, out=self.cursor[1:])
        return self.cursor[self.first_key]


def split_sizes(counts: list[int], m_count: int, slots_per_rank: list[int], rank: int
                ) -> tuple[list[list[int]], list[list[int]]]:
    """Rows this rank sends to / receives from each rank per chunk, [chunk][rank], from the
    exchanged counts (sent ones grouped [rank][chunk][its slots], then received
    [rank][chunk][my slots])."""
    w, mine = len(slots_per_rank), slots_per_rank[rank]
    send, recv, i = [[0] * w for _ in range(m_count)], [[0] * w for _ in range(m_count)], 0
    for sizes, per_rank in ((send, slots_per_rank), (recv, [mine] * w)):
        for r, n in enumerate(per_rank):
            for m in range(m_count):
                sizes[m][r] = sum(counts[i:i + n])
                i += n
    return send, recv
