"""engine.ep_place against a stable sort: CUDA with Triton only (skipped elsewhere; run on the lent
GPUs with `python -m pytest tests/test_ep_place.py`)."""

import pytest
import torch

from engine import ep_place

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or ep_place.triton is None,
                                reason="needs CUDA and Triton")


@pytest.mark.parametrize("chunks,k,d_model,dtype", [(1, 2, 4096, torch.bfloat16),
                                                     (3, 1, 1000, torch.float32),
                                                     (2, 4, 130, torch.float16)])
def test_placed_rows_match_a_stable_sort_grouping(chunks, k, d_model, dtype):
    gen = torch.Generator().manual_seed(chunks * 10 + k)
    t_count, slots, others = 3001, 9, 6  # slots 0..5 other ranks', 6..8 own; slot 9 = empty pairs
    p1 = slots + 1
    x = torch.randn(t_count, d_model, generator=gen).to("cuda", dtype)
    slot = torch.randint(0, p1, (t_count * k,), generator=gen)
    chunk = torch.arange(t_count).repeat_interleave(k) * chunks // t_count
    key = (chunk * p1 + slot).to("cuda", torch.int32)
    tally = torch.bincount(key.long(), minlength=chunks * p1).int()
    cursor = torch.cumsum(tally, 0, dtype=torch.int32)
    position = torch.full((key.numel(),), -1, dtype=torch.int64, device="cuda")
    buf = torch.zeros(key.numel(), d_model, dtype=dtype, device="cuda")
    bounds = [-(-m * t_count // chunks) for m in range(chunks + 1)]  # as the layer's
    for lo, hi in zip(bounds, bounds[1:]):  # the other ranks' rows, chunk by chunk, then the own
        ep_place.place_rows(x, key, cursor, position, buf, lo * k, hi * k, p1, 0, others)
    ep_place.place_rows(x, key, cursor, position, buf, 0, key.numel(), p1, others, p1)

    # Every pair has a distinct position, and the keys at the positions ascend as a sort's do.
    assert torch.equal(position.sort().values, torch.arange(key.numel(), device="cuda"))
    by_position = torch.empty_like(key).scatter_(0, position, key)
    assert torch.equal(by_position, key.sort(stable=True).values)
    # Every non-empty pair's row is its token's row; the empty pairs' rows are left alone.
    filled = slot.cuda() < slots
    token = torch.arange(key.numel(), device="cuda") // k
    assert torch.equal(buf[position[filled]], x[token[filled]])
    assert not buf[position[~filled]].any()
    # Every key's range was used up exactly: the cursor came down to the range's start.
    assert torch.equal(cursor, torch.cumsum(tally, 0, dtype=torch.int32) - tally.cuda())
