"""The dispatch's send buffer in one pass per range of pairs: CUDA with Triton only.

Every (token, slot) pair p has a sort key (chunk, then slot). Given `cursor`, the end of every
key's range in the send buffer (the inclusive prefix sum of the pairs per key), each pair takes the
highest free position of its key's range by an atomic decrement, records it in position[p], and
copies its token's row x[p // k] there. This replaces a stable sort, an index division and a
gather, a dozen launches: the dispatch is bound by the host at small token counts, where one launch
costs about 10 us on the lent machines. Within one key the pairs land in no fixed order; each row
is then handled on its own, so the layer's output does not depend on it.

A launch handles the pairs in [first, last) whose slot (key mod slots_per_chunk) lies in
[slot_lo, slot_hi), so the rows for the other ranks can be placed first and sent while this
rank's own rows are placed. The last slot of a chunk is the empty pairs': they get a position
but no row.
"""

from __future__ import annotations

import torch

from engine.triton_support import tl, triton

if triton is not None:
    @triton.jit
    def _place_kernel(x, key, cursor, position, buf, first, d_model, slots_per_chunk, slot_lo,
                      slot_hi, k: tl.constexpr, block: tl.constexpr):
        p = first + tl.program_id(0).to(tl.int64)
        pair_key = tl.load(key + p)
        slot = pair_key % slots_per_chunk
        if (slot >= slot_lo) & (slot < slot_hi):
            pos = (tl.atomic_add(cursor + pair_key, -1, sem="relaxed") - 1).to(tl.int64)
            tl.store(position + p, pos)
            if slot < slots_per_chunk - 1:
                src = x + (p // k) * d_model
                dst = buf + pos * d_model
                for d0 in range(0, d_model, block):
                    cols = d0 + tl.arange(0, block)
                    mask = cols < d_model
                    tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


def available(x: torch.Tensor) -> bool:
    """Whether place_rows can run on x's device."""
    return triton is not None and x.is_cuda


def place_rows(x: torch.Tensor, key: torch.Tensor, cursor: torch.Tensor, position: torch.Tensor,
               buf: torch.Tensor, first: int, last: int, slots_per_chunk: int, slot_lo: int,
               slot_hi: int) -> None:
    """Place pairs [first, last) whose slot is in [slot_lo, slot_hi): see the module docstring.

    x (T, D) contiguous; key (T * k,) int32; cursor (chunks * slots_per_chunk,) int32, decremented
    in place; position (T * k,) int64 and buf (T * k, D), written in place.
    """
    if last <= first or slot_hi <= slot_lo:
        return
    k = key.numel() // x.shape[0]
    _place_kernel[(last - first,)](x, key, cursor, position, buf, first, x.shape[1],
                                   slots_per_chunk, slot_lo, slot_hi, k, 1024)
