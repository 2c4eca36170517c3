"""DeepSeek-V3's router (DeepSeek-AI 2024, sec. 2.1.2 and the `Gate` of its inference code):
sigmoid scores, group-limited top-k, a selection-only bias balanced without an auxiliary loss,
and the routed scaling factor."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.routing_core import Routing, bincount, relative_std, top_k
from engine.routing_gated import _GatedRouter
from engine.validation import check_float, check_int

# DeepSeek-V3's own settings (inference/configs/config_671B.json: n_routed_experts,
# n_activated_experts, n_expert_groups, n_limited_groups, route_scale).
DEEPSEEK_V3 = {"num_experts": 256, "top_k": 8, "n_groups": 8, "topk_groups": 4,
               "route_scale": 2.5}


def check_groups(num_experts: int, top_k: int, n_groups: int, topk_groups: int) -> tuple[int, int]:
    """Validate group-limited routing: n_groups divides E into groups of >= 2 experts (a group
    scores its top two), 1 <= topk_groups <= n_groups, and k fits in the eligible experts."""
    g = check_int("n_groups", n_groups, 1, num_experts)
    if num_experts % g or (g > 1 and num_experts // g < 2):
        raise ValueError(f"n_groups must divide the {num_experts} experts into groups of 2 or "
                         f"more, got {n_groups}")
    tg = check_int("topk_groups", topk_groups, 1, g)
    if g > 1 and top_k > tg * (num_experts // g):
        raise ValueError(f"top_k must be <= groups per token * experts per group = "
                         f"{tg * (num_experts // g)}, got {top_k}")
    return g, tg


@dataclass(frozen=True)
class BalanceStep:
    """One bias update of DeepSeekV3Router: the load before the update (CV and MaxVio)."""

    step: int
    cv: float
    max_vio: float


class DeepSeekV3Router(_GatedRouter):
    """DeepSeek-V3 routing with auxiliary-loss-free balancing.

    Scores s = sigmoid(x @ W) (T, E). Selection uses s + b, b a per-expert bias used only for
    selection: with n_groups > 1 the E experts form n_groups groups, each group scores the sum of
    its two highest s + b, and only the best topk_groups groups stay eligible (V3's node-limited
    routing: 8 groups, top 4); then the top-k eligible experts. Weights = the chosen s
    renormalised to sum 1, times route_scale (V3: 2.5). n_groups = 1, route_scale = 1 is plain
    top-k of s + b. `balance(x, steps)` runs `steps` updates b_i += gamma * sign(mean load -
    load_i), one per batch of tokens, and records the load at every step in `history`.
    """

    def __init__(self, num_experts: int, top_k: int = 2, d_model: int = 64, seed: int = 0,
                 bias_update_speed: float = 0.001, n_groups: int = 1, topk_groups: int = 1,
                 route_scale: float = 1.0) -> None:
        super().__init__(num_experts, top_k, d_model, seed)
        self.gamma = check_float("bias_update_speed", bias_update_speed, 0.0, 1.0)
        self.n_groups, self.topk_groups = check_groups(self.num_experts, self.top_k, n_groups,
                                                       topk_groups)
        self.route_scale = check_float("route_scale", route_scale, 0.0, 100.0, lo_open=True)
        self.bias = torch.zeros(self.num_experts)
        self.history: list[BalanceStep] = []

    @classmethod
    def v3(cls, d_model: int = 64, seed: int = 0,
           bias_update_speed: float = 0.001) -> DeepSeekV3Router:
        """A router with DeepSeek-V3's own settings (DEEPSEEK_V3: 256 experts, 8 groups, top-4
        groups, k = 8, scale 2.5)."""
        return cls(d_model=d_model, seed=seed, bias_update_speed=bias_update_speed, **DEEPSEEK_V3)

    def _select(self, scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Expert ids (T, k) from scores (T, E): group limit, then top-k of s + b, summed in
        float32 as the reference adds its float32 bias (bf16 holds a bias of 2-4 to steps of
        0.016, more than a trained gate's typical score of 0.01: it tied a quarter of the tokens'
        k-th and (k+1)-th experts, and a constant added to every bias changed the routing)."""
        biased = scores.float() + bias.float()
        if self.n_groups > 1:
            grouped = biased.view(scores.shape[0], self.n_groups, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
            best = group_score.topk(self.topk_groups, dim=-1).indices
            off = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, best, False)
            biased = grouped.masked_fill(off.unsqueeze(-1), float("-inf")).flatten(1)
        return top_k(biased, self.top_k)[1]

    def route_scores(self, scores: torch.Tensor, batch_shape: tuple[int, ...],
                     bias: torch.Tensor | None = None) -> Routing:
        """Route sigmoid scores (T, E) with the current bias (or `bias` (E,), a trainer's own)."""
        experts = self._select(scores, self.bias if bias is None else bias)
        chosen = scores.gather(1, experts)
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        counts = bincount(experts.reshape(-1), self.num_experts)
        return Routing(experts, weights, self.num_experts, None, batch_shape, counts)

    def balance(self, x: torch.Tensor, steps: int, batch_tokens: int = 4096) -> list[BalanceStep]:
        """Run `steps` bias updates, each on the next `batch_tokens` tokens of x (..., D) (cycling,
        as training steps see new batches); returns the history: the batch's load before each
        update, steps + 1 entries (the last is measured after the final update)."""
        return self.balance_scores(torch.sigmoid(self.logits(x)[0]), steps, batch_tokens)

    def balance_scores(self, scores: torch.Tensor, steps: int,
                       batch_tokens: int = 4096) -> list[BalanceStep]:
        """`balance` on sigmoid scores (T, E) already computed (the gate is fixed)."""
        steps = check_int("steps", steps, 0, 10_000)
        batch_tokens = check_int("batch_tokens", batch_tokens, 1)
        num_tokens = scores.shape[0]
        batch = min(batch_tokens, num_tokens)
        offsets = torch.arange(batch, device=scores.device)
        self.history = []
        for step in range(steps + 1):
            rows = (offsets + step * batch) % num_tokens
            counts = self.route_scores(scores[rows], (batch,)).counts.double()
            mean = counts.mean()
            self.history.append(BalanceStep(step, relative_std(counts),
                                            float(counts.max() / mean - 1)))
            if step < steps:
                update_bias(self.bias, counts, self.gamma)
        return self.history

    def route_logits(self, logits: torch.Tensor, batch_shape: tuple[int, ...],
                     probs: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Routing:
        """Route gate logits (T, E) with the current bias or `bias` (probs unused: scores are
        sigmoids). The sigmoid and the selection run in float32 (bf16 scores of a trained gate,
        about 0.01, tie often); the weights are cast to the logits' dtype at the end."""
        r = self.route_scores(torch.sigmoid(logits.float()), batch_shape, bias)
        return replace(r, weights=r.weights.to(logits.dtype))


def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> None:
    """DeepSeek-V3's balancing step, in place: b_i += gamma * sign(mean load - load_i) for tokens
    per expert `counts` (E,) (sec. 2.1.2); on bias's device, with no host sync."""
    c = counts.double()
    bias += (gamma * torch.sign(c.mean() - c)).to(bias)
