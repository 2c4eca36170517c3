"""One expert-parallel layer's settings, and every rank's batch made from them.

Every rank's batch is made the same way (rank_batch: seeded Zipf token ids, a router, an optional
hot expert), so the what-if (engine.expert_parallel) and the real dispatch (engine.ep_dispatch)
see identical routings.

Pure torch and stdlib: the GPU benchmark box imports this.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from engine import workloads
from engine.ep_placement import (PLACEMENTS, Placement, check_experts_ranks, contiguous_placement,
                                 greedy_placement, round_robin_placement)
# The plain fields and limits; the lab's modules import them from here.
from engine.ep_fields import (K_RANGE, MAX_D_MODEL, MAX_EXPERTS, MAX_RANKS, MAX_SEED,  # noqa: F401
                              MAX_TOKENS, MAX_TOP_K, MAX_ZIPF, ROUTERS, EPFields)
from engine.moe_router import (ExpertChoiceRouter, GShardRouter, HashRouter, SwitchRouter,
                               TopKRouter)
from engine.validation import check_choice, check_float, check_int

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 32768
GATE_DIM = 64  # width of the token feature the gated routers read (the what-if never builds d_model)


@dataclass(frozen=True)
class EPSettings(EPFields):
    """One expert-parallel layer (fields and defaults: EPFields), checked and sized."""

    def validated(self) -> "EPSettings":
        """Return self after checking every field; raises ValueError naming the bad one."""
        check_int("Experts E", self.experts, 1, MAX_EXPERTS)
        check_int("Ranks R", self.ranks, 1, MAX_RANKS)
        check_experts_ranks(self.experts, self.ranks)
        check_choice("Router", self.router, ROUTERS)
        lo, hi = K_RANGE.get(self.router, (1, MAX_TOP_K))
        check_int(f"Experts per token k ({self.router} router)", self.top_k, lo,
                  min(self.experts, hi))
        check_int("Tokens per rank", self.tokens, 1, MAX_TOKENS)
        check_int("d_model", self.d_model, 1, MAX_D_MODEL)
        check_choice("Payload dtype", self.dtype, tuple(DTYPES))
        check_choice("Placement", self.placement, PLACEMENTS)
        check_int("Replicas of hot experts", self.replicas, 0, self.experts * (self.ranks - 1))
        check_float("Zipf exponent s", self.zipf, 0.0, MAX_ZIPF)
        check_float("Hot expert share", self.hot_share, 0.0, 1.0)
        check_int("Seed", self.seed, 0, MAX_SEED)
        return self

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's hidden state: d_model * dtype size."""
        return self.d_model * DTYPES[self.dtype].itemsize


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
