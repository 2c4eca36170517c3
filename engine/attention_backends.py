"""One zero-argument call per attention backend on one shape's inputs, and the fp32 reference.

FA4/FA3/FA2 take (B, S, H, D); SDPA and FlexAttention take (B, H, S, D), given as their own
contiguous copies so no backend is timed on a transposed view. Masks (engine.attention_masks):
FA4 through window_size / softcap / its variable-length entry point (packed documents), Flex
through a block mask and score_mod, SDPA through an explicit boolean mask.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import flash_attention3 as fa
from engine.attention_masks import SOFTCAP, cu_seqlens, dense_mask, document_ids, flex_mods, window_of
from engine.attention_shapes import DTYPES, Shape, uses_bhsd

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
    "sdpa-fa4": SDPBackend.FLASH_ATTENTION,
}
REF_ROWS = 1024  # query rows of the fp32 reference slice
GPU_ONLY = ("sdpa-efficient", "sdpa-cudnn", "sdpa-fa4")


def backend_unavailable(backend: str, device: torch.device, dtype: str, mask: str = "none") -> str | None:
    """Why `backend` cannot run on `device` at `dtype` with `mask`, or None when it can."""
    cuda = device.type == "cuda"
    if backend == "fa4":
        ok, why = fa.fa4_readiness(device)
        if not ok:
            return "FA4 " + why
        if dtype == "fp32":
            return "FA4 takes fp16/bf16"
    if backend == "fa3":
        ok, why = fa.fa3_readiness(device)
        if not ok:
            return "FA3 " + why
        if DTYPES[dtype] not in fa.fa3_dtypes():
            return f"{fa.PROVIDER.module} has no {dtype} kernels"
    if backend == "fa2":
        if not fa.FA2.available:
            return "flash-attn (FA2) not installed"
        if not cuda or fa.device_capability(device) < (8, 0) or dtype == "fp32":
            return "FA2 needs an sm_80+ GPU and fp16/bf16"
    if backend in GPU_ONLY and not cuda:
        return "CUDA only"
    if backend == "sdpa-fa4":
        if not hasattr(torch.nn.attention, "activate_flash_attention_impl"):
            return f"torch {torch.__version__} has no activate_flash_attention_impl"
        if not fa._HAS_FLASH4:
            return "FA4 not installed"
    if backend == "flex":
        if not fa.HAS_FLEX:
            return fa.FLEX_REASON
        if not cuda:
            return "CPU: FlexAttention needs torch.compile (~30 s per shape here); GPU only"
    if mask != "none":
        if backend in ("fa3", "fa2", "wrapper", "sdpa-fa4"):
            return f"{backend} has no {mask} mask here (causal only)"
        if mask == "softcap" and backend.startswith("sdpa"):
            return "SDPA has no softcap"
    return None


def make_inputs(shape: Shape, device: torch.device, seed: int, backends: list[str], grad: bool
                ) -> dict[str, torch.Tensor]:
    """q, k, v (B, S, H, D) from a seeded normal, their (B, H, S, D) copies if a backend needs them,
    and for a "documents" mask its document ids, cumulative offsets and longest document (a CPU scalar)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[shape.dtype]
    b, s, d = shape.batch, shape.seqlen, shape.head_dim
    t = {n: torch.randn(b, s, h, d, generator=gen, device=device, dtype=dt)
         for n, h in (("q", shape.heads), ("k", shape.kv_heads), ("v", shape.kv_heads))}
    if uses_bhsd(backends):
        t.update({f"{n}_bhsd": t[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")})
    if grad:
        for x in t.values():
            x.requires_grad_(True)
    if shape.mask == "documents":
        t["doc"] = document_ids(s, b, seed, device)
        t["cu_seqlens"], longest = cu_seqlens(s, b, seed, device)
        t["longest_doc"] = torch.tensor(longest)  # on the host: FA4's runner reads it without a device sync
    return t


def reference(t: dict[str, torch.Tensor], shape: Shape, dout: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 attention for batch 0, kv head 0's query heads, the last REF_ROWS queries, written out
    (scores, softcap, mask, softmax, times v): out (rows, group, D) in bshd order, and with `dout`
    (the same slice of the output's gradient) dq of those rows, which depends on them alone."""
    g = shape.heads // shape.kv_heads
    rows = min(REF_ROWS, shape.seqlen)
    q = t["q"].detach()[0, -rows:, :g].float().transpose(0, 1).requires_grad_(dout is not None)  # (g, rows, D)
    k = t["k"].detach()[0, :, 0].float()  # (S, D)
    v = t["v"].detach()[0, :, 0].float()
    with torch.enable_grad() if dout is not None else torch.no_grad():
        scores = q @ k.T / math.sqrt(shape.head_dim)  # (g, rows, S)
        if shape.mask == "softcap":
            scores = SOFTCAP * torch.tanh(scores / SOFTCAP)
        if shape.causal or shape.mask != "none":
            q_pos = torch.arange(shape.seqlen - rows, shape.seqlen, device=q.device)
            k_pos = torch.arange(shape.seqlen, device=q.device)
            doc = t["doc"][:1] if "doc" in t else None
            keep = dense_mask(shape.mask if shape.mask != "none" else "causal", q_pos, k_pos, doc)
            scores = scores.masked_fill(~keep.reshape(-1, rows, shape.seqlen), -math.inf)
        out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)
        if dout is None:
            return out, None
        (dq,) = torch.autograd.grad(out, q, dout.float())
    return out.detach(), dq.transpose(0, 1)


def output_slice(out: torch.Tensor, shape: Shape, bhsd: bool) -> torch.Tensor:
    """The reference's slice of a backend's output (or of a gradient shaped like q), (rows, group, D) fp32."""
    g, rows = shape.heads // shape.kv_heads, min(REF_ROWS, shape.seqlen)
    if bhsd:
        out = out.transpose(1, 2)
    return out.detach()[0, -rows:, :g].float()


def _current_impl() -> str | None:
    return getattr(torch.nn.attention, "current_flash_attention_impl", lambda: None)()


def set_sdpa_flash(impl: str | None) -> None:
    """Make SDPA's flash backend run FA4 ("FA4") or torch's own kernel (None); a no-op if it already does."""
    if impl == "FA4" and _current_impl() != "FA4":
        torch.nn.attention.activate_flash_attention_impl("FA4")
    elif impl is None and _current_impl() is not None:
        torch.nn.attention.restore_flash_attention_impl()


def runner(backend: str, t: dict[str, torch.Tensor], shape: Shape) -> tuple[Callable[[], torch.Tensor], bool]:
    """A zero-argument call of `backend` on the inputs, and whether its output is (B, H, S, D)."""
    c, mask = shape.causal, shape.mask
    if backend == "fa4":
        return _fa4_runner(t, shape), False
    if backend == "fa3":
        return lambda: fa.fa3_call(t["q"], t["k"], t["v"], c), False
    if backend == "fa2":
        return lambda: fa.fa2_call(t["q"], t["k"], t["v"], c), False
    if backend == "wrapper":
        return lambda: fa.attention(t["q"], t["k"], t["v"], c), False
    q, k, v = t["q_bhsd"], t["k_bhsd"], t["v_bhsd"]
    gqa = shape.heads != shape.kv_heads
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block, score_mod = None, None
        if c:
            mask_mod, score_mod = flex_mods(mask if mask != "none" else "causal", t.get("doc"))
            block = create_block_mask(mask_mod, shape.batch if mask == "documents" else None, None,
                                      shape.seqlen, shape.seqlen, device=q.device)
        return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=gqa), True
    explicit = None
    if mask not in ("none", "causal", "softcap"):  # SDPA needs the mask written out: (B|1, 1, S, S)
        pos = torch.arange(shape.seqlen, device=q.device)
        explicit = dense_mask(mask, pos, pos, t.get("doc"))
        explicit = explicit.unsqueeze(1) if explicit.dim() == 3 else explicit
    kind = SDPA_BACKENDS.get(backend)
    impl = "FA4" if backend == "sdpa-fa4" else None

    def run() -> torch.Tensor:
        set_sdpa_flash(impl)  # FA4 inside SDPA for sdpa-fa4 only, whatever ran before
        with sdpa_kernel(kind) if kind is not None else contextlib.nullcontext():
            if explicit is not None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=explicit, enable_gqa=gqa)
            return fa.sdpa_call(q, k, v, c)

    return run, True


def _fa4_runner(t: dict[str, torch.Tensor], shape: Shape) -> Callable[[], torch.Tensor]:
    q, k, v = t["q"], t["k"], t["v"]
    w = window_of(shape.mask)
    softcap = SOFTCAP if shape.mask == "softcap" else 0.0
    if shape.mask != "documents":
        return lambda: fa.fa4_call(q, k, v, shape.causal, window=w, softcap=softcap)
    # Packed documents: FA4's variable-length entry over the flattened (B*S) tokens.
    cu, longest = t["cu_seqlens"], int(t["longest_doc"])
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    func = fa._FA4_MODULE.flash_attn_varlen_func

    def run() -> torch.Tensor:
        out = func(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                   causal=True)
        return (out[0] if isinstance(out, tuple) else out).view(q.shape)

    return run
