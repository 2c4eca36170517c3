"""The combine's weighted sum: out[t] = sum_j w[t, j] * rows[position[t, j]], per token.

Rounded like engine.ep_measure.reference_layer: the weights first rounded to the rows' dtype,
products and sum in float32, one rounding at the end. On CUDA with Triton one fused kernel reads
each token's k rows once and writes its output once (torch's embedding_bag, the fallback, took
4.1 ms for 64k tokens x 2 rows x d_model 4096 in bf16 on an H200, several times the bytes' time);
elsewhere embedding_bag in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.triton_support import tl, triton

if triton is not None:
    @triton.jit
    def _weighted_sum_kernel(rows, position, weights, out, d_model, k: tl.constexpr,
                             block: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * block + tl.arange(0, block)
        mask = cols < d_model
        acc = tl.zeros([block], dtype=tl.float32)
        for j in tl.static_range(k):
            p = tl.load(position + t * k + j).to(tl.int64)
            w = tl.load(weights + t * k + j)
            acc += tl.load(rows + p * d_model + cols, mask=mask, other=0.0).to(tl.float32) * w
        tl.store(out + t * d_model + cols, acc.to(out.dtype.element_ty), mask=mask)


def weighted_rows_sum(rows: torch.Tensor, position: torch.Tensor, weights: torch.Tensor
                      ) -> torch.Tensor:
    """rows (N, D), position (T, k) row indices, weights (T, k) -> (T, D) in rows' dtype."""
    w = weights.to(rows.dtype)
    if triton is None or not rows.is_cuda:
        # In float32, rounded once (embedding_bag in bf16 rounds otherwise, by up to 8e-3).
        return F.embedding_bag(position, rows.float(), mode="sum",
                               per_sample_weights=w.float()).to(rows.dtype)
    t_count, k = position.shape
    out = rows.new_empty(t_count, rows.shape[1])
    block = 1024
    _weighted_sum_kernel[(t_count, triton.cdiv(rows.shape[1], block))](
        rows, position.contiguous(), w.float().contiguous(), out, rows.shape[1], k, block)
    return out
