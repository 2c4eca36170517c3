"""What every router returns and the rules they share: Routing, tokens per expert, top-k,
Mixtral's softmax rule, capacity ceil(C k T / E) and capacity drops.

Token layout: routers flatten the batch shape, so T = B * S tokens in row-major order, and every
result is per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import torch

from engine.validation import check_float, check_int


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to.

    experts: (T, k) int64 expert ids; -1 marks an empty slot (hash collision, dropped at capacity,
        or padding when tokens get different numbers of experts, as in Expert Choice).
    weights: (T, k) float gate weights, 0 where experts == -1.
    num_experts: E.
    probs: (T, E) router probabilities (float32, or float64 for float64 logits), for routers that
        have them (else None); used by the auxiliary losses.
    batch_shape: the leading shape of the input, e.g. (B, S), so results can be reshaped back.
    counts: optional (E,) int64 tokens per expert, filled by routers that get it for free while
        routing; `expert_utilization` returns it instead of counting again. Treat as read-only.
    demand: optional (E,) int64 slots that asked for each expert before the router's own capacity
        drops (apply_capacity fills it); None when the router drops nothing. The drop rate counts
        these, as the Switch paper counts the choices before truncation.
    slot_demand: optional (k, E) int64, demand split by slot (row 0: first choices), filled with
        demand; the Switch and GShard auxiliary losses count first choices before the drops.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    probs: torch.Tensor | None = None
    batch_shape: tuple[int, ...] = ()
    counts: torch.Tensor | None = None
    demand: torch.Tensor | None = None
    slot_demand: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """T, the number of routed tokens."""
        return int(self.experts.shape[0])


def expert_utilization(assign: Routing) -> torch.Tensor:
    """Tokens per expert, shape (E,), zeros included (a token counts once per expert it reaches)."""
    if assign.counts is not None:
        return assign.counts
    # Shift by one so empty slots (-1) land in bin 0 and are cut off: no masked copy of experts.
    flat = assign.experts.reshape(-1) + 1
    return torch.bincount(flat, minlength=assign.num_experts + 1)[1:]


def relative_std(counts: torch.Tensor) -> float:
    """std / mean (population std) of a count vector, the CV; NaN (undefined) if all are 0.
    The one implementation: routing_metrics.cv adds input checks around it."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else math.nan


def load_balance_std(assign: Routing) -> float:
    """Relative std (std / mean, population std) of tokens per expert; 0 is perfect balance,
    NaN when no token reached an expert."""
    return relative_std(expert_utilization(assign))


class RouterMetrics:
    """The seed's per-router methods: `router.load_balance_std(assign)` and
    `router.expert_utilization(assign)`, the module functions of the same names."""

    def load_balance_std(self, assign: Routing) -> float:
        """Relative std of tokens per expert of `assign` (see load_balance_std)."""
        return load_balance_std(assign)

    def expert_utilization(self, assign: Routing) -> torch.Tensor:
        """Tokens per expert (E,) of `assign` (see expert_utilization)."""
        return expert_utilization(assign)


def check_hidden(x: object, d_model: int | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Validate hidden states (..., D); return them as (T, D) and the batch shape."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x (hidden states) must be a float tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x (hidden states) must have shape (..., D), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    if d_model is not None and x.shape[-1] != d_model:
        raise ValueError(f"x must have last dimension d_model = {d_model}, got {x.shape[-1]}")
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.topk(k, dim=-1) (values and indices, largest first). On CPU k <= 2 takes one or
    two max passes instead, about half topk's time (64k x 64, k = 2: 24 ms against 47 ms); a
    tie goes to the lower index. The two indices of a row always differ, as topk's do."""
    if k > 2 or scores.device.type != "cpu":
        return scores.topk(k, dim=-1)
    first, index = scores.max(dim=-1, keepdim=True)
    if k == 1:
        return first, index
    second, index2 = scores.scatter(-1, index, float("-inf")).max(dim=-1, keepdim=True)
    # A row with no finite score left after the first pass has its max, -inf, at the lowest
    # index, which can be the first pick's: take the next index then (its score is -inf too).
    index2 = torch.where(index2 == index, (index + 1) % scores.shape[-1], index2)
    return torch.cat([first, second], dim=-1), torch.cat([index, index2], dim=-1)


def check_logits(logits: object) -> torch.Tensor:
    """Validate gate logits (T, E), T >= 1."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a float tensor of shape (T, E), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if logits.shape[0] == 0:
        raise ValueError("logits must have at least one token (T >= 1)")
    return logits


def router_probs(logits: torch.Tensor) -> torch.Tensor:
    """softmax over E in float32 (float64 logits stay float64), as HF's Mixtral block computes it
    for bf16/fp16 logits: `F.softmax(logits, dim=1, dtype=torch.float)`."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def topk_softmax_route(logits: torch.Tensor, k: int, probs: torch.Tensor | None = None) -> Routing:
    """Mixtral's rule on gate logits (T, E): softmax over E, keep the top k, renormalise to sum 1.

    As HF transformers' MixtralSparseMoeBlock: the softmax, top-k and renormalisation run in
    float32 and the weights are cast to the logits' dtype once, at the end (bf16 weights computed
    in bf16 differ by up to a few ulp). Differentiable: autograd reaches `logits`.
    probs: router_probs(logits) if the caller already has them (shared between routers).
    Returns experts (T, k) int64, weights (T, k) in the logits' dtype, probs (T, E).
    """
    logits = check_logits(logits)
    num_experts = int(logits.shape[1])
    k = check_int("k", k, 1, num_experts)
    probs = router_probs(logits) if probs is None else probs
    top, experts = top_k(probs, k)
    weights = (top / top.sum(dim=-1, keepdim=True)).to(logits.dtype)
    return Routing(experts, weights, num_experts, probs, (int(logits.shape[0]),))


def exact_factor(name: str, value: object) -> Fraction:
    """A positive capacity factor as the exact fraction of the decimal the user typed: a float is
    read as its shortest repr (1.1 -> 11/10, not 2476979795053773/2251799813685248)."""
    check_float(name, value, 0.0, lo_open=True)  # finite and > 0, whatever the type
    if isinstance(value, (int, Fraction, Decimal)) and not isinstance(value, bool):
        return Fraction(value)
    return Fraction(repr(float(value)))  # type: ignore[arg-type]


def expert_capacity(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int) -> int:
    """Slots per expert at capacity factor C: ceil(C * k * T / E) (Switch: k = 1; GShard: k = 2),
    exact for the decimal C as typed (1.1 * 100 / 10 is 11; floats give 11.000000000000002)."""
    c = exact_factor("capacity_factor", capacity_factor)
    k = check_int("top_k", top_k, 1)
    t = check_int("num_tokens", num_tokens, 1)
    e = check_int("num_experts", num_experts, 1)
    return math.ceil(c * k * t / e)


def slot_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(k, E + 1) int64 for experts (T, k): tokens whose j-th slot holds expert i, in one
    bincount; the last column counts empty slots (-1)."""
    k = experts.shape[1]
    keys = torch.where(experts >= 0, experts, num_experts)
    offsets = torch.arange(k, device=experts.device) * (num_experts + 1)
    return torch.bincount((keys + offsets).reshape(-1),
                          minlength=k * (num_experts + 1)).view(k, num_experts + 1)


def apply_capacity(routing: Routing, capacity: int) -> Routing:
    """Drop assignments beyond `capacity` tokens per expert; slot 0 of every token fills first.

    Within a slot, earlier tokens win (GShard and Switch order). Dropped slots get expert -1 and
    weight 0; the surviving weights are not renormalised (as in both papers).
    """
    capacity = check_int("capacity", capacity, 0)
    e = routing.experts
    num_tokens, k = e.shape
    num_experts = routing.num_experts
    # Slot-major order: all first choices (in token order), then all second choices.
    flat = e.t().reshape(-1)
    keys = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(keys, stable=True)
    by_slot = slot_counts(e, num_experts)
    per_expert = by_slot.sum(0)
    starts = torch.cumsum(per_expert, 0) - per_expert
    rank_sorted = torch.arange(flat.numel(), device=e.device) - starts[keys[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    keep = (flat >= 0) & (rank < capacity)
    keep = keep.view(k, num_tokens).t()
    experts = torch.where(keep, e, -1)
    weights = torch.where(keep, routing.weights, 0.0)
    demand = per_expert[:num_experts]
    return Routing(experts, weights, num_experts, routing.probs, routing.batch_shape,
                   torch.clamp(demand, max=capacity), demand, by_slot[:, :num_experts])
