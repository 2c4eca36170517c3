"""FlashAttention-3 or -4 when a kernel is installed and the call qualifies, else torch's SDPA.

Forward-only calls take FA3 first, then FA4; calls whose inputs need gradients take FA4 first
(fa3-fwd has no backward), then an official FA3 build; `prefer=` puts one first. Whatever cannot
run says why in the path's reason, and SDPA runs.

Layouts: FA3, FA4 and FA2 take (B, S, H, D); SDPA and FlexAttention take (B, H, S, D). `attention()`
accepts either (`layout="bshd"` or `"bhsd"`) and returns the output in the layout it was given.
Grouped-query attention: k and v may have fewer heads than q (H_q divisible by H_kv); query head
h attends to kv head h // (H_q / H_kv) on every path.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from engine.validation import check_choice

# Import names of FA3 builds, in order of preference: the official hopper/ build (installed as
# `flash_attn_interface`, or by some releases as the `flash_attn_3` package), then PyPI's
# forward-only `fa3-fwd`.
_PROVIDERS = (
    ("flash_attn_interface", "flash-attention hopper/ (official FA3)"),
    ("flash_attn_3.flash_attn_interface", "flash_attn_3 package (official FA3)"),
    ("fa3_fwd_interface", "fa3-fwd (PyPI, forward only)"),
)
LAYOUTS = ("bshd", "bhsd")
PREFER = ("auto", "fa4", "fa3", "sdpa")


@dataclass(frozen=True)
class ProviderStatus:
    """Which kernel build imported (module, description, version), or why none did."""

    available: bool
    module: str | None
    description: str
    version: str | None
    reason: str


@dataclass(frozen=True)
class AttentionPath:
    """The kernel `attention()` runs for a call ("fa4", "fa3" or "sdpa") and why."""

    backend: str
    reason: str


def _import_first(candidates: tuple[tuple[str, str], ...], dists: tuple[str, ...]
                  ) -> tuple[ModuleType | None, ProviderStatus]:
    errors = []
    for name, desc in candidates:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a build that fails to load its .so
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if not hasattr(mod, "flash_attn_func"):
            errors.append(f"{name}: has no flash_attn_func")
            continue
        return mod, ProviderStatus(True, name, desc, _version_of(dists), "imported")
    return None, ProviderStatus(False, None, "none", None,
                                "not installed (" + "; ".join(errors) + ")")


def _detect() -> tuple[ModuleType | None, ProviderStatus]:
    return _import_first(_PROVIDERS, ("flash_attn_3", "flash-attn-3", "fa3-fwd", "flash_attn"))


def _version_of(dists: tuple[str, ...]) -> str | None:
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


_FA3_MODULE, PROVIDER = _detect()
_HAS_FLASH3: bool = PROVIDER.available
# FA2 from the `flash-attn` package (Ampere and newer, fp16/bf16, head dim <= 256).
_FA2_MODULE, FA2 = _import_first((("flash_attn", "flash-attn (FA2)"),), ("flash-attn", "flash_attn"))
# FA4 from `flash-attn-4` (CuTe DSL, compiled at first use per configuration): forward and
# backward on sm_90 and sm_100, fp16/bf16.
_FA4_MODULE, FA4 = _import_first((("flash_attn.cute.interface", "flash-attn-4 (CuTe DSL)"),), ("flash-attn-4",))
_HAS_FLASH4: bool = FA4.available


def _flex_status() -> tuple[bool, str]:
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as exc:
        return False, f"torch {torch.__version__} has no FlexAttention ({exc})"
    return True, "torch.nn.attention.flex_attention"


HAS_FLEX, FLEX_REASON = _flex_status()


def fa3_dtypes() -> tuple[torch.dtype, ...]:
    """Input dtypes the loaded FA3 build runs through `attention()` (fa3-fwd has no fp16 kernels)."""
    if not _HAS_FLASH3:
        return ()
    if PROVIDER.module == "fa3_fwd_interface":
        return (torch.bfloat16,)
    return (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device, None for other devices (cached)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class _Kernel:
    """A kernel family: its name, the compute capabilities it runs on, and how to say so."""

    name: str
    fits: Callable[[tuple[int, int]], bool]
    arch: str  # what the GPU must be, e.g. "Hopper sm_90"
    gpu: str  # the same as a noun, e.g. "a Hopper GPU"
    install: str


_FA3 = _Kernel("FA3", lambda cap: cap == (9, 0), "Hopper sm_90", "a Hopper GPU",
               "pip install fa3-fwd, or build flash-attention's hopper/")
_FA4 = _Kernel("FA4", lambda cap: cap[0] in (9, 10), "sm_90 or sm_100", "an sm_90 or sm_100 GPU",
               "pip install flash-attn-4")


def _readiness(device: torch.device | None, installed: bool, lib: ProviderStatus, kernel: _Kernel
               ) -> tuple[bool, str]:
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not installed:
        return False, f"not installed ({kernel.install})"
    if device.type != "cuda":
        return False, f"{lib.description} installed, but this is a CPU run; {kernel.name} needs {kernel.gpu}"
    cap = device_capability(device)
    if not kernel.fits(cap):
        return False, f"{lib.description} installed, but the GPU is sm_{cap[0]}{cap[1]}, not {kernel.arch}"
    return True, f"{lib.description} {lib.version or ''}".strip()


def fa3_readiness(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether FA3 can run on `device` (default: cuda if present, else cpu) and a one-line why."""
    return _readiness(device, _HAS_FLASH3, PROVIDER, _FA3)


def fa4_head_dim_ok(head_dim: int, cap: tuple[int, int]) -> bool:
    """Whether FA4 has kernels for this head dim on compute capability `cap` (q, k and v alike)."""
    if head_dim % 8:
        return False
    if cap[0] == 9:
        return 8 <= head_dim <= 256
    return 8 <= head_dim <= 128 or head_dim == 256  # sm_100


def fa4_readiness(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether FA4 can run on `device` (default: cuda if present, else cpu) and a one-line why."""
    return _readiness(device, _HAS_FLASH4, FA4, _FA4)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str,
                  causal: bool = False) -> None:
    """Raise ValueError for what neither FA3 nor SDPA can take; shapes are read in `layout`."""
    check_choice("layout", layout, LAYOUTS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({layout.upper()}), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.dtype.is_floating_point or q.element_size() < 2:
        raise ValueError(f"dtype must be float16, bfloat16 or float32 (fp8 needs descale factors), "
                         f"got {q.dtype}")
    s_dim, h_dim = (1, 2) if layout == "bshd" else (2, 1)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[s_dim] != v.shape[s_dim]:
        raise ValueError(f"k and v seqlens differ: {k.shape[s_dim]} vs {v.shape[s_dim]}")
    if k.shape[h_dim] != v.shape[h_dim]:
        raise ValueError(f"k and v head counts differ: {k.shape[h_dim]} vs {v.shape[h_dim]}")
    if q.shape[h_dim] % k.shape[h_dim]:
        raise ValueError(f"q heads ({q.shape[h_dim]}) must be a multiple of kv heads ({k.shape[h_dim]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if causal and q.shape[s_dim] != k.shape[s_dim]:  # FA3 masks bottom-right, SDPA top-left
        raise ValueError(f"causal attention needs S_q == S_k, got S_q {q.shape[s_dim]}, "
                         f"S_k {k.shape[s_dim]}")


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _device_why_not(q: torch.Tensor, installed: bool, kernel: _Kernel) -> str | None:
    """Why `kernel` cannot run where q lives (not installed, not CUDA, another arch), or None."""
    if not installed:
        return f"{kernel.name} not installed"
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}; {kernel.name} needs {kernel.gpu}"
    cap = device_capability(q.device)
    if not kernel.fits(cap):
        return f"GPU is sm_{cap[0]}{cap[1]}; {kernel.name} needs {kernel.arch}"
    return None


def _fa3_why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why FA3 cannot take this call, or None when it can."""
    why = _device_why_not(q, _HAS_FLASH3, _FA3)
    if why is not None:
        return why
    if q.dtype not in fa3_dtypes():
        names = ", ".join(str(d).removeprefix("torch.") for d in fa3_dtypes())
        return f"{PROVIDER.module} takes {names}, not {q.dtype}"
    d, dv = q.shape[3], v.shape[3]
    if d % 8 or d > 256 or dv != d:
        return f"head dims q/k {d}, v {dv}: FA3 needs equal, a multiple of 8, <= 256"
    if PROVIDER.module == "fa3_fwd_interface" and _needs_grad(q, k, v):
        return "inputs require grad and fa3-fwd is forward only"
    return None


def _fa4_why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why FA4 cannot take this call, or None when it can."""
    why = _device_why_not(q, _HAS_FLASH4, _FA4)
    if why is not None:
        return why
    cap = device_capability(q.device)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 takes float16, bfloat16, not {q.dtype}"
    d, dv = q.shape[3], v.shape[3]
    if dv != d or not fa4_head_dim_ok(d, cap):
        allowed = "8-256" if cap[0] == 9 else "8-128 or 256"
        return f"head dims q/k {d}, v {dv}: FA4 on sm_{cap[0]}{cap[1]} needs equal, a multiple of 8, {allowed}"
    return None


_WHY_NOT = {"fa3": _fa3_why_not, "fa4": _fa4_why_not}


def choose_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str = "bshd",
                causal: bool = False, prefer: str = "auto") -> AttentionPath:
    """Which kernel `attention()` would run for these tensors, and why (no computation).

    Forward-only: FA3, then FA4. Inputs needing grad: FA4, then FA3 (official builds). `prefer`
    ("fa4", "fa3", "sdpa") is tried first; the reason names every kernel passed over and why.
    """
    check_choice("prefer", prefer, PREFER)
    _check_inputs(q, k, v, layout, causal)
    if prefer == "sdpa":
        return AttentionPath("sdpa", "asked for SDPA")
    order = ["fa4", "fa3"] if _needs_grad(q, k, v) else ["fa3", "fa4"]
    if prefer != "auto":
        order.remove(prefer)
        order.insert(0, prefer)
    passed = []
    for name in order:
        why = _WHY_NOT[name](q, k, v)
        if why is None:
            lib = PROVIDER.description if name == "fa3" else FA4.description
            cap = device_capability(q.device)
            where = f"sm_{cap[0]}{cap[1]}" if cap else q.device.type
            took = f"{lib} on {where}, {q.dtype}, head dim {q.shape[3]}"
            return AttentionPath(name, "; ".join([*passed, took]))
        passed.append(f"asked for {name.upper()}: {why}" if name == prefer else why)
    return AttentionPath("sdpa", "; ".join(passed))


def fa3_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
             softmax_scale: float | None = None) -> torch.Tensor:
    """The FA3 provider's flash_attn_func on (B, S, H, D) inputs; returns out (B, S, H_q, D)."""
    if _FA3_MODULE is None:
        raise RuntimeError(f"FA3 is not available: {PROVIDER.reason}")
    out = _FA3_MODULE.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
    return out[0] if isinstance(out, tuple) else out  # older official builds return (out, lse)


def fa2_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
             softmax_scale: float | None = None) -> torch.Tensor:
    """flash-attn (FA2) flash_attn_func on (B, S, H, D) inputs; returns out (B, S, H_q, D)."""
    if _FA2_MODULE is None:
        raise RuntimeError(f"FA2 is not available: {FA2.reason}")
    out = _FA2_MODULE.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def fa4_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
             softmax_scale: float | None = None, window: int | None = None, softcap: float = 0.0
             ) -> torch.Tensor:
    """FA4's flash_attn_func on (B, S, H, D) inputs; returns out (B, S, H_q, D), differentiable.

    window: each query sees itself and the `window` keys before it (FA's window_size (w, 0)).
    softcap: scores become softcap * tanh(scores / softcap) (0: off). First call per
    configuration compiles the kernel (seconds); the backward compiles at its own first call.
    """
    if _FA4_MODULE is None:
        raise RuntimeError(f"FA4 is not available: {FA4.reason}")
    size = (window, 0) if window is not None else (None, None)
    out = _FA4_MODULE.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                      window_size=size, softcap=softcap)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              softmax_scale: float | None = None) -> torch.Tensor:
    """torch SDPA on (B, H, S, D) inputs with GQA; returns out (B, H_q, S, D).

    Causal means query i sees keys <= i (top-left), which equals FA3's bottom-right alignment
    when S_q == S_k, the only case the labs use.
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)


def attention_with_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        softmax_scale: float | None = None, layout: str = "bshd", prefer: str = "auto"
                        ) -> tuple[torch.Tensor, AttentionPath]:
    """Like `attention()`, and also returns the path taken and why."""
    path = choose_path(q, k, v, layout, causal, prefer)
    if path.backend in ("fa3", "fa4"):
        call = fa3_call if path.backend == "fa3" else fa4_call
        if layout == "bshd":
            return call(q, k, v, causal, softmax_scale), path
        out = call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale)
        return out.transpose(1, 2), path
    if layout == "bhsd":
        return sdpa_call(q, k, v, causal, softmax_scale), path
    out = sdpa_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale)
    return out.transpose(1, 2), path


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              softmax_scale: float | None = None, layout: str = "bshd", prefer: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v via FA3/FA4 if one qualifies, else SDPA.

    q: (B, S_q, H_q, D) for layout "bshd" or (B, H_q, S_q, D) for "bhsd"; k, v: the same with H_kv
    heads and S_k keys (causal needs S_k == S_q). Returns out in the input layout; scale defaults
    to 1/sqrt(D). prefer: "auto", "fa4", "fa3" or "sdpa" (tried first; falls back with a reason).
    """
    return attention_with_path(q, k, v, causal, softmax_scale, layout, prefer)[0]
