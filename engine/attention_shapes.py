"""Attention sweep settings: presets, the shapes they expand to, FLOP and byte counts.

Shapes follow the FA3 paper: batch = tokens // seqlen, heads = hidden // head_dim, kv heads =
heads // gqa. FLOPs are 4 * B * H * S_q * S_k * D forward (QK^T and PV), halved when causal (the
papers' count); forward + backward is 3.5x forward (backward 2.5x: five matmuls against two).
Mask rows count exactly the (query, key) pairs the mask keeps (engine.attention_masks).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from engine.attention_masks import check_mask, kept_pairs
from engine.validation import check_choice, check_float, check_int

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_NAMES = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
# "sdpa" is SDPA's own choice (no backend forced): the default a model gets. "sdpa-fa4" is SDPA's
# flash backend with FA4 activated inside it. "wrapper" is engine.flash_attention3.attention().
BACKENDS = ("fa4", "fa3", "fa2", *SDPA_NAMES, "sdpa-fa4", "flex", "wrapper")
MODES = ("fwd", "fwd+bwd")
BWD_FACTOR = 2.5  # backward FLOPs over forward FLOPs (two matmuls forward, five backward)


@dataclass(frozen=True)
class SweepSettings:
    """One sweep: every combination of dtype x head dim x GQA ratio x mask x seqlen, each backend.

    `causal` lists plain rows (mask "none" or "causal"); `masks`, when given, replaces it with
    named masks (engine.attention_masks.MASKS). Timing: warm up for `warmup_ms`, then time `windows`
    windows of at least `rep_ms` and `min_reps` calls each (engine.timing.steady_time) and report
    their median: on an H200 about one 100 ms window in eight ran 5-19% slow (2026-12-03), which
    moves a single window's figure but not a median of three. With a cross-check
    (engine.attention_bench.run_sweep), as many windows of do_bench, in ABBA order.
    """

    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...] = (128,)
    causal: tuple[bool, ...] = (False,)
    gqa: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("bf16",)
    tokens: int = 16384
    hidden: int = 2048
    backends: tuple[str, ...] = ("fa4", "fa3", "fa2", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
    mode: str = "fwd"
    masks: tuple[str, ...] = ()
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 3
    windows: int = 3
    seed: int = 0
    device: str = "auto"


PRESETS: dict[str, SweepSettings] = {
    # FA3 paper (Shah et al. 2024, figs. 5-6): 16k tokens, hidden 2048, head dim 64/128/256.
    "fa3-paper": SweepSettings(seqlens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128, 256),
                               causal=(False, True)),
    # The same shapes forward and backward, as a training step runs them (fa3-fwd has no backward).
    "fa3-paper-train": SweepSettings(seqlens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128, 256),
                                     causal=(False, True), mode="fwd+bwd",
                                     backends=("fa4", "fa3", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")),
    # Masks people train with, causal throughout, forward and backward, head dim 128, 16k tokens.
    "masks": SweepSettings(seqlens=(16384,), masks=("causal", "window-1k", "window-4k", "documents", "softcap"),
                           mode="fwd+bwd", backends=("fa4", "flex", "sdpa-cudnn", "sdpa-efficient")),
    # A few seconds on a CPU (fp32: CPU attention has no fast bf16 path); same code as the paper sweep.
    "quick": SweepSettings(seqlens=(128, 256, 512), head_dims=(64,), causal=(False, True), dtypes=("fp32",),
                           tokens=1024, hidden=256, rep_ms=20.0, warmup_ms=5.0,
                           backends=("fa4", "fa3", "sdpa-flash", "sdpa-math", "wrapper")),
    # Grouped-query attention at head dim 128: 1, 4 and 8 query heads per kv head.
    "gqa": SweepSettings(seqlens=(1024, 4096, 16384), gqa=(1, 4, 8), causal=(False, True),
                         backends=("fa4", "fa3", "sdpa-flash", "sdpa-cudnn", "flex", "wrapper")),
}


@dataclass(frozen=True)
class Shape:
    """One attention problem; tensors are (B, S, H, D) for FA and (B, H, S, D) for SDPA/Flex."""

    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    dtype: str
    mask: str = "none"


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs of attention: 4*B*H*S_q*S_k*D forward (QK^T and PV), halved if causal; bwd is 2.5x fwd."""
    check_choice("mode", mode, MODES)
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return fwd * (1 + BWD_FACTOR) if mode == "fwd+bwd" else fwd


def shape_flops(shape: Shape, mode: str, seed: int = 0) -> float:
    """FLOPs one call does on `shape`: the paper's count, or 4*D*H*(kept pairs) for a named mask."""
    if shape.mask == "none":  # plain rows: the papers' count (causal S^2/2, S(S+1)/2 to within 1/S)
        return attention_flops(shape.batch, shape.heads, shape.seqlen, shape.seqlen, shape.head_dim,
                               shape.causal, mode)
    fwd = 4.0 * shape.heads * shape.head_dim * kept_pairs(shape.mask, shape.seqlen, shape.batch, seed)
    return fwd * (1 + BWD_FACTOR) if mode == "fwd+bwd" else fwd


def shapes_of(s: SweepSettings) -> list[Shape]:
    """Validate the settings and list the shapes in sweep order; ValueError names the bad field."""
    if not s.seqlens or not s.head_dims or not (s.causal or s.masks) or not s.gqa or not s.dtypes or not s.backends:
        raise ValueError("seqlens, head_dims, causal, gqa, dtypes and backends must each be non-empty")
    tokens = check_int("tokens", s.tokens, 1, 2**22)
    hidden = check_int("hidden", s.hidden, 8, 65536)
    for b in s.backends:
        check_choice("backend", b, BACKENDS)
    if len(set(s.backends)) != len(s.backends):
        raise ValueError(f"backends must not repeat, got {', '.join(s.backends)}")
    check_choice("mode", s.mode, MODES)
    check_float("warmup_ms", s.warmup_ms, 0.0, 10_000.0)
    check_float("rep_ms", s.rep_ms, 1.0, 10_000.0)
    check_int("min_reps", s.min_reps, 1, 1000)
    check_int("windows", s.windows, 1, 100)
    for m in s.masks:
        check_mask(m)
    # Named masks are all causal (decoder training); plain rows are causal or not, mask "none".
    kinds = [(True, m) for m in s.masks] or [(bool(c), "none") for c in s.causal]
    out = []
    for dtype, d, g, (causal, mask), seqlen in itertools.product(s.dtypes, s.head_dims, s.gqa, kinds, s.seqlens):
        check_choice("dtype", dtype, tuple(DTYPES))
        check_int("seqlen", seqlen, 16, 131072)
        check_int("head_dim", d, 8, 256)
        if d % 8 or hidden % d:
            raise ValueError(f"head_dim must be a multiple of 8 dividing hidden ({hidden}), got {d}")
        heads = hidden // d
        check_int("gqa", g, 1, heads)
        if heads % g:
            raise ValueError(f"gqa must divide the head count ({heads} = hidden / head_dim), got {g}")
        out.append(Shape(max(1, tokens // seqlen), seqlen, heads, heads // g, d, causal, dtype, mask))
    return out


def uses_bhsd(backends: tuple[str, ...] | list[str]) -> bool:
    """Whether any backend takes SDPA's (B, H, S, D) layout (a second, contiguous copy of q, k, v)."""
    return any(b.startswith("sdpa") or b == "flex" for b in backends)


def input_bytes(shape: Shape, backends: tuple[str, ...]) -> int:
    """Bytes of q, k, v and one output, in (B, S, H, D) and, for SDPA/Flex backends, (B, H, S, D)."""
    elt = DTYPES[shape.dtype].itemsize
    one = shape.batch * shape.seqlen * shape.head_dim * elt * (2 * shape.heads + 2 * shape.kv_heads)
    return one * (2 if uses_bhsd(backends) else 1)


def math_bytes(shape: Shape, mode: str) -> int:
    """Bytes SDPA-math materialises: (B, H, S, S) scores, probabilities and temporaries, and the mask.

    12 bytes per score element forward (measured on an H100: 8.7 at bf16), 16 with backward.
    """
    s2 = shape.batch * shape.heads * shape.seqlen**2
    return (4 if mode == "fwd+bwd" else 3) * s2 * 4 + shape.batch * shape.seqlen**2


def mask_bytes(shape: Shape) -> int:
    """Bytes of an explicit (B, 1, S, S) boolean mask, which SDPA needs for window/document masks."""
    return shape.batch * shape.seqlen**2 if shape.mask not in ("none", "causal", "softcap") else 0


def describe(s: SweepSettings) -> dict[str, Any]:
    """A settings dict for result documents (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}


def settings_for(preset: str, **overrides: Any) -> SweepSettings:
    """A preset's settings with some fields replaced (None values are ignored)."""
    check_choice("preset", preset, tuple(PRESETS))
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
