"""The training step: the learning-rate schedule by hand, losses read back as their means; on a
CUDA GPU no step waits for the GPU (every router) and a CUDA-graph run trains as the eager one."""

from __future__ import annotations

import dataclasses
import gc
import math
import warnings

import pytest
import torch

from engine.train_data import tokenize
from engine.train_loop import TrainSettings, train_run
from engine.train_model import ModelConfig, MoELM, lm_loss
from engine.train_step import TrainStep, lr_factor

CUDA = torch.cuda.is_available()
TEXT = "the cat sat on the mat. the dog sat on the log. " * 60


def test_lr_schedule_by_hand() -> None:
    # Warm-up 4: 1/4, 2/4, 3/4, 4/4; then cosine from 1 down to 0.1 at step 10 (steps 0-9 run).
    assert [lr_factor(i, 4, 10) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(7, 4, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_factor(10, 4, 10) == pytest.approx(0.1)


def test_step_uses_the_schedule_and_reports_mean_losses() -> None:
    cfg = ModelConfig(vocab=64, d_model=16, n_layers=1, n_heads=2, seq_len=8, d_expert=8,
                      num_experts=4, router="topk")
    model, twin = MoELM(cfg), MoELM(cfg)
    trainer = TrainStep(model, 0.01, 2, 5, bf16=False)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(3)]
    losses = []
    for i, ids in enumerate(batches, start=1):
        with torch.no_grad():  # the twin has the same weights: the loss this step will see
            twin.load_state_dict(model.state_dict())
            losses.append(float(lm_loss(twin(ids)[0], ids)))
        trainer.step(i, ids)
        assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(i - 1, 2, 5))
    ce, aux = trainer.take_means()
    assert ce == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert aux > 0
    assert trainer.take_means()[0] == 0.0  # sums start again


ROUTERS = ["hash", "balanced_hash", "topk", "switch", "deepseek", "dense"]


@pytest.mark.parametrize("router", ROUTERS + ["expert_choice"])
def test_a_step_leaves_no_autograd_graph_alive(router: str) -> None:
    """Between steps no tensor may keep the last step's graph (and its AccumulateGrad nodes) alive:
    under CUDA graphs such a node, made on the warm-up stream, warns of a stream mismatch at the
    capture and may sync."""
    cfg = ModelConfig(vocab=64, d_model=16, n_layers=2, n_heads=2, seq_len=8, d_expert=8,
                      num_experts=4, router=router)
    trainer = TrainStep(MoELM(cfg, torch.arange(64, dtype=torch.float64) + 1), 0.01, 2, 5, bf16=False)
    for i in (1, 2):
        trainer.step(i, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)))
    gc.collect()
    held = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    assert not held, [(tuple(t.shape), type(t.grad_fn).__name__) for t in held]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("router", ROUTERS)
def test_cuda_step_never_waits_for_the_gpu(router: str) -> None:
    cfg = ModelConfig(vocab=256, d_model=64, n_layers=2, n_heads=2, seq_len=32, d_expert=64,
                      num_experts=8, router=router)
    model = MoELM(cfg, torch.arange(256, dtype=torch.float64) + 1).cuda()
    trainer = TrainStep(model, 1e-3, 2, 10, bf16=True)
    ids = torch.randint(0, 256, (4, 32), device="cuda")
    trainer.step(1, ids)  # first step: lazy initialisation (cuBLAS, optimiser state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            trainer.step(i, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(trainer.take_means()[0])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("router", ROUTERS)
def test_cuda_graph_run_trains_as_the_eager_run(router: str) -> None:
    corpus = tokenize(TEXT, "byte")
    s = TrainSettings(routers=(router,), tokenizer="byte", d_model=64, layers=2, heads=2,
                      experts=8, k=2, d_expert=64, steps=24, batch=8, seq_len=32, lr=3e-3,
                      warmup=4, eval_every=8, eval_batches=2, device="cuda", dtype="bf16")
    eager = train_run(s, corpus, router, 0, final_stats=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        graphed = train_run(dataclasses.replace(s, cuda_graphs=True), corpus, router, 0,
                            final_stats=False)
    assert not [w for w in seen if "AccumulateGrad" in str(w.message)]  # nothing kept a graph alive
    assert eager.step == graphed.step == [0, 8, 16, 24]
    assert eager.val_loss[-1] < eager.val_loss[0] - 0.5  # it learned something
    # bf16 and atomics: the two runs agree to rounding, not bit for bit.
    assert graphed.val_loss == pytest.approx(eager.val_loss, rel=2e-2)
    assert graphed.train_loss[1:] == pytest.approx(eager.train_loss[1:], rel=2e-2)
