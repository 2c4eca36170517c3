"""Real PyTorch blocks built from a cost-model config: a dense FFN, an MoE FFN, a small transformer.

Layouts: blocks take tokens flattened to x (T, D) and return (T, D); the transformer takes token
ids (B, S) and returns logits (B, S, V). Parameter names and shapes follow engine.cost_model, so
sum(p.numel()) equals its parameter count and FlopCounterMode's count equals its forward FLOPs.

MoE dispatch: engine.moe_dispatch.grouped_ffn (sorted slab, per-expert matmuls or one grouped
kernel); Python loops over experts at most, never over tokens.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.cost_model import TransformerConfig, estimate, ffn_params, moe_block_flops
from engine.moe_dispatch import ffn_forward, grouped_ffn
from engine.moe_router import HashRouter, Routing, topk_softmax_route
from engine.timing import time_fn
from engine.validation import MAX_BYTES, check_bytes, check_choice, check_int


def _init(gen: torch.Generator, fan_in: int, *shape: int) -> nn.Parameter:
    # Seeded, scaled by 1/sqrt(fan_in) so activations keep roughly unit variance.
    return nn.Parameter(torch.randn(*shape, generator=gen) / fan_in ** 0.5)


class DenseFFN(nn.Module):
    """A dense FFN block, (T, D) -> (T, D); SwiGLU fuses gate and up into one (D, 2F) matrix."""

    def __init__(self, d_model: int, d_ff: int, ffn: str = "swiglu", seed: int = 0) -> None:
        super().__init__()
        self.ffn = check_choice("ffn", ffn, ("gelu", "swiglu"))
        check_int("d_model", d_model, 1, 1 << 17)
        check_int("d_ff", d_ff, 1, 1 << 20)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        self.w_in = _init(gen, d_model, d_model, d_ff * (2 if ffn == "swiglu" else 1))
        self.w_out = _init(gen, d_ff, d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, D) -> (T, D)."""
        return ffn_forward(x, self.w_in, self.w_out, self.ffn)


class MoEFFN(nn.Module):
    """Mixture-of-experts FFN, (T, D) -> (T, D): router, grouped dispatch, E experts, shared experts.

    router "learned": a gate Linear(D, E) and topk_softmax_route (Mixtral's rule); "hash": HashRouter
    on the hidden states (LSH, nothing learned). Shared experts run on every token and are fused into
    one dense FFN of width shared_experts * d_ff (same parameters and FLOPs).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, ffn: str = "swiglu",
                 router: str = "learned", shared_experts: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.ffn = check_choice("ffn", ffn, ("gelu", "swiglu"))
        self.router_kind = check_choice("router", router, ("learned", "hash"))
        check_int("d_model", d_model, 1, 1 << 17)
        check_int("d_ff", d_ff, 1, 1 << 20)
        self.num_experts = check_int("num_experts", num_experts, 1, 1 << 16)
        self.top_k = check_int("top_k", top_k, 1, num_experts)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        if router == "learned":
            self.gate = nn.Linear(d_model, num_experts, bias=False)
            self.gate.weight = _init(gen, d_model, num_experts, d_model)
        else:
            self.hash = HashRouter(num_experts, top_k, seed)
        width = d_ff * (2 if ffn == "swiglu" else 1)
        self.w_in = _init(gen, d_model, num_experts, d_model, width)     # (E, D, F or 2F)
        self.w_out = _init(gen, d_ff, num_experts, d_ff, d_model)        # (E, F, D)
        self.shared = DenseFFN(d_model, shared_experts * d_ff, ffn, seed + 1) if shared_experts else None

    def route(self, x: torch.Tensor) -> Routing:
        """Routing of x (T, D): experts (T, k) with -1 for empty slots, weights (T, k)."""
        if self.router_kind == "learned":
            return topk_softmax_route(self.gate(x), self.top_k)
        return self.hash(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, D) -> (T, D)."""
        routing = self.route(x)
        out = grouped_ffn(x, routing.experts, routing.weights, self.w_in, self.w_out, self.ffn,
                          drop_empty=self.router_kind == "hash")
        return out + self.shared(x) if self.shared is not None else out


class Attention(nn.Module):
    """Causal multi-head attention with grouped KV heads, explicit matmuls; x (B, S, D) -> (B, S, D).

    Math path (default): scores and values are full S x S matmuls with a causal mask (the cost
    model's causal=False count). flash=True calls scaled_dot_product_attention(is_causal=True)
    instead, which keeps no S x S tensor (a flash kernel where the device has one).
    """

    def __init__(self, cfg: TransformerConfig, gen: torch.Generator, flash: bool = False) -> None:
        super().__init__()
        self.flash = flash
        self.h, self.hkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.wq = _init(gen, d, d, self.h * self.hd)
        self.wk = _init(gen, d, d, self.hkv * self.hd)
        self.wv = _init(gen, d, d, self.hkv * self.hd)
        self.wo = _init(gen, d, self.h * self.hd, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D)."""
        b, s, _ = x.shape
        q = (x @ self.wq).view(b, s, self.h, self.hd).transpose(1, 2)          # (B, H, S, hd)
        k = (x @ self.wk).view(b, s, self.hkv, self.hd).transpose(1, 2)        # (B, Hkv, S, hd)
        v = (x @ self.wv).view(b, s, self.hkv, self.hd).transpose(1, 2)
        k = k.repeat_interleave(self.h // self.hkv, dim=1)
        v = v.repeat_interleave(self.h // self.hkv, dim=1)
        if self.flash:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.transpose(1, 2).reshape(b, s, -1) @ self.wo
        scores = (q @ k.transpose(-1, -2)) / self.hd ** 0.5
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, s, -1) @ self.wo


class TinyTransformer(nn.Module):
    """The whole decoder-only model of a config: ids (B, S) int64 -> logits (B, S, V).

    Meant for small configs (the FLOP and parameter cross-checks, measured training steps);
    refuses over 4 GiB of weights. attention "flash" uses scaled_dot_product_attention;
    checkpointing recomputes each layer in backward (torch.utils.checkpoint, non-reentrant).
    """

    def __init__(self, cfg: TransformerConfig, seed: int = 0, attention: str = "math",
                 checkpointing: bool = False) -> None:
        super().__init__()
        check_bytes("model weights", 4 * estimate(cfg).total_params)
        check_choice("attention", attention, ("math", "flash"))
        self.cfg = cfg
        self.checkpointing = bool(checkpointing)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.embed.weight = _init(gen, 1, cfg.vocab, cfg.d_model)
        self.attn = nn.ModuleList(Attention(cfg, gen, attention == "flash") for _ in range(cfg.n_layers))
        self.ffn = nn.ModuleList(make_ffn(cfg, i, seed + 10 + i) for i in range(cfg.n_layers))
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.d_model) for _ in range(2 * cfg.n_layers + 1))
        self.unembed = None if cfg.tied_embeddings else _init(gen, cfg.d_model, cfg.d_model, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S) int64 -> logits (B, S, V)."""
        x = self.embed(ids)
        for i in range(self.cfg.n_layers):
            x = (checkpoint(self.layer, i, x, use_reentrant=False) if self.checkpointing
                 else self.layer(i, x))
        x = self.norms[-1](x)
        return x @ (self.embed.weight.T if self.unembed is None else self.unembed)


    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer i (0-based): x (B, S, D) -> (B, S, D)."""
        b, s, d = x.shape
        x = x + self.attn[i](self.norms[2 * i](x))
        return x + self.ffn[i](self.norms[2 * i + 1](x).reshape(-1, d)).view(b, s, d)


def make_ffn(cfg: TransformerConfig, layer: int, seed: int = 0) -> nn.Module:
    """The FFN of layer `layer` (0-based) of `cfg`: MoEFFN when (layer + 1) % moe_every == 0."""
    if cfg.is_moe and (layer + 1) % cfg.moe_every == 0:
        return MoEFFN(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.ffn, cfg.router,
                      cfg.shared_experts, seed)
    return DenseFFN(cfg.d_model, cfg.d_ff, cfg.ffn, seed)


@dataclass(frozen=True)
class BlockBenchSettings:
    """A dense FFN against MoE blocks at matched active FLOPs (dense d_ff = top_k * expert d_ff)."""

    d_model: int = 512
    d_ff: int = 2048          # hidden width of one expert
    num_experts: int = 8
    top_k: int = 2
    ffn: str = "gelu"
    tokens: int = 16384
    routers: tuple[str, ...] = ("hash", "learned")
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 1
    reps: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("d_model", self.d_model, 1, 1 << 16)
        check_int("d_ff", self.d_ff, 1, 1 << 18)
        check_int("num_experts", self.num_experts, 1, 1024)
        check_int("top_k", self.top_k, 1, self.num_experts)
        check_choice("ffn", self.ffn, ("gelu", "swiglu"))
        check_int("tokens", self.tokens, 1, 1 << 22)
        for r in self.routers:
            check_choice("routers", r, ("hash", "learned"))
        if "hash" in self.routers:
            check_int("top_k", self.top_k, 1, 2)  # HashRouter hashes at most two slots
        check_choice("dtype", self.dtype, tuple(DTYPES))
        try:
            device_type = torch.device(self.device).type
        except RuntimeError:
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}") from None
        check_choice("device", device_type, ("cpu", "cuda"))
        check_int("warmup", self.warmup, 0, 100)
        check_int("reps", self.reps, 1, 1000)
        check_int("seed", self.seed, 0)

    @classmethod
    def from_config(cls, cfg: TransformerConfig, d_model: int = 512, tokens: int = 4096,
                    reps: int = 3, seed: int = 0) -> "BlockBenchSettings":
        """The FFN blocks of an MoE config, scaled to `d_model` with the same d_ff / d_model ratio."""
        if not cfg.is_moe:
            raise ValueError("num_experts must be >= 1 to time MoE blocks against dense")
        d_ff = max(1, round(cfg.d_ff * d_model / cfg.d_model))
        routers = ("hash", "learned") if cfg.top_k <= 2 else ("learned",)
        return cls(d_model, d_ff, cfg.num_experts, cfg.top_k, cfg.ffn, tokens, routers, reps=reps,
                   seed=seed)

    def working_set_bytes(self) -> float:
        """Rough peak bytes of one forward+backward of the widest block (weights, grads, activations)."""
        elt = torch.finfo(DTYPES[self.dtype]).bits // 8
        width = self.top_k * self.d_ff * (2 if self.ffn == "swiglu" else 1)
        weights = 2 * self.num_experts * self.d_model * self.d_ff * (3 if self.ffn == "swiglu" else 2)
        acts = self.tokens * (3 * width + (3 * self.top_k + 4) * self.d_model)
        return elt * (weights + 2 * acts)


@dataclass(frozen=True)
class BlockTiming:
    """One block's measurements: times in ms (median), FLOPs analytic, memory in MiB."""

    block: str
    d_ff: int
    forward_gflop: float        # analytic matmul GFLOP of one forward over all tokens, every token
                                # reaching top_k experts (a hash collision makes a token reach one)
    flop_ratio: float           # analytic forward FLOPs / the dense block's
    forward_ms: float
    fwd_bwd_ms: float
    fwd_bwd_min_ms: float
    fwd_bwd_max_ms: float
    tokens_per_s: float         # fwd+bwd
    time_ratio: float           # fwd+bwd time / the dense block's, same run
    saved_activations_mib: float  # tensors autograd saved for backward, parameters excluded
    peak_mib: float             # CUDA: peak allocated during fwd+bwd above the baseline; CPU: nan


DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "float16": torch.float16}


def _clear_grads(block: nn.Module, x: torch.Tensor) -> None:
    for p in block.parameters():
        p.grad = None
    x.grad = None


def _train_step(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    # Forward and backward from fresh gradients, so every step allocates them as training does.
    _clear_grads(block, x)
    block(x).backward(grad)


def _saved_bytes(block: nn.Module, x: torch.Tensor) -> int:
    param_storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x).sum().backward()
    return sum(seen.values())


def time_blocks(s: BlockBenchSettings,
                progress: Callable[[float, str], None] | None = None) -> list[BlockTiming]:
    """Time the dense block and one MoE block per router on the same x (tokens, d_model)."""
    dev = torch.device(s.device)
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {s.device} is not available on this machine; use cpu")
    limit = int(0.8 * torch.cuda.get_device_properties(dev).total_memory) if dev.type == "cuda" \
        else MAX_BYTES
    check_bytes("this benchmark", s.working_set_bytes(), limit)
    dtype = DTYPES[s.dtype]
    gen = torch.Generator().manual_seed(s.seed)
    x = torch.randn(s.tokens, s.d_model, generator=gen).to(dev, dtype)
    grad = torch.randn(s.tokens, s.d_model, generator=gen).to(dev, dtype)
    dense_ff = s.top_k * s.d_ff
    blocks: list[tuple[str, int, nn.Module, float]] = [
        ("dense", dense_ff, DenseFFN(s.d_model, dense_ff, s.ffn, s.seed),
         2 * ffn_params(s.d_model, dense_ff, s.ffn))]
    for r in s.routers:
        moe = MoEFFN(s.d_model, s.d_ff, s.num_experts, s.top_k, s.ffn, r, 0, s.seed)
        flops = sum(moe_block_flops(s.d_model, s.d_ff, s.ffn, s.num_experts, s.top_k, r).values())
        blocks.append((f"moe-{r}", s.d_ff, moe, flops))
    # Rounds interleave the blocks (dense, moe, moe, dense, ...) so drift on a shared machine or a
    # warming GPU hits every block alike; each round times one forward and one forward+backward.
    fwd_ms: list[list[float]] = [[] for _ in blocks]
    fb_ms: list[list[float]] = [[] for _ in blocks]
    for block in blocks:
        block[2].to(dev, dtype)
    xg = x.detach().requires_grad_()
    rounds = s.warmup + s.reps
    for rnd in range(rounds):
        for i, (name, _, block, _) in enumerate(blocks):
            if progress:
                progress((rnd * len(blocks) + i) / (rounds * len(blocks)),
                         f"round {rnd + 1}/{rounds}: {name}")

            def fwd() -> None:
                with torch.no_grad():
                    block(x)

            f = time_fn(fwd, dev, warmup=0, reps=1, flush_l2=False).median_ms
            fb = time_fn(lambda: _train_step(block, xg, grad), dev, warmup=0, reps=1,
                         flush_l2=False).median_ms
            if rnd >= s.warmup:
                fwd_ms[i].append(f)
                fb_ms[i].append(fb)
    rows: list[BlockTiming] = []
    for i, (name, d_ff, block, flops_per_token) in enumerate(blocks):
        peak = float("nan")
        if dev.type == "cuda":
            _clear_grads(block, xg)
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            _train_step(block, xg, grad)
            torch.cuda.synchronize(dev)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        fb = statistics.median(fb_ms[i])
        gflop = flops_per_token * s.tokens / 1e9
        rows.append(BlockTiming(
            name, d_ff, gflop, gflop / rows[0].forward_gflop if rows else 1.0,
            statistics.median(fwd_ms[i]), fb, min(fb_ms[i]), max(fb_ms[i]),
            s.tokens / (fb / 1e3), fb / rows[0].fwd_bwd_ms if rows else 1.0,
            _saved_bytes(block, xg) / 2**20, peak))
    if progress:
        progress(1.0, "done")
    return rows


# Tokens of the probe estimate_seconds times: at fewer, the MoE block's per-expert overhead
# dominates and the estimate comes out up to 1.5x long at the script's default shapes.
PROBE_TOKENS = 2048


def estimate_seconds(s: BlockBenchSettings) -> float:
    """Rough wall time of time_blocks(s) on a CPU (s), scaled linearly in tokens from time_blocks
    itself on at most PROBE_TOKENS tokens (one warm-up round, one timed).

    Timed, not derived from FLOPs: a CPU's rate varies several-fold with the machine, its load and
    the shapes (cost_measure.CPU_FLOPS' 10 GFLOP/s made the estimate 10x long on a 2-core machine
    that runs these blocks at about 100).
    """
    probe = replace(s, tokens=min(s.tokens, PROBE_TOKENS), warmup=1, reps=1)
    # Per block, time_blocks runs a forward and a forward+backward each round, then one more
    # forward+backward that counts the saved activations.
    ms = sum((s.warmup + s.reps) * (r.forward_ms + r.fwd_bwd_ms) + r.fwd_bwd_ms
             for r in time_blocks(probe))
    return ms / 1e3 * s.tokens / probe.tokens
