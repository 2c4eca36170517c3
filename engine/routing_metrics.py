"""Load-balance metrics of a routing: all take tokens per expert, a count vector of shape (E,).

Definitions (counts c_i, i = 1..E, total N = sum c_i, mean m = N / E):
    CV (relative std)   std(c) / m, population std; 0 is perfect balance.
    max/mean, MaxVio    max(c) / m and max(c) / m - 1 (MaxVio: DeepSeek-V3 / Wang et al. 2024).
    drop rate at C      sum max(c_i - cap, 0) / N with cap = ceil(C * k * T / E).
    normalised entropy  -sum p_i log p_i / log E with p = c / N; 1 is perfect balance.
    Gini                sum_i sum_j |c_i - c_j| / (2 E N); 0 is perfect, (E - 1) / E is one expert.
    aux loss            each router's own: Switch (Fedus et al. 2021, eq. 4) and GShard (DeepSpeed's
                        top2gating l_aux): E * sum_i f_i P_i, f_i the share of tokens whose first
                        choice is i; Mixtral (HF load_balancing_loss_func): E * sum_i (c_i / T) P_i
                        over all k choices (k at perfect balance). P = mean router probability.
    (The drop rate and the aux losses count the choices before a router's own capacity drops.)
    per-rank load       tokens on each of R ranks for an expert -> rank placement; balancedness
                        mean / max of the per-rank loads (1 is perfect).
    null CV             the CV of uniform random routing with the router's k: sqrt((E - 1) / (k T))
                        for k independent slots (hash), sqrt((E - k) / (k T)) for k distinct picks.
Over zero routed tokens (every token dropped) the balance metrics are undefined: NaN, not 0.
"""

from __future__ import annotations

import math

import torch

from engine.routing_core import (Routing, expert_capacity, expert_utilization, relative_std,
                                 slot_counts)
from engine.validation import check_int


def _counts(counts: torch.Tensor) -> torch.Tensor:
    """Validate a count vector (E,) and return it as float64."""
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("counts must be a non-empty 1-D tensor of tokens per expert")
    c = counts.detach().double().cpu()
    if not bool(c.isfinite().all()):
        raise ValueError("counts must be finite")
    if bool((c < 0).any()):
        raise ValueError("counts must be >= 0")
    return c


def cv(counts: torch.Tensor) -> float:
    """Relative standard deviation std / mean (population std) of tokens per expert; NaN if all
    counts are 0 (nothing routed)."""
    return relative_std(_counts(counts))


def max_over_mean(counts: torch.Tensor) -> float:
    """max / mean tokens per expert (1 is perfect balance; E if one expert takes all; NaN if
    nothing was routed)."""
    c = _counts(counts)
    m = c.mean()
    return float(c.max() / m) if m > 0 else math.nan


def max_vio(counts: torch.Tensor) -> float:
    """MaxVio = max / mean - 1: how far the busiest expert is above the mean, as a fraction."""
    return max_over_mean(counts) - 1.0


def drop_rate(counts: torch.Tensor, cap: int) -> float:
    """Fraction of routed slots over `cap` per expert: sum max(c_i - cap, 0) / sum c_i."""
    c = _counts(counts)
    cap = check_int("cap", cap, 0)
    total = c.sum()
    return float((c - cap).clamp(min=0).sum() / total) if total > 0 else math.nan


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of the load distribution over log E, in [0, 1]; 1 is perfect balance (E = 1: 1);
    NaN if nothing was routed."""
    c = _counts(counts)
    total = c.sum()
    if total == 0:
        return math.nan
    if c.numel() == 1:
        return 1.0
    p = c[c > 0] / total
    return float(-(p * p.log()).sum() / math.log(c.numel()))


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of tokens per expert: 0 is perfect balance, (E - 1) / E one expert; NaN
    if nothing was routed."""
    c = _counts(counts).sort().values
    n, total = c.numel(), c.sum()
    if total == 0:
        return math.nan
    # Sorted ascending, sum_ij |c_i - c_j| / 2 = sum_i (2i - n - 1) c_i (i from 1).
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * c).sum() / (n * total))


def choice_counts(routing: Routing) -> torch.Tensor:
    """(k, E) int64: tokens whose j-th choice is expert i, before the router's own drops."""
    if routing.slot_demand is not None:
        return routing.slot_demand
    return slot_counts(routing.experts, routing.num_experts)[:, :routing.num_experts]


def _mean_probs(routing: Routing) -> torch.Tensor:
    # A float32 mean (pairwise sums, within 3e-9 of float64 at 64k x 64) is 20x faster on CPU.
    return routing.probs.detach().mean(dim=0).double().cpu()


def switch_aux_loss(routing: Routing) -> float | None:
    """Switch Transformer auxiliary loss E * sum_i f_i P_i (Fedus et al. 2021, eq. 4); None if
    the router has no probabilities or no token.

    f_i = the share of tokens whose first (top-1) choice is expert i, before the router's own
    capacity drops, P_i = the mean router probability of expert i. 1 at perfect balance with
    uniform probabilities. The same quantity is DeepSpeed's GShard top2gating `l_aux`
    (mean(me * ce) * E^2, ce over first choices), so it is GShard's column too.
    """
    if routing.probs is None or routing.num_tokens == 0:
        return None
    first = choice_counts(routing)[0].double().cpu()
    return float(routing.num_experts * (first / routing.num_tokens * _mean_probs(routing)).sum())


def mixtral_aux_loss(routing: Routing) -> float | None:
    """HF transformers' Mixtral `load_balancing_loss_func` (no attention mask): E * sum_i
    (c_i / T) P_i, c_i the tokens with expert i among their k choices, P_i the mean router
    probability; k at perfect balance. None without probabilities."""
    if routing.probs is None or routing.num_tokens == 0:
        return None
    c = choice_counts(routing).sum(0).double().cpu()
    return float(routing.num_experts * (c / routing.num_tokens * _mean_probs(routing)).sum())


# Auxiliary loss by the name of the paper / reference code that defines it.
AUX_LOSSES = {"switch": switch_aux_loss, "gshard": switch_aux_loss, "mixtral": mixtral_aux_loss}


def contiguous_placement(num_experts: int, num_ranks: int) -> torch.Tensor:
    """Expert -> rank map (E,) int64 placing experts in contiguous blocks: expert i on rank
    floor(i * R / E) (E / R experts per rank when R divides E)."""
    e = check_int("num_experts", num_experts, 1)
    r = check_int("num_ranks", num_ranks, 1, e)
    return torch.arange(e, dtype=torch.int64) * r // e


def per_rank_load(counts: torch.Tensor, num_ranks: int,
                  placement: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per rank (R,) float64 for tokens per expert (E,) and an expert -> rank map (E,)
    (default: contiguous_placement). Expert-parallel layouts pass their own map."""
    c = _counts(counts)
    r = check_int("num_ranks", num_ranks, 1, c.numel())
    if placement is None:
        placement = contiguous_placement(c.numel(), r)
    if not isinstance(placement, torch.Tensor) or placement.shape != c.shape \
            or placement.is_floating_point():
        raise ValueError(f"placement must be an integer tensor of shape ({c.numel()},)")
    placement = placement.long().cpu()
    if bool(((placement < 0) | (placement >= r)).any()):
        raise ValueError(f"placement values must be ranks in [0, {r - 1}]")
    return torch.zeros(r, dtype=torch.float64).index_add_(0, placement, c)


def balancedness(loads: torch.Tensor) -> float:
    """mean / max of per-rank (or per-expert) loads: 1 is perfect; 1 / R if one rank takes all;
    NaN if every load is 0."""
    c = _counts(loads)
    top = c.max()
    return float(c.mean() / top) if top > 0 else math.nan


def null_cv(num_experts: int, top_k: int, num_tokens: int, distinct: bool = False) -> float:
    """Expected CV of uniform random routing, as sqrt(E[CV^2]): k T slots thrown independently
    (hash routing; multinomial) give sqrt((E - 1) / (k T)); k distinct experts per token
    (top-k routers) give sqrt((E - k) / (k T)), 0 at k = E."""
    e = check_int("num_experts", num_experts, 1)
    k = check_int("top_k", top_k, 1, e if distinct else None)
    t = check_int("num_tokens", num_tokens, 1)
    return math.sqrt(((e - k) if distinct else (e - 1)) / (k * t))


def demand(routing: Routing) -> torch.Tensor:
    """Slots that chose each expert (E,), before the router's own capacity drops if it has any."""
    return expert_utilization(routing) if routing.demand is None else routing.demand


def unrouted_fraction(routing: Routing) -> float:
    """Share of tokens that reached no expert at all (dropped by capacity, or unpicked in
    Expert Choice)."""
    return float((routing.experts < 0).all(dim=1).double().mean())


def summarize(routing: Routing, top_k: int, capacity_factor: float, num_ranks: int,
              placement: torch.Tensor | None = None, aux_loss: str | None = None,
              null_model: str | None = None) -> dict[str, float | int]:
    """Every metric of one routing as a flat dict (NaN where not applicable or undefined).

    top_k: the router's nominal k, used for the capacity and the null; aux_loss: a key of
    AUX_LOSSES, the router's own definition; null_model: "independent" (k independent slots) or
    "distinct" (k distinct experts), None for no null (Expert Choice). Balance metrics count
    tokens per expert after the router's own drops, if any; the drop rate and the aux loss count
    the choices before them.
    """
    counts = expert_utilization(routing)
    t, e = routing.num_tokens, routing.num_experts
    ranks = per_rank_load(counts, num_ranks, placement)
    aux = None if aux_loss is None else AUX_LOSSES[aux_loss](routing)
    null = math.nan if null_model is None else null_cv(e, top_k, t, null_model == "distinct")
    return {
        "k": top_k,
        "slots routed": int(counts.sum()),
        "CV": cv(counts),
        "null CV": null,
        "max/mean": max_over_mean(counts),
        "MaxVio": max_vio(counts),
        "drop rate at C": drop_rate(demand(routing), expert_capacity(capacity_factor, top_k, t, e)),
        "tokens unrouted": unrouted_fraction(routing),
        "norm. entropy": normalized_entropy(counts),
        "Gini": gini(counts),
        "aux loss": math.nan if aux is None else aux,
        "rank balancedness": balancedness(ranks),
    }
