"""Training with the experts over ranks (engine.ep_training, 2 gloo processes under torchrun):
the same losses and gradients as the single-process model, and bad jobs end in a clear error.

Every launch is bounded by torchrun()'s wall time, which kills the whole process tree.
"""

import os

import pytest

from engine.ep_launch import LaunchError, init_group, torchrun
from engine.ep_training import launch_check

pytestmark = pytest.mark.slow


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


def test_more_ranks_than_experts_is_refused_by_every_rank():
    with pytest.raises(LaunchError) as err:
        launch_check(2, steps=1, timeout_s=90, extra=["--experts", "1", "--top-k", "1"])
    assert "Ranks R (2) must be <= the experts E (1)" in str(err.value)


def test_a_dead_rank_ends_the_job_with_an_error_not_a_hang():
    with pytest.raises(LaunchError) as err:
        launch_check(2, steps=1, timeout_s=120, extra=["--fail-rank", "1", "--timeout", "10"])
    # Rank 0 names the missing rank after the process group's timeout (10 s), and the job ends
    # on its own within the wall time (no "did not finish").
    assert "Rank 1 failed to pass monitoredBarrier" in str(err.value)


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
