"""engine.cuda_graphs: a call runs as is the first time, from a captured graph after; CUDA only
(skipped elsewhere; run on a GPU machine with `python -m pytest tests/test_cuda_graphs.py`)."""

import pytest
import torch

from engine.cuda_graphs import CapturedCalls

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_calls_are_captured_on_their_second_call_and_replay_current_inputs():
    x = torch.arange(6.0, device="cuda")
    y = torch.ones(6, device="cuda")
    captures = []

    def work(capturing):
        captures.append(capturing)
        return x * 2 + y  # a new tensor: in the graph's pool once captured

    calls = CapturedCalls(limit=2)
    first = calls("a", work)
    second = calls("a", work)
    assert captures == [False, True] and calls.replays == 1
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()
    x.fill_(10.0)  # a replay reads what the captured addresses hold now
    third = calls("a", work)
    assert captures == [False, True] and calls.replays == 2
    assert third.data_ptr() == second.data_ptr() and torch.equal(third, torch.full_like(y, 21.0))
    # Two other keys, each captured on its second call, push "a" out (limit 2): it starts over.
    for key in ("b", "b", "c", "c"):
        calls(key, work)
    assert captures[2:] == [False, True, False, True]
    calls("a", work)
    assert captures[-1] is False and calls.replays == 4
    calls.clear()
    calls("b", work)
    assert captures[-1] is False
