"""Training with the experts over ranks (engine.ep_training, 2 gloo processes under torchrun):
the same losses and gradients as the single-process model, and bad jobs end in a clear error.

Every launch is bounded by torchrun()'s wall time, which kills the whole process tree.
"""

import copy
import json
import os
import re

import pytest
import torch
import torch.distributed as dist

import engine.ep_training as ep_training
from engine.cli import main
from engine.ep_autograd import ExpertParallelExperts, PhaseClock, expert_ffn
from engine.ep_launch import LaunchError, init_group, torchrun
from engine.ep_training import launch_check
from engine.train_model import Experts


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process: the autograd path without torchrun."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_experts_match_the_grouped_experts_forward_and_backward(one_rank_group):
    # Every row stays on its rank here (no exchange; the 2-rank job below has them): the
    # buffers' bookkeeping, the combine's weights and both backward passes against the training
    # lab's own Experts, over two calls of one layer.
    gen = torch.Generator().manual_seed(0)
    ref = Experts(8, 12, 5, "swiglu", gen)
    ep = ExpertParallelExperts(copy.deepcopy(ref), 0, 1, torch.device("cpu"))
    ep.clock = PhaseClock(torch.device("cpu"))
    for call in range(2):
        x = torch.randn(30, 8, generator=gen)
        experts = torch.randint(5, (30, 2), generator=gen)
        experts[::7, 1] = -1  # empty slots, as hash collisions leave
        weights = torch.rand(30, 2, generator=gen).masked_fill(experts < 0, 0.0)
        grad = torch.randn(30, 8, generator=gen)
        got, want = [], []
        for module, out in ((ep, got), (ref, want)):
            xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
            module.zero_grad()
            y = module(xx, experts, ww)
            y.backward(grad)
            out += [y, xx.grad, ww.grad, module.w_in.grad, module.w_out.grad]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    phases = ep.clock.totals()
    assert set(phases) == {p + s for p in ("dispatch", "experts", "combine")
                           for s in ("", "_backward")}
    assert all(v >= 0 for v in phases.values())


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_expert_ffn_row_by_row(ffn):
    """This rank hosts experts 3..5 of the layer: each row through its own expert, written out
    row by row here; rows for other ranks' experts (padding) give 0 and no weight gradient."""
    gen = torch.Generator().manual_seed(1)
    d, f = 8, 6
    w_in = torch.randn(3, d, 2 * f if ffn == "swiglu" else f, generator=gen, requires_grad=True)
    w_out = torch.randn(3, f, d, generator=gen, requires_grad=True)
    rows = torch.randn(11, d, generator=gen)
    ids = torch.tensor([3, 5, 0, 4, 3, 7, 5, 5, 2, 3, 4])
    grad = torch.randn(11, d, generator=gen)

    def by_hand(r, e):
        h = r @ w_in[e]
        if ffn == "swiglu":
            gate, up = h.chunk(2)
            h = torch.nn.functional.silu(gate) * up
        else:
            h = torch.nn.functional.gelu(h)
        return h @ w_out[e]

    got = expert_ffn(rows, ids, w_in, w_out, 3, ffn)
    got.backward(grad)
    grads = (w_in.grad.clone(), w_out.grad.clone())
    w_in.grad = w_out.grad = None
    want = torch.stack([by_hand(r, int(i) - 3) if 3 <= i <= 5 else torch.zeros(d) for r, i in zip(rows, ids)])
    want.backward(grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, (w_in.grad, w_out.grad), rtol=1e-5, atol=1e-6)
    assert not got[[2, 5, 8]].any()
    assert expert_ffn(rows[:0], ids[:0], w_in, w_out, 3, ffn).shape == (0, d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_ffn_on_a_gpu_agrees_with_float64():
    """bf16 on a GPU (torch._grouped_mm on sm90, no host sync) against the same rows in float64 on
    the CPU: outputs and weight gradients within bf16 rounding."""
    from engine.moe_dispatch import grouped_mm_runs

    gen = torch.Generator().manual_seed(2)
    w_in = torch.randn(8, 512, 1024, generator=gen) / 512 ** 0.5
    w_out = torch.randn(8, 1024, 512, generator=gen) / 1024 ** 0.5
    rows = torch.randn(4096, 512, generator=gen)
    ids = torch.randint(8, 18, (4096,), generator=gen)  # this rank: 8..15; 16, 17 are another's
    grad = torch.randn(4096, 512, generator=gen)
    out = {}
    for name, dev, dtype in (("gpu", "cuda", torch.bfloat16), ("ref", "cpu", torch.float64)):
        x, (wi, wo) = rows.to(dev, dtype), (w.to(dev, dtype).requires_grad_() for w in (w_in, w_out))
        y = expert_ffn(x, ids.to(dev), wi, wo, 8, "gelu")
        y.backward(grad.to(dev, dtype))
        out[name] = [t.double().cpu() for t in (y, wi.grad, wo.grad)]
        if name == "gpu" and torch.cuda.get_device_capability()[0] == 9:
            assert grouped_mm_runs(x, wi, wo)
    for a, b in zip(out["gpu"], out["ref"]):
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_more_ranks_than_experts_is_refused_before_building():
    ref = Experts(8, 12, 2, "gelu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"Ranks R must be between 1 and the experts E \(2\)"):
        ExpertParallelExperts(ref, 0, 3, torch.device("cpu"))


def test_cli_train_check_prints_every_step(monkeypatch, capsys):
    rows = [{"router": "topk", "rank": r, "step": s, "loss": 5.0, "ref_loss": 5.0,
             "grad_max_abs_err": 1e-8, "grad_max_abs": 0.1} for r in range(2) for s in range(3)]
    doc = {"backend": "gloo", "world": 2, "device": "CPU", "date": "d", "torch": "t",
           "per_rank": [{"rows": rows[:3]}, {"rows": rows[3:]}], "max_loss_abs_err": 0.0,
           "max_grad_abs_err": 1e-8, "max_grad_abs": 0.1}
    monkeypatch.setattr(ep_training, "launch_check", lambda *a, **k: doc)
    assert main(["dispatch", "--train-check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["expert-parallel training against one process, per step"]) == 6
    assert out["max_grad_abs_err"] == 1e-8


@pytest.mark.slow
def test_two_ranks_train_like_one_process():
    # Each rank also trains the single-process model on the global batch and compares every
    # gradient (its block of the expert weights) and the loss, step by step, after SGD steps.
    # topk: gradients reach the gate through the combine's weights; hash: empty slots (-1).
    doc = launch_check(2, steps=3, timeout_s=240, extra=["--router", "topk,hash"])
    assert doc["world"] == 2 and len(doc["per_rank"]) == 2
    for rank_rows in doc["per_rank"]:
        assert [(r["router"], r["step"]) for r in rank_rows["rows"]] == \
            [(router, step) for router in ("topk", "hash") for step in range(3)]
        for r in rank_rows["rows"]:
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"])
            # Gradients of order 0.1: float32 sums in another order differ by ~1e-8.
            assert r["grad_max_abs"] > 1e-3
            assert r["grad_max_abs_err"] <= 1e-5 * r["grad_max_abs"]


@pytest.mark.slow
def test_more_ranks_than_experts_is_refused_by_every_rank():
    with pytest.raises(LaunchError) as err:
        launch_check(2, steps=1, timeout_s=90, extra=["--experts", "1", "--top-k", "1"])
    assert "Ranks R (2) must be <= the experts E (1)" in str(err.value)


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_with_an_error_not_a_hang():
    with pytest.raises(LaunchError) as err:
        launch_check(2, steps=1, timeout_s=120, extra=["--fail-rank", "1", "--timeout", "10"])
    # The job ends on its own within the wall time (no "did not finish"), naming rank 1: rank 0's
    # monitored barrier fails as rank 1's connection closes, and torchrun then stops rank 0. Which
    # is seen first is a race (an H200 host's torchrun stopped rank 0 before it printed), so either
    # rank 0's message or torchrun's root cause (rank 1, exit code 3) names it.
    msg = str(err.value)
    assert "did not finish" not in msg
    assert ("Rank 1 failed to pass monitoredBarrier" in msg
            or re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 3 ", msg)), msg


def test_more_local_ranks_than_gpus_is_refused_before_joining(monkeypatch):
    # This machine has no GPU: NCCL's first local rank already has none.
    monkeypatch.setitem(os.environ, "RANK", "0")
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    monkeypatch.setitem(os.environ, "LOCAL_RANK", "0")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(ValueError, match="--nproc-per-node must be <= the 0 GPUs"):
        init_group("nccl", 5.0)


def test_more_processes_than_the_launcher_allows_is_refused():
    with pytest.raises(ValueError, match="processes must be >= 1 and <= 8"):
        torchrun("engine.ep_training", [], 9, 10.0, "check")
