"""The training lab's model: a small decoder-only MoE language model in plain PyTorch.

ids (B, S) int64 -> logits (B, S, V). Pre-norm blocks (RMSNorm), causal attention through
engine.flash_attention3.attention (FA3 where it qualifies, else SDPA), rotary or learned
positions, tied embeddings. The FFN of every `moe_every`-th layer is an MoELayer, the rest dense.

MoELayer = router + experts. The router gives a Routing (experts (T, k), weights (T, k)) and an
auxiliary loss; the experts module maps (x (T, D), experts, weights) -> (T, D). To run the experts
another way (e.g. over ranks with engine.ep_layer), replace `layer.experts` for every layer in
`model.moe_layers()` with a module of the same call signature; routers and the rest stay.

Initialisation is seeded per component (embeddings, attention of layer i, FFN of layer i, gate of
layer i), so every router starts from the same attention and expert weights, and an MoE layer with
E = 1 starts from exactly the dense FFN's weights (moe_block's _init draws the same stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.flash_attention3 import attention
from engine.moe_block import DenseFFN, _init
from engine.moe_dispatch import grouped_ffn
from engine.moe_router import (BalancedHashRouter, DeepSeekV3Router, ExpertChoiceRouter,
                               HashRouter, Routing, SwitchRouter, TopKRouter, expert_utilization)
from engine.routing_deepseek import update_bias as deepseek_bias_step
from engine.routing_metrics import aux_loss, demand as routing_demand
from engine.train_fields import HASH_ROUTERS, LIMITS, MOE_ROUTERS, ROUTERS
from engine.validation import check_choice, check_float, check_int


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and routing rule of one model (widths in units, alpha/capacity/gamma plain numbers)."""

    vocab: int = 2048
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    d_expert: int = 128          # hidden width of one expert
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1           # MoE FFN in layers moe_every - 1, 2 moe_every - 1, ...
    router: str = "topk"
    alpha: float = 0.01          # load-balancing loss weight (topk, switch)
    capacity: float = 1.25       # capacity factor C (switch, expert_choice)
    gamma: float = 0.01          # DeepSeek-V3 bias update speed per step
    positions: str = "rope"
    ffn: str = "gelu"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("vocabulary", self.vocab, *LIMITS["vocab"])
        check_int("d_model", self.d_model, *LIMITS["d_model"])
        check_int("layers", self.n_layers, *LIMITS["layers"])
        check_int("heads", self.n_heads, *LIMITS["heads"])
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of 2 x heads "
                             f"({self.n_heads}): rotary needs an even head dim")
        check_int("sequence length", self.seq_len, *LIMITS["seq_len"])
        check_int("expert width", self.d_expert, *LIMITS["d_expert"])
        check_int("Experts E", self.num_experts, *LIMITS["experts"])
        # Switch ignores k (always top-1); the hash routers hash at most two slots.
        hi = min(2, self.num_experts) if self.router in HASH_ROUTERS else self.num_experts
        check_int("Experts per token k", self.top_k, 1, hi)
        check_int("MoE every n-th layer", self.moe_every, 1, self.n_layers)
        check_choice("router", self.router, ROUTERS)
        check_float("alpha", self.alpha, *LIMITS["alpha"])
        check_float("capacity factor", self.capacity, *LIMITS["capacity"])
        check_float("DeepSeek-V3 bias update speed", self.gamma, *LIMITS["gamma"])
        check_choice("positions", self.positions, ("rope", "learned"))
        check_choice("ffn", self.ffn, ("gelu", "swiglu"))
        check_int("seed", self.seed, *LIMITS["seed"])

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has an MoE FFN."""
        return self.router in MOE_ROUTERS and (layer + 1) % self.moe_every == 0

    def dense_width(self) -> int:
        """Hidden width of the dense FFNs: k x d_expert, or E x d_expert for dense_total."""
        return (self.num_experts if self.router == "dense_total" else self.top_k) * self.d_expert

    def param_bytes(self) -> float:
        """Rough bytes of weights + grads + AdamW state in float32 (16 bytes per parameter)."""
        mult = 3 if self.ffn == "swiglu" else 2
        ffn = sum(mult * self.d_model * (self.num_experts * self.d_expert if self.is_moe_layer(i)
                                         else self.dense_width()) for i in range(self.n_layers))
        return 16.0 * (self.vocab * self.d_model + self.n_layers * 4 * self.d_model ** 2 + ffn)


def _seed(seed: int, *salt: int) -> int:
    """A seed for one component, so components' inits do not depend on each other."""
    h = seed
    for s in salt:
        h = (h * 1_000_003 + s + 1) % (2**61 - 1)
    return h


def _gen(seed: int, *salt: int) -> torch.Generator:
    """A generator seeded by _seed(seed, *salt)."""
    return torch.Generator().manual_seed(_seed(seed, *salt))


class Router(nn.Module):
    """One layer's router: forward(x (T, D), ids (T,)) -> (Routing, aux loss scalar tensor).

    Hash routers route on token ids and have no parameters. The learned ones own a trainable gate
    (D, E) and hand its logits to the engine's rules (engine.moe_router `route_logits`). The aux
    loss is routing_metrics.aux_loss: Mixtral's (HF load_balancing_loss_func, all k choices, k at
    balance) for topk, Switch's (top-1) for switch, both counted before capacity drops.
    DeepSeek's bias is a buffer changed only by `update_bias` (sign rule, DeepSeek-V3 sec.
    2.1.2), never by gradients. `last` is the latest forward's Routing; `loads()` reads it.
    """

    def __init__(self, cfg: ModelConfig, layer: int, freq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.alpha, self.gamma = cfg.router, cfg.alpha, cfg.gamma
        e, k, d, seed = cfg.num_experts, cfg.top_k, cfg.d_model, cfg.seed + layer
        self.last: Routing | None = None
        if self.kind == "hash":
            self.rule = HashRouter(e, k, seed)
            return
        if self.kind == "balanced_hash":
            if freq is None:
                raise ValueError("balanced_hash needs token frequencies of the training split")
            self.rule = BalancedHashRouter(e, k, seed, freq)
            return
        self.gate = _init(_gen(cfg.seed, 3, layer), d, d, e)   # (D, E), 1/sqrt(D) scale
        if self.kind == "topk":
            self.rule = TopKRouter(e, k, d, seed)
        elif self.kind == "switch":
            self.rule = SwitchRouter(e, 1, d, seed, cfg.capacity)
        elif self.kind == "expert_choice":
            self.rule = ExpertChoiceRouter(e, k, d, seed, cfg.capacity)
        else:
            self.rule = DeepSeekV3Router(e, k, d, seed, cfg.gamma)
            self.register_buffer("bias", torch.zeros(e))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """Route x (T, D) (token ids (T,) for hash routers)."""
        aux = x.new_zeros((), dtype=torch.float32)
        if self.kind in HASH_ROUTERS:
            self.last = self.rule(ids)
            return self.last, aux
        logits, shape = x @ self.gate, (x.shape[0],)
        if self.kind == "deepseek":
            r = self.rule.route_logits(logits, shape, bias=self.bias)
        else:
            r = self.rule.route_logits(logits, shape)
        if self.kind in ("topk", "switch") and self.alpha > 0:
            # topk: all k choices (no drops); switch: top-1, so its choices are its first choices.
            aux = aux_loss(r.probs, routing_demand(r))
        # Kept without autograd history: holding the graph past the step kept its buffers alive
        # (and, under CUDA graphs, its AccumulateGrad nodes, which warn of a stream mismatch).
        self.last = replace(r, weights=r.weights.detach(),
                            probs=None if r.probs is None else r.probs.detach())
        return r, aux

    def loads(self) -> dict[str, torch.Tensor]:
        """The last forward's loads: counts (E,) after capacity drops, demand (E,) before them,
        unrouted share of tokens (0-dim); on the model's device (`last.experts` holds the picks)."""
        r = self.last
        return {"counts": expert_utilization(r), "demand": routing_demand(r),
                "unrouted": (r.experts < 0).all(dim=1).float().mean()}

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3: b_i += gamma * sign(mean load - load_i) from the last forward's loads."""
        if self.kind == "deepseek" and self.last is not None:
            deepseek_bias_step(self.bias, expert_utilization(self.last), self.gamma)


class Experts(nn.Module):
    """E expert FFNs, w_in (E, D, F or 2F), w_out (E, F, D); forward(x (T, D), experts (T, k),
    weights (T, k)) -> (T, D) through moe_block's grouped dispatch (empty slots skipped)."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, ffn: str,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.ffn = ffn
        self.w_in = _init(gen, d_model, num_experts, d_model, d_ff * (2 if ffn == "swiglu" else 1))
        self.w_out = _init(gen, d_ff, num_experts, d_ff, d_model)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, D) -> (T, D)."""
        return grouped_ffn(x, experts, weights, self.w_in, self.w_out, self.ffn)


class MoELayer(nn.Module):
    """Router + experts; forward(x (T, D), ids (T,)) -> (y (T, D), aux loss)."""

    def __init__(self, router: Router, experts: nn.Module) -> None:
        super().__init__()
        self.router, self.experts = router, experts

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D), ids (T,) -> (T, D) and the router's aux loss."""
        routing, aux = self.router(x, ids)
        return self.experts(x, routing.experts, routing.weights), aux


class DenseLayer(nn.Module):
    """moe_block.DenseFFN behind MoELayer's call signature (aux loss 0)."""

    def __init__(self, ffn: DenseFFN) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> (T, D) and a zero aux loss."""
        return self.ffn(x), x.new_zeros((), dtype=torch.float32)


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of x (B, S, H, Dh), base 10000, half-split."""
    s, dh = x.shape[1], x.shape[3]
    inv = 1.0 / 10000 ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * inv  # (S, Dh/2)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); x (B, S, D)."""

    def __init__(self, cfg: ModelConfig, layer: int, freq: torch.Tensor | None) -> None:
        super().__init__()
        d, self.heads, self.rope = cfg.d_model, cfg.n_heads, cfg.positions == "rope"
        g = _gen(cfg.seed, 2, layer)
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.wqkv = _init(g, d, d, 3 * d)
        self.wo = _init(g, d, d, d)
        ffn_seed = _seed(cfg.seed, 4, layer)  # DenseFFN and Experts draw the same stream from it
        if cfg.is_moe_layer(layer):
            experts = Experts(d, cfg.d_expert, cfg.num_experts, cfg.ffn,
                              torch.Generator().manual_seed(ffn_seed))
            self.ffn: nn.Module = MoELayer(Router(cfg, layer, freq), experts)
        else:
            self.ffn = DenseLayer(DenseFFN(d, cfg.dense_width(), cfg.ffn, ffn_seed))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D), ids (B, S) -> (B, S, D) and the layer's aux loss."""
        b, s, d = x.shape
        q, k, v = (self.norm1(x) @ self.wqkv).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        if self.rope:
            q, k = rotary(q), rotary(k)
        x = x + attention(q, k, v, causal=True, layout="bshd").reshape(b, s, d) @ self.wo
        y, aux = self.ffn(self.norm2(x).reshape(b * s, d), ids.reshape(-1))
        return x + y.view(b, s, d), aux


class MoELM(nn.Module):
    """The language model: ids (B, S) -> (logits (B, S, V), summed aux loss of the MoE layers).

    freq: (V,) token counts of the training split, needed by the balanced_hash router only.
    """

    def __init__(self, cfg: ModelConfig, freq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        g = _gen(cfg.seed, 1)
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.embed.weight = _init(g, 1, cfg.vocab, cfg.d_model)
        self.pos = _init(g, 1, cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i, freq) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, S) int64, S <= seq_len -> logits (B, S, V) and the aux loss (sum over layers)."""
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos[: ids.shape[1]]
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, a = block(x, ids)
            aux = aux + a
        # Tied embeddings, scaled by 1/sqrt(D) so initial logits are O(1).
        return self.norm(x) @ self.embed.weight.T / math.sqrt(self.cfg.d_model), aux

    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFN layers, in depth order (swap `.experts` on these to change dispatch)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def routers(self) -> list[Router]:
        """The routers of the MoE layers, in depth order."""
        return [m.router for m in self.moe_layers()]

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters; active counts k of E experts in MoE layers
        (Switch: 1) and the gates; embeddings included once (tied)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in self.moe_layers():
            per_expert = (layer.experts.w_in[0].numel() + layer.experts.w_out[0].numel())
            k = 1 if self.cfg.router == "switch" else self.cfg.top_k
            inactive += (self.cfg.num_experts - min(k, self.cfg.num_experts)) * per_expert
        return total, total - inactive


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): logits (B, S, V) predict ids (B, S) shifted by one."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))
