"""Learned (gated) routers: a seeded random gate W (D, E), logits = x @ W, then each paper's rule.

    TopKRouter           Mixtral: softmax over E, top-k, renormalise (HF MixtralSparseMoeBlock).
    SwitchRouter         Switch Transformer: top-1, capacity ceil(C * T / E), overflow dropped.
    GShardRouter         GShard: top-2 with capacity ceil(C * 2T / E); first choices take slots
                         before any second choice.
    ExpertChoiceRouter   Expert Choice (Zhou et al. 2022): each expert takes its top
                         ceil(C * k * T / E) tokens; a token may get 0 or several experts.
Nothing is trained: they show what the routing rule does to a fixed score distribution. Each
has `route_logits(logits, batch_shape, probs)`, so callers holding the logits (and softmax) of
the same gate can share them between routers.
"""

from __future__ import annotations

import math

import torch

from engine.routing_core import (Routing, RouterMetrics, apply_capacity, check_hidden,
                                 exact_factor, expert_capacity, router_probs, top_k,
                                 topk_softmax_route)
from engine.routing_hash import MAX_EXPERTS
from engine.validation import check_bytes, check_int


class _GatedRouter(RouterMetrics):
    """Shared by the learned routers: a seeded random gate W (D, E), logits = x @ W."""

    min_k, max_k = 1, None
    null_model: str | None = "distinct"  # k distinct experts per token (routing_metrics.null_cv)

    def __init__(self, num_experts: int, top_k: int, d_model: int, seed: int = 0) -> None:
        self.num_experts = check_int("num_experts", num_experts, 1, MAX_EXPERTS)
        hi = self.num_experts if self.max_k is None else self.max_k
        self.top_k = check_int("top_k", top_k, self.min_k, hi)
        self.d_model = check_int("d_model", d_model, 1, 1 << 16)
        self.seed = check_int("seed", seed, 0)
        check_bytes("gate", 4.0 * self.d_model * self.num_experts)  # float32 (D, E)
        gen = torch.Generator().manual_seed(self.seed + 7919)
        # 1/sqrt(D) keeps logits O(1) for unit-variance inputs, as a trained gate's init would.
        self.gate = torch.randn(self.d_model, self.num_experts, generator=gen) / math.sqrt(d_model)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Gate logits (T, E) for hidden states x (..., D), and x's batch shape."""
        x2, batch_shape = check_hidden(x, self.d_model)
        return x2 @ self.gate.to(device=x2.device, dtype=x2.dtype), batch_shape

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route hidden states x (..., D)."""
        return self.route_logits(*self.logits(x))

    def route_logits(self, logits: torch.Tensor, batch_shape: tuple[int, ...],
                     probs: torch.Tensor | None = None) -> Routing:
        """Route gate logits (T, E); probs: router_probs(logits) if already computed."""
        raise NotImplementedError


class TopKRouter(_GatedRouter):
    """Mixtral routing: softmax over the E logits, top-k, renormalise (see topk_softmax_route)."""

    def route_logits(self, logits: torch.Tensor, batch_shape: tuple[int, ...],
                     probs: torch.Tensor | None = None) -> Routing:
        """Route gate logits (T, E)."""
        r = topk_softmax_route(logits, self.top_k, probs)
        return Routing(r.experts, r.weights, r.num_experts, r.probs, batch_shape)


class _CapacityRouter(_GatedRouter):
    """A gated router whose experts take at most ceil(C * k * T / E) tokens each."""

    def __init__(self, num_experts: int, top_k: int = 1, d_model: int = 64, seed: int = 0,
                 capacity_factor: float = 1.0) -> None:
        super().__init__(num_experts, top_k, d_model, seed)
        exact_factor("capacity_factor", capacity_factor)
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for `num_tokens` tokens: ceil(C * k * T / E), exact in C as typed."""
        return expert_capacity(self.capacity_factor, self.top_k, num_tokens, self.num_experts)


class SwitchRouter(_CapacityRouter):
    """Switch Transformer (Fedus et al. 2021): top-1, gate weight = its softmax probability,
    capacity ceil(C * T / E) per expert, overflow tokens dropped (expert -1) in token order."""

    max_k = 1

    def route_logits(self, logits: torch.Tensor, batch_shape: tuple[int, ...],
                     probs: torch.Tensor | None = None) -> Routing:
        """Route gate logits (T, E)."""
        probs = router_probs(logits) if probs is None else probs
        weights, experts = top_k(probs, self.top_k)
        r = Routing(experts, weights.to(logits.dtype), self.num_experts, probs, batch_shape)
        return apply_capacity(r, self.capacity(experts.shape[0]))


class GShardRouter(SwitchRouter):
    """GShard (Lepikhin et al. 2020): top-2, weights g1/(g1+g2) and g2/(g1+g2), capacity
    ceil(C * 2T / E) per expert; every token's first choice is placed before any second choice.

    After a drop the survivor keeps g/(g1+g2), as in GShard's Algorithm 1 (default);
    renormalize_after_drop=True gives it weight 1 instead, as DeepSpeed's and fairseq's
    top2gating renormalise over the experts that kept the token. (GShard's random dispatch of
    weak second choices is left out: routing here is deterministic.)
    """

    min_k = max_k = 2

    def __init__(self, num_experts: int, top_k: int = 2, d_model: int = 64, seed: int = 0,
                 capacity_factor: float = 1.0, renormalize_after_drop: bool = False) -> None:
        super().__init__(num_experts, top_k, d_model, seed, capacity_factor)
        self.renormalize_after_drop = bool(renormalize_after_drop)

    def route_logits(self, logits: torch.Tensor, batch_shape: tuple[int, ...],
                     probs: torch.Tensor | None = None) -> Routing:
        """Route gate logits (T, E)."""
        r = topk_softmax_route(logits, self.top_k, probs)
        r = apply_capacity(Routing(r.experts, r.weights, r.num_experts, r.probs, batch_shape),
                           self.capacity(r.num_tokens))
        if not self.renormalize_after_drop:
            return r
        # DeepSpeed: gates / max(sum of the kept gates, eps); a token that lost both keeps 0.
        kept = r.weights.sum(dim=-1, keepdim=True)
        weights = r.weights / kept.clamp(min=torch.finfo(kept.dtype).eps)
        return Routing(r.experts, weights, r.num_experts, r.probs, r.batch_shape, r.counts,
                       r.demand, r.slot_demand)


class ExpertChoiceRouter(_CapacityRouter):
    """Expert Choice (Zhou et al. 2022): softmax over E per token, then each expert takes the
    ceil(C * k * T / E) tokens with its highest scores (at most T). Experts are perfectly loaded;
    a token may get 0 or several experts. experts/weights are (T, m), m the most experts any token
    got, padded with -1 / 0; weights are the chosen softmax scores (not renormalised)."""

    null_model = None  # every expert's load is fixed by construction: no random-routing null

    def route_logits(self, logits: torch.Tensor, batch_shape: tuple[int, ...],
                     probs: torch.Tensor | None = None) -> Routing:
        """Route gate logits (T, E)."""
        probs = router_probs(logits) if probs is None else probs
        num_tokens, num_experts = probs.shape
        cap = min(num_tokens, self.capacity(num_tokens))
        # (E, cap), unordered: the pairs are regrouped by token below. Contiguous rows and no
        # sorting make CPU topk 42 ms instead of 78 at 64k tokens x 64 experts.
        _, tokens = probs.t().contiguous().topk(cap, dim=1, sorted=False)
        # Regroup the E * cap = C k T (expert, token) pairs token-major with one stable sort of
        # the pairs (experts ascending within a token): 4 ms of CPU at the defaults, where marking
        # them in a (T, E) mask and reading it back with nonzero() took 37 ms.
        tok, order = tokens.reshape(-1).sort(stable=True)
        exp = torch.div(order, cap, rounding_mode="floor")
        per_token = torch.bincount(tok, minlength=num_tokens)
        starts = torch.cumsum(per_token, 0) - per_token
        col = torch.arange(tok.numel(), device=tok.device) - starts[tok]
        width = max(1, int(per_token.max()))
        experts = torch.full((num_tokens, width), -1, dtype=torch.int64, device=tok.device)
        weights = torch.zeros(num_tokens, width, dtype=logits.dtype, device=tok.device)
        experts[tok, col] = exp
        weights[tok, col] = probs[tok, exp].to(logits.dtype)
        counts = torch.full((num_experts,), cap, dtype=torch.int64, device=tok.device)
        return Routing(experts, weights, num_experts, probs, batch_shape, counts)
