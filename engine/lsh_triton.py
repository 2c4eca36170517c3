"""HashRouter's LSH codes in one pass over the hidden states: CUDA and Triton only.

codes[t, s] = sum_b [x[t] . planes[:, s * nbits + b] > 0] << b for the two hash slots s, as
HashRouter._lsh computes them with torch (a matmul, a comparison and a weighted sum, each its own
pass over a (T, 2 nbits) intermediate). Products are summed in float32 in another order than the
matmul's, so a projection within rounding of 0 can fall on the other side.
"""

from __future__ import annotations

import torch

from engine.triton_support import tl, triton

if triton is not None:
    @triton.jit
    def _codes_kernel(x, planes, codes, t_count, d_model, stride, nbits: tl.constexpr,
                      width: tl.constexpr, block_t: tl.constexpr, block_d: tl.constexpr):
        rows = tl.program_id(0) * block_t + tl.arange(0, block_t)
        cols = tl.arange(0, width)
        acc = tl.zeros([block_t, width], dtype=tl.float32)
        for d0 in range(0, d_model, block_d):
            dims = d0 + tl.arange(0, block_d)
            xb = tl.load(x + rows[:, None].to(tl.int64) * stride + dims[None, :],
                         mask=(rows[:, None] < t_count) & (dims[None, :] < d_model), other=0.0)
            pb = tl.load(planes + dims[:, None] * (2 * nbits) + cols[None, :],
                         mask=(dims[:, None] < d_model) & (cols[None, :] < 2 * nbits), other=0.0)
            acc += tl.dot(xb.to(tl.float32), pb.to(tl.float32), input_precision="ieee")
        bits = (acc > 0).to(tl.int32)
        shift = tl.where(cols < nbits, cols, cols - nbits)
        value = tl.where(cols < 2 * nbits, bits << shift, 0)
        first = tl.sum(tl.where(cols[None, :] < nbits, value, 0), axis=1)
        second = tl.sum(tl.where(cols[None, :] >= nbits, value, 0), axis=1)
        mask = rows < t_count
        tl.store(codes + rows * 2, first, mask=mask)
        tl.store(codes + rows * 2 + 1, second, mask=mask)


def available(x: torch.Tensor) -> bool:
    """Whether lsh_codes can run on x."""
    return triton is not None and x.is_cuda


def lsh_codes(x: torch.Tensor, planes: torch.Tensor, nbits: int) -> torch.Tensor:
    """(T, 2) int32 codes of hidden states x (T, D) against planes (D, 2 nbits), the planes
    rounded to x's dtype (as the torch path's matmul sees them)."""
    t_count, d_model = x.shape
    planes = planes.to(x.device, x.dtype).contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    codes = torch.empty(t_count, 2, dtype=torch.int32, device=x.device)
    width = max(16, triton.next_power_of_2(2 * nbits))  # tl.dot wants 16 or more columns
    block_t = 64
    _codes_kernel[(triton.cdiv(t_count, block_t),)](
        x, planes, codes, t_count, d_model, x.stride(0), nbits, width, block_t, 64)
    return codes
