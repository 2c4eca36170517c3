"""engine.ep_place's kernel against the layer's torch path (a stable sort and
ep_place.buffer_position): CUDA with Triton only (skipped elsewhere; run on a GPU machine with
`python -m pytest tests/test_ep_place.py`). The torch path itself is checked against the
single-process reference on CPU (tests/test_ep_dispatch.py)."""

import pytest
import torch

from engine import ep_place
from engine.ep_layer import ExpertParallelLayer
from engine.expert_parallel import contiguous_placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or ep_place.triton is None,
                                reason="needs CUDA and Triton")


@pytest.mark.parametrize("chunks,k,d_model,dtype", [(1, 2, 4096, torch.bfloat16),
                                                     (3, 1, 1000, torch.float32),
                                                     (2, 4, 130, torch.float16)])
def test_kernel_places_rows_where_the_torch_path_does(chunks, k, d_model, dtype):
    gen = torch.Generator().manual_seed(chunks * 10 + k)
    t_count, ranks, rank = 3001, 3, 1
    layer = ExpertParallelLayer(contiguous_placement(9, ranks), torch.ones(9), rank,
                                torch.device("cuda"), chunks, slack=0.0)
    p1 = layer.num_slots + 1  # sort positions 0..5 the other ranks' slots, 6..8 own, 9 empty
    lay = layer._layout(t_count, k)
    x = torch.randn(t_count, d_model, generator=gen).to("cuda", dtype)
    slot = torch.randint(0, p1, (t_count * k,), generator=gen)
    chunk = torch.arange(t_count).repeat_interleave(k) * chunks // t_count
    key = (chunk * p1 + slot).to("cuda", torch.int32)
    lay.tally.copy_(torch.bincount(key.long(), minlength=chunks * p1))
    # Main sections 20% below this call's rows for rank 0 (they overflow) and 20% above for
    # rank 2 (room to spare).
    per_dest = torch.zeros(chunks, ranks, dtype=torch.int64)
    per_dest.index_put_((chunk, torch.tensor(layer.sort_rank)[slot]), torch.ones_like(slot),
                        accumulate=True)
    caps = [layer.off_rank(c) for c in (per_dest * torch.tensor([0.8, 1.0, 1.2])).long().tolist()]
    layer._caps[chunks] = caps, caps
    sections = layer._sections(lay, k)
    layer._fill_table(lay, sections, k)
    table = lay.table.cuda()
    placed = {}
    for name, tallied in (("torch", None), ("kernel", torch.cuda.current_stream().record_event())):
        position = torch.full((key.numel(),), -1, dtype=torch.int64, device="cuda")
        buf = torch.zeros(sections.base[-1], d_model, dtype=dtype, device="cuda")
        layer._place(x, key, lay, table, position, buf, tallied)
        torch.cuda.current_stream().wait_stream(layer.side)
        placed[name] = position, buf
    (ref_pos, ref_buf), (pos, buf) = placed["torch"], placed["kernel"]
    # Chunk 0's main sections hold rank 0's first `cap` rows (the rest overflow) and all of
    # rank 2's, with rows to spare.
    in_main = int((ref_pos < sections.spill(0)).sum())
    assert in_main == sections.send[0][0] + per_dest[0, 2] < sum(sections.send[0])
    # Within a key the kernel may order pairs differently, but it uses the same positions.
    by_key = lambda p: (key.long() * buf.shape[0] + p).sort().values  # noqa: E731
    assert torch.equal(by_key(pos), by_key(ref_pos))
    assert pos.unique().numel() == key.numel()
    filled = slot.cuda() < p1 - 1
    token = torch.arange(key.numel(), device="cuda") // k
    assert torch.equal(buf[pos[filled]], x[token[filled]])
    assert torch.equal(ref_buf[ref_pos[filled]], x[token[filled]])
    # Every key's range was used up exactly: the cursor came down to the range's start.
    assert torch.equal(lay.cursor[1:], torch.cumsum(lay.tally, 0, dtype=torch.int32) - lay.tally)
