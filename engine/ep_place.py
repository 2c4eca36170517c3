"""The dispatch's send buffer: where every (token, slot) pair's row goes, and the row put there.

Every pair p has a sort key (chunk, then slot), and an exact position: its index in the pairs
stably sorted by key, so that the rows for one destination rank are contiguous, slot by slot.
The send buffer does not hold the rows at their exact positions. The split sizes of the main
exchange are fixed before the counts are known (engine.ep_layer), so every (chunk, destination)
has a main section of `cap` rows at a known offset: its pairs with an in-destination index
i = exact - dest_start below cap go there, at main + i; the others (the overflow, this rank's
own rows, the empty pairs) keep their exact position plus a per-chunk shift, past all main
sections. `table` holds per (chunk, destination) code cd: [cap, main, shift] (see
ExpertParallelLayer._fill_table).

On CUDA with Triton one kernel does it all: given `cursor`, the end of every key's range of exact
positions (the inclusive prefix sum of the pairs per key), each pair takes the highest free one
of its key's range by an atomic decrement, maps it as above, records it in position[p] and copies
its token's row x[p // k] there. This replaces a stable sort, an index division and a gather, a
dozen launches: the dispatch is bound by the host at small token counts, where one launch costs
about 10 us on the H100s measured. Within one key the pairs land in no fixed order; each row is
then handled on its own, so the layer's output does not depend on it. Elsewhere: a stable sort,
the same mapping in torch (buffer_position) and a scatter.
"""

from __future__ import annotations

import torch

from engine.triton_support import tl, triton

CAP, MAIN, SHIFT = range(3)  # rows of the table (further rows are the caller's)

if triton is not None:
    @triton.jit
    def _place_kernel(x, key, cursor, key_cd, dest_start, cap, main, shift, position, buf, first,
                      d_model, slots_per_chunk, slot_lo, slot_hi, k: tl.constexpr,
                      block: tl.constexpr):
        p = first + tl.program_id(0).to(tl.int64)
        pair_key = tl.load(key + p)
        slot = pair_key % slots_per_chunk
        if (slot >= slot_lo) & (slot < slot_hi):
            exact = (tl.atomic_add(cursor + pair_key, -1, sem="relaxed") - 1).to(tl.int64)
            cd = tl.load(key_cd + pair_key)
            i = exact - tl.load(dest_start + cd)
            if i < tl.load(cap + cd):
                pos = tl.load(main + cd) + i
            else:
                pos = exact + tl.load(shift + cd)
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


def buffer_position(exact: torch.Tensor, cd: torch.Tensor, dest_start: torch.Tensor,
                    table: torch.Tensor) -> torch.Tensor:
    """Send-buffer position of pairs at exact positions `exact` with (chunk, destination) codes
    `cd`: main + i where i = exact - dest_start[cd] is below cap[cd], else exact + shift[cd]."""
    i = exact - dest_start[cd]
    return torch.where(i < table[CAP, cd], table[MAIN, cd] + i, exact + table[SHIFT, cd])


def place_rows(x: torch.Tensor, key: torch.Tensor, cursor: torch.Tensor, key_cd: torch.Tensor,
               dest_start: torch.Tensor, table: torch.Tensor, position: torch.Tensor,
               buf: torch.Tensor, first: int, last: int, slots_per_chunk: int, slot_lo: int,
               slot_hi: int) -> None:
    """Place pairs [first, last) whose slot is in [slot_lo, slot_hi): see the module docstring.

    x (T, D) contiguous; key (T * k,) int32; cursor (chunks * slots_per_chunk,) int32, decremented
    in place; key_cd (chunks * slots_per_chunk,) int32 code of every key; dest_start (codes,) and
    table (3 or more, codes) int64, contiguous; position (T * k,) int64 and buf (rows, D),
    written in place.
    """
    if last <= first or slot_hi <= slot_lo:
        return
    k = key.numel() // x.shape[0]
    _place_kernel[(last - first,)](x, key, cursor, key_cd, dest_start, table[CAP], table[MAIN],
                                   table[SHIFT], position, buf, first, x.shape[1],
                                   slots_per_chunk, slot_lo, slot_hi, k, 1024)
