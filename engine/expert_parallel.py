"""Expert parallelism what-if: place E experts on R ranks and count the all-to-all it costs.

Model. R ranks each hold `tokens` tokens (data parallel), each rank's batch made by
engine.ep_settings.rank_batch, as the real dispatch in engine.ep_dispatch makes it. Each valid
(token, slot) pair is one row of d_model values sent to the rank hosting its expert (dispatch) and
one row sent back (combine); two slots of a token that land on the same rank are sent twice,
exactly as ep_dispatch does. Placements (engine.ep_placement): contiguous, round-robin, and
EPLB-style greedy with replicas; EPLB uses loads averaged over past steps, here the loads are this
batch's own counts (an oracle, the best case for the greedy placement).

Pure torch and stdlib (pandas only inside the table helpers): the GPU benchmark box imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

from engine import routing_metrics
# The lab's public names, wherever they live: the page, the CLI and the tests import them here.
from engine.ep_placement import (PLACEMENTS, Placement, contiguous_placement, destinations,
                                 greedy_placement, parse_placement, round_robin_placement,
                                 validate_placement)
from engine.ep_settings import (DTYPES, GATE_DIM, MAX_EXPERTS, MAX_RANKS, MAX_TOP_K, MAX_ZIPF,
                                ROUTERS, EPSettings, make_placement, rank_batch, token_features)
from engine.validation import check_bytes, check_int

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DTYPES", "MAX_EXPERTS", "MAX_RANKS", "MAX_TOP_K", "MAX_WHATIF_TOKENS", "MAX_ZIPF",
           "PLACEMENTS", "ROUTERS", "SWEEP_TOKENS", "EPSettings", "EPStats", "Placement", "all_experts",
           "contiguous_placement", "destinations", "ep_stats", "greedy_placement",
           "hot_expert_sweep", "parse_placement", "rank_batch", "rank_table", "round_robin_placement",
           "token_features", "traffic_table", "validate_placement"]

MAX_WHATIF_TOKENS = 1 << 21  # all ranks together; ~100 MB of routing tensors at the limit
SWEEP_TOKENS = 16384  # all ranks together, for the hot-expert sweep (11 shares x 3 placements)


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

    def off_rank_mb(self) -> list[list[float | None]]:
        """Dispatch MB [src][dst] that cross ranks: the diagonal is None (a rank's rows for its own
        experts are never sent), so the cells add up to off_rank_bytes() / 1e6."""
        return [[None if src == dst else b / 1e6 for dst, b in enumerate(row)]
                for src, row in enumerate(self.dispatch_bytes())]

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
    """Dispatch bytes [src][dst] as a long table (src, dst, pairs, MB, whether they cross ranks);
    combine is its transpose."""
    import pandas as pd

    return pd.DataFrame([{"src": i, "dst": j, "pairs": c, "MB": c * stats.row_bytes / 1e6,
                          "off_rank": i != j}
                         for i, row in enumerate(stats.pair_matrix) for j, c in enumerate(row)])
