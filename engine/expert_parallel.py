"""Expert parallelism what-if: place E experts on R ranks and count the all-to-all it costs.

Model. R ranks each hold `tokens` tokens (data parallel). Every rank's batch is made the same way
(`rank_batch`: seeded Zipf token ids, a router, an optional hot expert), so this module and the real
dispatch in engine.ep_dispatch see identical routings. Each valid (token, slot) pair is one row of
d_model values sent to the rank hosting its expert (dispatch) and one row sent back (combine); two
slots of a token that land on the same rank are sent twice, exactly as ep_dispatch does. An expert
with replicas serves the pair on replica `global token index mod replicas`, an even split.

Placements: contiguous blocks, round-robin, and a load-aware greedy placement with replicas of hot
experts in the style of vLLM's EPLB (DeepSeek's Expert Parallelism Load Balancer): extra physical
slots go to the expert with the most load per replica, then physical experts are packed heaviest
first onto the least-loaded rank that has room. EPLB uses loads averaged over past steps; here the
loads are this batch's own counts (an oracle, the best case for the greedy placement).

Pure torch and stdlib (pandas only inside the table helpers): the GPU benchmark box imports this.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

from engine import routing_metrics
from engine import workloads
from engine.moe_router import (ExpertChoiceRouter, GShardRouter, HashRouter, SwitchRouter,
                               TopKRouter)
from engine.validation import check_bytes, check_choice, check_float, check_int

if TYPE_CHECKING:
    import pandas as pd

PLACEMENTS = ("contiguous", "round_robin", "greedy")
# Engine routers by key (as in the routing lab); hash routes token ids, the gated ones a token
# feature. Switch and GShard apply their capacity per rank's batch (capacity factor 1).
ROUTERS = ("hash", "topk", "switch", "gshard", "expert_choice")
_K_RANGE = {"hash": (1, 2), "switch": (1, 1), "gshard": (2, 2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 32768
GATE_DIM = 64  # width of the token feature the gated routers read (the what-if never builds d_model)
# Limits of EPSettings, which the page's inputs share.
MAX_EXPERTS, MAX_RANKS, MAX_TOP_K, MAX_TOKENS = 4096, 1024, 8, 1 << 20
MAX_WHATIF_TOKENS = 1 << 21  # all ranks together; ~100 MB of routing tensors at the limit
SWEEP_TOKENS = 16384  # all ranks together, for the hot-expert sweep (11 shares x 3 placements)


@dataclass(frozen=True)
class EPSettings:
    """One expert-parallel layer: experts on ranks, tokens per rank, payload width and dtype."""

    experts: int = 64
    ranks: int = 4
    top_k: int = 2
    tokens: int = 4096  # per rank
    d_model: int = 4096
    dtype: str = "bf16"
    placement: str = "contiguous"
    replicas: int = 0  # extra physical experts for hot ones; greedy placement only
    router: str = "hash"
    zipf: float = 1.0  # exponent of the token-id distribution; 0 is uniform
    hot_share: float = 0.0  # share of tokens whose first slot is forced to expert 0
    seed: int = 0

    def validated(self) -> "EPSettings":
        """Return self after checking every field; raises ValueError naming the bad one."""
        check_int("Experts E", self.experts, 1, MAX_EXPERTS)
        check_int("Ranks R", self.ranks, 1, MAX_RANKS)
        _check_er(self.experts, self.ranks)
        check_choice("Router", self.router, ROUTERS)
        lo, hi = _K_RANGE.get(self.router, (1, MAX_TOP_K))
        check_int(f"Experts per token k ({self.router} router)", self.top_k, lo,
                  min(self.experts, hi))
        check_int("Tokens per rank", self.tokens, 1, MAX_TOKENS)
        check_int("d_model", self.d_model, 1, 65536)
        check_choice("Payload dtype", self.dtype, tuple(DTYPES))
        check_choice("Placement", self.placement, PLACEMENTS)
        check_int("Replicas of hot experts", self.replicas, 0, self.experts * (self.ranks - 1))
        check_float("Token skew (Zipf exponent)", self.zipf, 0.0, 3.0)
        check_float("Hot expert share", self.hot_share, 0.0, 1.0)
        check_int("Seed", self.seed, 0, 2**31 - 1)
        return self

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's hidden state: d_model * dtype size."""
        return self.d_model * DTYPES[self.dtype].itemsize


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
    _check_er(num_experts, ranks)
    rank_of = routing_metrics.contiguous_placement(num_experts, ranks).tolist()
    return Placement("contiguous", num_experts, tuple(
        tuple(e for e in range(num_experts) if rank_of[e] == r) for r in range(ranks)))


def round_robin_placement(num_experts: int, ranks: int) -> Placement:
    """Expert e on rank e mod R."""
    _check_er(num_experts, ranks)
    return Placement("round_robin", num_experts,
                     tuple(tuple(range(r, num_experts, ranks)) for r in range(ranks)))


def greedy_placement(loads: Sequence[float], ranks: int, replicas: int = 0) -> Placement:
    """EPLB-style: `replicas` extra slots for the hottest experts, then heaviest-first bin packing.

    loads: per-expert load (tokens), length E. Each rank gets at most ceil((E + replicas) / R)
    slots; an expert's replicas go to distinct ranks where possible.
    """
    num_experts = len(loads)
    _check_er(num_experts, ranks)
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


def _check_er(num_experts: int, ranks: int) -> None:
    check_int("Experts E", num_experts, 1)
    check_int("Ranks R", ranks, 1)
    if ranks > num_experts:
        raise ValueError(f"Ranks R must be <= Experts E ({num_experts}) so every rank hosts an "
                         f"expert, got {ranks}")


def token_features(ids: torch.Tensor, width: int, seed: int, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """Deterministic hidden state per token id: sin(id * f_j + phase_j), shape (T, width).

    Computed on ids' device; the same id gives the same row on every rank and in every test.
    """
    gen = torch.Generator().manual_seed(seed + 7)
    freq = (torch.rand(width, generator=gen) * 0.1).to(ids.device)
    phase = (torch.rand(width, generator=gen) * 6.283).to(ids.device)
    return torch.sin(ids.to(torch.float32)[:, None] * freq + phase).to(dtype)


def _route(settings: EPSettings, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = settings
    if s.router == "hash":
        out = HashRouter(s.experts, s.top_k, s.seed)(ids)
    else:
        cls = {"topk": TopKRouter, "switch": SwitchRouter, "gshard": GShardRouter,
               "expert_choice": ExpertChoiceRouter}[s.router]
        out = cls(s.experts, s.top_k, GATE_DIM, s.seed)(token_features(ids, GATE_DIM, s.seed))
    return out.experts, out.weights.float()


@functools.lru_cache(maxsize=8)
def _id_pmf(zipf: float, seed: int) -> torch.Tensor:
    # One id distribution for all ranks (the routing lab's Zipf workload), sampled per rank;
    # cached because every rank of every what-if needs it. Read only.
    return workloads.id_pmf("zipf", VOCAB, zipf, seed)


def rank_batch(settings: EPSettings, rank: int, device: str | torch.device = "cpu",
               batch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens: ids (T,), experts (T, m) int64 (-1 empty), weights (T, m) float32.

    batch: another draw from the same distributions, router and hot share (0 is the what-if's).

    m is k, except for Expert Choice (the most experts any token got).

    A share `hot_share` of tokens (seeded per rank) has its first slot forced to expert 0; a second
    slot already on expert 0 is emptied and its weight moved to the first.
    """
    pmf = _id_pmf(settings.zipf, settings.seed)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + rank + 7_919 * batch)
    ids = torch.multinomial(pmf, settings.tokens, replacement=True, generator=gen)
    hot = torch.rand(settings.tokens, generator=gen) < settings.hot_share
    ids = ids.to(device)
    experts, weights = _route(settings, ids)
    hot = hot.to(experts.device)
    if bool(hot.any()):
        experts, weights = experts.clone(), weights.clone()
        dup = hot[:, None] & (experts == 0)
        dup[:, 0] = False
        weights[:, 0] += (weights * dup).sum(dim=1)
        experts[dup] = -1
        weights[dup] = 0.0
        experts[hot, 0] = 0
    return ids, experts, weights


def expert_counts(settings: EPSettings) -> torch.Tensor:
    """Token-expert pairs per expert over all ranks' batches, shape (E,) int64."""
    counts = torch.zeros(settings.experts, dtype=torch.int64)
    for r in range(settings.ranks):
        e = rank_batch(settings, r)[1].reshape(-1)
        counts += torch.bincount(e[e >= 0], minlength=settings.experts)
    return counts


def make_placement(settings: EPSettings, counts: torch.Tensor | None = None) -> Placement:
    """The placement `settings.placement` names; greedy uses `counts` (E,) (computed if None)."""
    s = settings
    if s.placement == "contiguous":
        return contiguous_placement(s.experts, s.ranks)
    if s.placement == "round_robin":
        return round_robin_placement(s.experts, s.ranks)
    loads = (expert_counts(s) if counts is None else counts).tolist()
    return greedy_placement(loads, s.ranks, s.replicas)


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


@dataclass(frozen=True)
class EPStats:
    """Per-rank load and rank-to-rank traffic of one expert-parallel layer (plain values)."""

    placement: Placement
    load: tuple[int, ...]  # token-expert pairs each rank's experts compute
    balancedness: float  # mean / max of load; 1 is perfect
    pair_matrix: tuple[tuple[int, ...], ...]  # [src][dst] pairs sent in the dispatch
    row_bytes: int  # bytes per pair each way (d_model * dtype size)
    leave_share: float  # share of pairs whose expert is on another rank

    @property
    def mean_load(self) -> float:
        """Mean token-expert pairs per rank."""
        return sum(self.load) / len(self.load)

    def off_rank_bytes(self) -> int:
        """Bytes that cross ranks in the dispatch (the combine moves as many back)."""
        total = sum(map(sum, self.pair_matrix)) - sum(row[i] for i, row in enumerate(self.pair_matrix))
        return total * self.row_bytes

    def dispatch_bytes(self) -> list[list[int]]:
        """Bytes sent [src][dst] in the dispatch (the diagonal stays on its rank)."""
        return [[c * self.row_bytes for c in row] for row in self.pair_matrix]

    def combine_bytes(self) -> list[list[int]]:
        """Bytes sent [src][dst] in the combine: results return, so the dispatch transposed."""
        return [list(col) for col in zip(*self.dispatch_bytes())]


def all_experts(settings: EPSettings) -> torch.Tensor:
    """Every rank's routing stacked rank by rank, shape (R * T, m) int64, -1 padded (m: widest)."""
    s = settings.validated()
    check_int("Ranks R x Tokens per rank", s.ranks * s.tokens, 1, MAX_WHATIF_TOKENS)
    check_bytes("what-if routing", s.ranks * s.tokens * (8 + 4 * GATE_DIM + 24 * s.top_k))
    batches = [rank_batch(s, r)[1] for r in range(s.ranks)]
    width = max(b.shape[1] for b in batches)  # Expert Choice: ranks differ; pad with empty slots
    return torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[1]), value=-1)
                      for b in batches])


def ep_stats(settings: EPSettings, placement: Placement | None = None,
             experts: torch.Tensor | None = None) -> EPStats:
    """Load per rank, balancedness and traffic for `settings`.

    placement: built from the settings (greedy: from these loads) if None. experts: all_experts
    (settings), passed in by callers that evaluate several placements on one routing.
    """
    s = settings.validated()
    if experts is None:
        experts = all_experts(s)
    if placement is None:
        flat = experts.reshape(-1)
        placement = make_placement(s, torch.bincount(flat[flat >= 0], minlength=s.experts))
    validate_placement(placement)
    if placement.num_ranks != s.ranks or placement.num_experts != s.experts:
        raise ValueError(f"placement has {placement.num_ranks} ranks and {placement.num_experts} "
                         f"experts; settings ask for {s.ranks} and {s.experts}")
    r = s.ranks
    index = torch.arange(experts.shape[0])
    slots = destinations(experts, index, placement.replica_table())
    valid = slots >= 0
    slot_rank = placement.slot_rank()
    src = (index // s.tokens)[:, None].expand_as(slots)[valid]
    m = torch.bincount(src * r + slot_rank[slots[valid]], minlength=r * r).view(r, r)
    # Physical slots are the "experts" of the routing lab's per-rank load, mapped to their ranks.
    load = routing_metrics.per_rank_load(torch.bincount(slots[valid], minlength=len(slot_rank)),
                                         r, slot_rank)
    total = int(m.sum())
    return EPStats(
        placement=placement,
        load=tuple(int(x) for x in load.tolist()),
        balancedness=routing_metrics.balancedness(load),
        pair_matrix=tuple(tuple(row) for row in m.tolist()),
        row_bytes=s.row_bytes,
        leave_share=(total - int(m.diagonal().sum())) / total if total else 0.0,
    )


def hot_expert_sweep(settings: EPSettings, shares: Sequence[float]) -> list[dict]:
    """Slowest rank's load against the hot-expert share, for every placement (rows of plain dicts).

    Runs on at most SWEEP_TOKENS tokens over all ranks (the curve's shape, in about a second);
    each share's routing is made once and shared by the placements.
    """
    tokens = max(1, min(settings.tokens, SWEEP_TOKENS // settings.ranks))
    rows = []
    for share in shares:
        s = replace(settings, hot_share=float(share), tokens=tokens).validated()
        experts = all_experts(s)
        for name in PLACEMENTS:
            st = ep_stats(replace(s, placement=name), experts=experts)
            rows.append({"hot_share": float(share), "placement": name, "tokens_per_rank": tokens,
                         "max_load": max(st.load), "mean_load": st.mean_load,
                         "balancedness": st.balancedness, "slowest_vs_mean": 1 / st.balancedness})
    return rows


def rank_table(stats: EPStats) -> "pd.DataFrame":
    """One row per rank: experts hosted, load, and dispatch bytes sent to / received from others."""
    import pandas as pd  # lazily: the GPU box runs ep_dispatch without pandas

    m = stats.dispatch_bytes()
    r_count = len(m)
    return pd.DataFrame({
        "rank": range(r_count),
        "experts": [" ".join(map(str, s)) for s in stats.placement.slots],
        "load_pairs": stats.load,
        "load_vs_mean": [x / stats.mean_load if stats.mean_load else 0.0 for x in stats.load],
        "sent_off_rank_MB": [(sum(m[r]) - m[r][r]) / 1e6 for r in range(r_count)],
        "received_off_rank_MB": [(sum(row[r] for row in m) - m[r][r]) / 1e6 for r in range(r_count)],
    })


def traffic_table(stats: EPStats) -> "pd.DataFrame":
    """Dispatch bytes [src][dst] as a long table (src, dst, pairs, MB); combine is its transpose."""
    import pandas as pd

    return pd.DataFrame([{"src": i, "dst": j, "pairs": c, "MB": c * stats.row_bytes / 1e6}
                         for i, row in enumerate(stats.pair_matrix) for j, c in enumerate(row)])
