"""Expert placements: which physical experts each of R ranks hosts, and which slot serves a pair.

Contiguous blocks, round-robin, a custom map, and a load-aware greedy placement with replicas of hot
experts in the style of vLLM's EPLB (DeepSeek's Expert Parallelism Load Balancer): extra physical
slots go to the expert with the most load per replica, then physical experts are packed heaviest
first onto the least-loaded rank that has room. An expert with replicas serves a (token, slot) pair
on replica `global token index mod replicas`, an even split (destinations).

Pure torch and stdlib: the GPU benchmark box imports this.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from engine import routing_metrics
from engine.validation import check_int

PLACEMENTS = ("contiguous", "round_robin", "greedy")


@dataclass(frozen=True)
class Placement:
    """Physical experts per rank: slots[r] lists the expert ids rank r hosts (replicas allowed)."""

    name: str
    num_experts: int
    slots: tuple[tuple[int, ...], ...]

    @property
    def num_ranks(self) -> int:
        """R, the number of ranks."""
        return len(self.slots)

    def slot_rank(self) -> torch.Tensor:
        """Rank of every physical slot, shape (P,) int64, slots numbered rank by rank."""
        return torch.tensor([r for r, s in enumerate(self.slots) for _ in s], dtype=torch.int64)

    def slot_expert(self) -> torch.Tensor:
        """Expert id of every physical slot, shape (P,) int64."""
        return torch.tensor([e for s in self.slots for e in s], dtype=torch.int64)

    def replica_table(self, empty: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(table (E + 1, max replicas) of physical slot ids padded with -1, replicas per expert
        (E + 1,)). The last row is the empty pair's (expert id -1 indexes it): slot `empty`."""
        reps: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.slot_expert().tolist()):
            reps[e].append(p)
        width = max(len(r) for r in reps)
        table = torch.full((self.num_experts + 1, width), -1, dtype=torch.int64)
        for e, r in enumerate(reps):
            table[e, : len(r)] = torch.tensor(r, dtype=torch.int64)
        table[-1] = empty
        return table, torch.tensor([len(r) for r in reps] + [1], dtype=torch.int64)


def validate_placement(placement: Placement) -> Placement:
    """Return `placement` if every rank hosts >= 1 expert and every expert is hosted, else ValueError."""
    e_count = placement.num_experts
    for r, slot in enumerate(placement.slots):
        if not slot:
            raise ValueError(f"placement: rank {r} hosts no expert")
        bad = [e for e in slot if not 0 <= e < e_count]
        if bad:
            raise ValueError(f"placement: rank {r} lists expert ids {bad} outside [0, {e_count - 1}]")
    missing = sorted(set(range(e_count)) - {e for s in placement.slots for e in s})
    if missing:
        raise ValueError(f"placement misses experts {missing[:10]}{'...' if len(missing) > 10 else ''}"
                         f"; every expert in [0, {e_count - 1}] needs a rank")
    return placement


def parse_placement(text: str, num_experts: int) -> Placement:
    """A custom placement from 'ids;ids;...' (one group per rank, ids comma-separated, a-b ranges)."""
    slots = []
    for group in text.split(";"):
        ids: list[int] = []
        for item in filter(None, (t.strip() for t in group.split(","))):
            lo, _, hi = item.partition("-")
            try:
                ids.extend(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise ValueError(f"placement map: {item!r} is not an expert id or a-b range") from None
        slots.append(tuple(ids))
    return validate_placement(Placement("custom", num_experts, tuple(slots)))


def contiguous_placement(num_experts: int, ranks: int) -> Placement:
    """Experts in R contiguous blocks, expert e on rank floor(e R / E) as the routing lab places them."""
    check_experts_ranks(num_experts, ranks)
    rank_of = routing_metrics.contiguous_placement(num_experts, ranks).tolist()
    return Placement("contiguous", num_experts, tuple(
        tuple(e for e in range(num_experts) if rank_of[e] == r) for r in range(ranks)))


def round_robin_placement(num_experts: int, ranks: int) -> Placement:
    """Expert e on rank e mod R."""
    check_experts_ranks(num_experts, ranks)
    return Placement("round_robin", num_experts,
                     tuple(tuple(range(r, num_experts, ranks)) for r in range(ranks)))


def greedy_placement(loads: Sequence[float], ranks: int, replicas: int = 0) -> Placement:
    """EPLB-style: `replicas` extra slots for the hottest experts, then heaviest-first bin packing.

    loads: per-expert load (tokens), length E. Each rank gets at most ceil((E + replicas) / R)
    slots; an expert's replicas go to distinct ranks where possible.
    """
    num_experts = len(loads)
    check_experts_ranks(num_experts, ranks)
    replicas = check_int("replicas", replicas, 0, num_experts * (ranks - 1))
    copies = [1] * num_experts
    # Max-heap on load per replica; ties broken by lower expert id for reproducibility.
    heap = [(-float(w), e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(replicas):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < ranks:  # at most one replica per rank
            heapq.heappush(heap, (-float(loads[e]) / copies[e], e))
    items = sorted(((float(loads[e]) / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda t: (-t[0], t[1]))
    cap = math.ceil(len(items) / ranks)
    slots: list[list[int]] = [[] for _ in range(ranks)]
    rank_load = [0.0] * ranks
    for w, e in items:
        open_ranks = [r for r in range(ranks) if len(slots[r]) < cap]
        fresh = [r for r in open_ranks if e not in slots[r]] or open_ranks
        r = min(fresh, key=lambda q: (rank_load[q], len(slots[q]), q))
        slots[r].append(e)
        rank_load[r] += w
    return Placement("greedy", num_experts, tuple(tuple(sorted(s)) for s in slots))


def check_experts_ranks(num_experts: int, ranks: int) -> None:
    """Refuse E < 1, R < 1 or more ranks than experts (a rank would host none)."""
    check_int("Experts E", num_experts, 1)
    check_int("Ranks R", ranks, 1)
    if ranks > num_experts:
        raise ValueError(f"Ranks R must be <= Experts E ({num_experts}) so every rank hosts an "
                         f"expert, got {ranks}")


def destinations(experts: torch.Tensor, token_index: torch.Tensor,
                 replicas: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Physical slot serving each (token, slot) pair, shape (T, k) in the table's dtype; where
    experts is -1, the table's empty slot (-1 unless replica_table was given another).

    experts: (T, k) expert ids; token_index: (T,) global token indices (pick among replicas);
    replicas: Placement.replica_table(), on experts' device. Two or three kernels: this runs
    on the dispatch's critical path.
    """
    table, copies = replicas
    if table.shape[1] == 1:  # no replicas
        return table[:, 0][experts]
    return table[experts, token_index.to(experts.device)[:, None] % copies[experts]]
