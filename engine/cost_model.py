"""Parameters and FLOPs of a decoder-only transformer, dense or mixture-of-experts, from its config.

Conventions (what an expert needs to know to trust the figures):
- FLOPs count matmuls only, 2 per multiply-add. Norms, softmax, activations, the embedding lookup
  and the MoE gather/scatter are not matmuls and are left out (a few percent at most).
- Attention scores (Q K^T) and values (A V) of a causal decoder are halved by default: a token
  attends to seq_len / 2 positions on average, as causal kernels (FlashAttention) compute and as
  the attention lab counts. causal=False counts the full seq_len for every token, as Hoffmann et
  al. 2022 (Chinchilla), Appendix F, and as a math path that masks a full S x S product computes.
- Training FLOPs are 3x forward (backward = 2x forward). The 6ND estimate (Kaplan et al. 2020)
  uses N = active parameters: it omits the attention score terms and counts the embedding lookup
  as if it were a matmul, so the two differ by those terms.
- No biases (Llama, Mixtral and T5/Switch have none). RMSNorm/T5 norm: d_model weights per norm,
  two per layer plus a final one.
- Layer i (0-based) is MoE when (i + 1) % moe_every == 0 (Switch: every other layer).

Pandas is imported only where tables are built: the GPU benchmark box runs without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.moe_router import lsh_bits
from engine.validation import check_choice, check_int

if TYPE_CHECKING:
    import pandas as pd

FFN_TYPES = ("gelu", "swiglu")  # gelu: up, act, down (2 matrices; ReLU has the same shape); swiglu: 3
ROUTERS = ("learned", "hash")
PARAM_COMPONENTS = ("embeddings", "attention", "dense FFN", "experts", "shared experts", "router",
                    "norms")
FLOP_COMPONENTS = ("attention projections", "attention scores (QK^T)", "attention values (AV)",
                   "dense FFN", "experts", "shared experts", "router", "logits")


class ConfigError(ValueError):
    """A bad config field; `field` names it so a page can show the message beside that widget."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer; num_experts 0 means dense. Sizes in elements, seq_len in tokens."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    d_ff: int = 11008  # hidden width of the dense FFN and of each expert
    vocab: int = 32000
    seq_len: int = 4096
    ffn: str = "swiglu"
    tied_embeddings: bool = False
    num_experts: int = 0
    top_k: int = 1
    shared_experts: int = 0
    moe_every: int = 1
    router: str = "learned"

    def __post_init__(self) -> None:
        def field_check(name: str, fn, *args) -> None:
            try:
                fn(name, getattr(self, name), *args)
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None

        for name, hi in (("d_model", 1 << 17), ("n_layers", 4096), ("n_heads", 4096),
                         ("n_kv_heads", 4096), ("d_ff", 1 << 20), ("vocab", 1 << 22),
                         ("seq_len", 1 << 24)):
            field_check(name, check_int, 1, hi)
        field_check("ffn", check_choice, FFN_TYPES)
        field_check("router", check_choice, ROUTERS)
        field_check("num_experts", check_int, 0, 1 << 16)
        field_check("shared_experts", check_int, 0, 64)
        field_check("moe_every", check_int, 1, self.n_layers)
        if not isinstance(self.tied_embeddings, bool):
            raise ConfigError("tied_embeddings", "tied_embeddings must be True or False")
        if self.d_model % self.n_heads:
            raise ConfigError("n_heads", f"n_heads must divide d_model ({self.d_model}), got "
                                         f"{self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", f"n_kv_heads must divide n_heads ({self.n_heads}), got "
                                            f"{self.n_kv_heads}")
        if self.num_experts:
            # HashRouter hashes at most 2 slots per token.
            field_check("top_k", check_int, 1, self.num_experts if self.router == "learned"
                        else min(2, self.num_experts))
        elif self.top_k != 1:
            raise ConfigError("top_k", f"top_k must be 1 for a dense model (num_experts 0), got "
                                       f"{self.top_k}")

    @property
    def is_moe(self) -> bool:
        """True when the FFN of some layers is a mixture of experts."""
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        """d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        """Layers whose FFN is a mixture of experts."""
        return self.n_layers // self.moe_every if self.is_moe else 0

    def replace(self, **changes: object) -> "TransformerConfig":
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


# Presets: architecture from the cited source; PUBLISHED holds the totals they must reproduce.
PRESETS: dict[str, TransformerConfig] = {
    # Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088, Table 1 (dim 4096, 32 layers,
    # head_dim 128, hidden 14336, 32 heads, 8 kv heads, context 32768, vocab 32000, 8 experts, top 2).
    "Mixtral 8x7B": TransformerConfig(4096, 32, 32, 8, 14336, 32000, 32768, "swiglu", False, 8, 2),
    # Mistral AI, "Cheaper, Better, Faster, Stronger" (Apr 2024) for the totals; architecture from
    # the model card's config.json (mistralai/Mixtral-8x22B-v0.1): hidden 6144, 56 layers, 48 heads,
    # 8 kv heads, intermediate 16384, vocab 32768, 65536 positions.
    "Mixtral 8x22B": TransformerConfig(6144, 56, 48, 8, 16384, 32768, 65536, "swiglu", False, 8, 2),
    # Touvron et al. 2023, "Llama 2", arXiv:2307.09288, and the meta-llama/Llama-2-7b-hf config:
    # 4096, 32 layers, 32 heads (no GQA at 7B), intermediate 11008, vocab 32000, context 4096.
    "Llama-2-7B": TransformerConfig(4096, 32, 32, 32, 11008, 32000, 4096, "swiglu", False),
    # Fedus et al. 2021, "Switch Transformers", arXiv:2101.03961, and google/switch-base-128's
    # config: T5-Base (d_model 768, 12 heads, d_ff 3072 ReLU, vocab 32128, tied embeddings), 12
    # encoder + 12 decoder blocks, every other FFN sparse with 128 experts, top-1. Modelled here as
    # one 24-block stack: the decoder's cross-attention (12 x 4 x 768^2 = 28M, 0.4% of the total)
    # is not counted, and per-token FLOPs are those of a token passing all 24 blocks.
    "Switch-Base-128": TransformerConfig(768, 24, 12, 12, 3072, 32128, 512, "gelu", True, 128, 1,
                                         moe_every=2),
}
# (total, active) parameters as published; None where the source gives no active figure.
PUBLISHED: dict[str, tuple[float, float | None]] = {
    "Mixtral 8x7B": (46.7e9, 12.9e9),   # Mistral AI, "Mixtral of experts" (Dec 2023)
    "Mixtral 8x22B": (141e9, 39e9),     # Mistral AI, "Cheaper, Better, Faster, Stronger"
    "Llama-2-7B": (6.74e9, 6.74e9),     # Llama 2 paper / model card, "7B" = 6.74B
    "Switch-Base-128": (7.4e9, None),   # Switch-Base-128 model card, about 7.4B
}


def _ffn_matrices(ffn: str) -> int:
    return 3 if ffn == "swiglu" else 2


def ffn_params(d_model: int, d_ff: int, ffn: str) -> int:
    """Weights of one FFN (or one expert): 2 or 3 matrices of d_model x d_ff."""
    return _ffn_matrices(ffn) * d_model * d_ff


def router_flops(d_model: int, num_experts: int, router: str) -> int:
    """Forward matmul FLOPs per token of one router: gate logits, or the hash router's LSH."""
    if router == "learned":
        return 2 * d_model * num_experts
    # HashRouter's LSH projects onto lsh_bits(E) hyperplanes for each of its two hash slots,
    # computed whatever top_k (top_k 1 keeps slot 0); the planes are fixed, not parameters.
    return 2 * d_model * 2 * lsh_bits(num_experts)


def moe_block_flops(d_model: int, d_ff: int, ffn: str, num_experts: int, top_k: int, router: str,
                    shared_experts: int = 0) -> dict[str, int]:
    """Forward matmul FLOPs per token of one MoE FFN block, by part (experts, shared, router).

    Assumes every token reaches `top_k` experts (no drops; hash collisions make it slightly less).
    """
    per_expert = 2 * ffn_params(d_model, d_ff, ffn)
    return {"experts": top_k * per_expert, "shared experts": shared_experts * per_expert,
            "router": router_flops(d_model, num_experts, router)}


def param_counts(cfg: TransformerConfig) -> dict[str, tuple[int, int]]:
    """Parameters by component: (total, active per token), in elements."""
    d, L = cfg.d_model, cfg.n_layers
    emb = cfg.vocab * d * (1 if cfg.tied_embeddings else 2)
    attn = L * (2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim)
    one_ffn = ffn_params(d, cfg.d_ff, cfg.ffn)
    n_moe = cfg.n_moe_layers
    experts = n_moe * cfg.num_experts * one_ffn
    active_experts = n_moe * cfg.top_k * one_ffn
    shared = n_moe * cfg.shared_experts * one_ffn
    router = n_moe * d * cfg.num_experts if cfg.router == "learned" else 0
    norms = (2 * L + 1) * d
    dense_ffn = (L - n_moe) * one_ffn
    return {"embeddings": (emb, emb), "attention": (attn, attn), "dense FFN": (dense_ffn, dense_ffn),
            "experts": (experts, active_experts), "shared experts": (shared, shared),
            "router": (router, router), "norms": (norms, norms)}


def forward_flops(cfg: TransformerConfig, causal: bool = True) -> dict[str, int]:
    """Forward matmul FLOPs per token by component (2 per multiply-add); causal halves S^2 terms."""
    d, L, S = cfg.d_model, cfg.n_layers, cfg.seq_len
    d_q, d_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = dict.fromkeys(FLOP_COMPONENTS, 0)
    out["attention projections"] = L * 2 * (2 * d * d_q + 2 * d * d_kv)
    # Per token 2 * S * d_q each (full), or S * d_q (causal: half the S x S products on average).
    out["attention scores (QK^T)"] = L * 2 * S * d_q // (2 if causal else 1)
    out["attention values (AV)"] = L * 2 * S * d_q // (2 if causal else 1)
    out["dense FFN"] = (L - cfg.n_moe_layers) * 2 * ffn_params(d, cfg.d_ff, cfg.ffn)
    if cfg.is_moe:
        block = moe_block_flops(d, cfg.d_ff, cfg.ffn, cfg.num_experts, cfg.top_k, cfg.router,
                                cfg.shared_experts)
        for part, flops in block.items():
            out[part] = cfg.n_moe_layers * flops
    out["logits"] = 2 * d * cfg.vocab
    return out


@dataclass(frozen=True)
class CostEstimate:
    """Totals for one config: parameters (elements) and FLOPs per token."""

    config: TransformerConfig
    params: dict[str, tuple[int, int]]
    flops: dict[str, int]

    @property
    def total_params(self) -> int:
        """All parameters."""
        return sum(t for t, _ in self.params.values())

    @property
    def active_params(self) -> int:
        """Parameters one token uses (routed experts: top_k of num_experts)."""
        return sum(a for _, a in self.params.values())

    @property
    def forward_flops(self) -> int:
        """Forward matmul FLOPs per token."""
        return sum(self.flops.values())

    @property
    def train_flops(self) -> int:
        """Training FLOPs per token: 3x forward."""
        return 3 * self.forward_flops

    @property
    def six_n(self) -> int:
        """The 6N estimate of training FLOPs per token, N = active parameters."""
        return 6 * self.active_params


def estimate(cfg: TransformerConfig, causal: bool = True) -> CostEstimate:
    """Parameters and FLOPs per token of `cfg` (causal: attention S^2 terms halved)."""
    return CostEstimate(cfg, param_counts(cfg), forward_flops(cfg, causal))


def dense_counterpart(cfg: TransformerConfig, match: str) -> TransformerConfig:
    """The dense model beside an MoE config, with d_ff set by `match`.

    same_ff: the same d_ff (the MoE model without its experts and router; the seed's comparison);
    active: d_ff chosen so the dense FFN parameters equal the MoE's active FFN parameters;
    total: d_ff chosen so they equal its total FFN parameters (experts, shared and router included).
    """
    check_choice("match", match, ("same_ff", "active", "total"))
    if not cfg.is_moe:
        raise ConfigError("num_experts", "dense_counterpart needs an MoE config (num_experts >= 1)")
    base = cfg.replace(num_experts=0, top_k=1, shared_experts=0, moe_every=1)
    if match == "same_ff":
        return base
    col = 1 if match == "active" else 0
    p = param_counts(cfg)
    ffn_total = sum(p[c][col] for c in ("dense FFN", "experts", "shared experts", "router"))
    d_ff = round(ffn_total / (cfg.n_layers * _ffn_matrices(cfg.ffn) * cfg.d_model))
    return base.replace(d_ff=max(1, d_ff))


def compare(cfg: TransformerConfig, tokens: float = 1.0, causal: bool = True) -> "pd.DataFrame":
    """MoE/dense ratios against the three dense counterparts; training FLOPs for `tokens` tokens."""
    import pandas as pd

    moe = estimate(cfg, causal)
    rows = []
    for match, label in (("same_ff", "same d_ff"), ("active", "equal active params"),
                         ("total", "equal total params")):
        dense = estimate(dense_counterpart(cfg, match), causal)
        rows.append({"dense baseline": label, "dense d_ff": dense.config.d_ff,
                     "dense params": dense.total_params,
                     "total params ratio": moe.total_params / dense.total_params,
                     "active params ratio": moe.active_params / dense.active_params,
                     "forward FLOPs ratio": moe.forward_flops / dense.forward_flops,
                     "MoE training FLOPs": moe.train_flops * tokens,
                     "dense training FLOPs": dense.train_flops * tokens})
    return pd.DataFrame(rows)


def params_table(est: CostEstimate) -> "pd.DataFrame":
    """Parameters by component: total and active, in elements."""
    import pandas as pd

    return pd.DataFrame([{"component": c, "total": t, "active": a} for c, (t, a) in est.params.items()])


def flops_table(est: CostEstimate, tokens: float = 1.0) -> "pd.DataFrame":
    """Forward FLOPs per token by component, then forward, training (3x) and 6N; x `tokens`."""
    import pandas as pd

    rows = [{"row": c, "FLOPs per token": f} for c, f in est.flops.items()]
    rows += [{"row": "forward total", "FLOPs per token": est.forward_flops},
             {"row": "training (3 x forward)", "FLOPs per token": est.train_flops},
             {"row": "6N (N = active params)", "FLOPs per token": est.six_n}]
    table = pd.DataFrame(rows)
    table["FLOPs for D tokens"] = table["FLOPs per token"].astype(float) * tokens
    return table


def summary(est: CostEstimate) -> dict[str, float]:
    """Headline figures: params (elements), FLOPs per token, and training FLOPs / 6N."""
    return {"total_params": est.total_params, "active_params": est.active_params,
            "forward_flops_per_token": est.forward_flops, "train_flops_per_token": est.train_flops,
            "six_n_per_token": est.six_n, "train_over_6n": est.train_flops / est.six_n}


def human(x: float) -> str:
    """1.23e9 -> '1.23B' (K, M, B, T), for labels."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def preset_config(preset: str, **overrides: object) -> TransformerConfig:
    """PRESETS[preset] with the fields in `overrides` replaced (None values ignored), validated."""
    check_choice("preset", preset, tuple(PRESETS))
    return PRESETS[preset].replace(**{k: v for k, v in overrides.items() if v is not None})
