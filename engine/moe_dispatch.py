"""MoE expert dispatch: the (T, k) assignments of a routing run through E expert FFNs.

Both paths flatten the T x k slots, sort them by expert and gather the tokens into one contiguous
slab (as in Mixtral's block), then run each expert on its slice:

- loop: one matmul pair per expert, with the slice sizes read back to the host (one sync per
  call). Any device and dtype.
- grouped: torch._grouped_mm runs all experts in one kernel per matrix, reading the slice ends
  from a device tensor, so the host never waits for the GPU. CUDA sm90 in bf16 only (other
  GPUs and dtypes take a fallback inside torch that syncs). Empty slots (-1) cannot be cut out of
  the slab without knowing their number on the host, so they sort last and run through the last
  expert with weight 0: every row of the slab is a real product and the result is exact.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.routing_core import bincount


def ffn_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, ffn: str) -> torch.Tensor:
    """One FFN on x (n, D): w_in (D, F) for GELU or (D, 2F) [gate | up] for SwiGLU, w_out (F, D)."""
    return _act(x @ w_in, ffn) @ w_out


def _act(h: torch.Tensor, ffn: str) -> torch.Tensor:
    if ffn == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


@functools.cache
def _grouped_kernel(device: int) -> bool:
    """Whether torch has _grouped_mm and CUDA device `device` is sm90 (its fast kernel). Not sm100
    yet: there, weight gradients of an empty group were reported non-zero (pytorch/pytorch#172439),
    and an expert with no tokens in a step is an empty group."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] == 9


def grouped_mm_runs(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether `grouped_ffn` takes torch._grouped_mm's sync-free kernel for x (T, D): CUDA sm90,
    bf16 inputs or a bf16 autocast, every row 16-byte aligned (widths multiples of 8)."""
    if not x.is_cuda or not _grouped_kernel(x.device.index or 0):
        return False
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return bf16 and all(n % 8 == 0 for n in (*w_in.shape[1:], *w_out.shape[1:]))


def grouped_ffn(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w_in: torch.Tensor,
                w_out: torch.Tensor, ffn: str, drop_empty: bool = True,
                grouped: bool | None = None) -> torch.Tensor:
    """Weighted sum of expert outputs (T, D) for x (T, D), experts/weights (T, k) (-1 = empty
    slot, weight 0), w_in (E, D, F or 2F), w_out (E, F, D).

    grouped: torch._grouped_mm (bf16, no host sync) or the per-expert loop; None picks the
    grouped kernel where `grouped_mm_runs`. drop_empty (loop only): skip empty slots (hash
    collisions, capacity drops, Expert Choice padding); False when the caller knows there are none.
    """
    if grouped if grouped is not None else grouped_mm_runs(x, w_in, w_out):
        return _grouped_mm_ffn(x, experts, weights, w_in, w_out, ffn)
    flat_expert = experts.reshape(-1)
    flat_weight = weights.reshape(-1)
    flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(experts.shape[1])
    if drop_empty:
        keep = flat_expert >= 0
        flat_expert, flat_weight, flat_token = flat_expert[keep], flat_weight[keep], flat_token[keep]
    order = torch.argsort(flat_expert, stable=True)
    token = flat_token[order]
    counts = torch.bincount(flat_expert, minlength=w_in.shape[0]).tolist()  # one host sync
    slab = x.index_select(0, token)
    outs = [ffn_forward(chunk, w_in[e], w_out[e], ffn)
            for e, chunk in enumerate(slab.split(counts)) if counts[e]]
    if not outs:  # every slot dropped
        return torch.zeros_like(x)
    y = torch.cat(outs)
    y = y * flat_weight[order, None].to(y.dtype)
    # y may be bf16 under autocast while x is float32: accumulate in x's dtype.
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def _grouped_mm_ffn(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                    w_in: torch.Tensor, w_out: torch.Tensor, ffn: str) -> torch.Tensor:
    """grouped_ffn through torch._grouped_mm in bf16; the result in x's dtype (autocast sums in
    float32 anyway)."""
    t, k = experts.shape
    e = w_in.shape[0]
    bf16 = torch.bfloat16
    flat = experts.reshape(-1)
    keys = torch.where(flat >= 0, flat, e)          # empty slots sort after every expert ...
    order = torch.argsort(keys, stable=True)
    ends = torch.cumsum(bincount(keys.clamp(max=e - 1), e), 0).to(torch.int32)  # ... into the last
    slab = x.to(bf16).index_select(0, order // k)   # slot p belongs to token p // k
    h = _act(torch._grouped_mm(slab, w_in.to(bf16), offs=ends), ffn)
    y = torch._grouped_mm(h, w_out.to(bf16), offs=ends)
    # Back to slot order with a copy (no atomics: deterministic), then each token's k outputs
    # weighted and summed elementwise (a (T, 1, k) @ (T, k, D) bmm instead took 24 us a call on
    # an H200 at T = 2048, k = 2, D = 512).
    y = torch.zeros_like(y).index_copy_(0, order, y).view(t, k, -1)
    # Masked, so an empty slot's weight gets no gradient from the last expert's output.
    w = weights.masked_fill(experts < 0, 0).to(bf16)
    out = (y * w[..., None]).sum(dim=1)
    return out.to(x.dtype)
