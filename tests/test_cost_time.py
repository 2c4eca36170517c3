"""engine.cost_time: time to train by hand, step FLOPs under checkpointing and the math path,
step-time prediction, bad input."""

import math

import pytest

from engine.cost_memory import TrainLayout
from engine.cost_model import TransformerConfig, dense_counterpart
from engine.cost_time import GPUS, mfu_of_step, predict_step_ms, step_flops, time_to_train

TINY = TransformerConfig(8, 2, 2, 2, 16, 10, 4, "swiglu")


def test_time_to_train_by_hand():
    t = time_to_train(1e23, 1000, 1e15, 0.5, price_per_gpu_hour=2.0)
    assert t.seconds == pytest.approx(1e23 / (1000 * 1e15 * 0.5))   # 2e5 s
    assert t.gpu_hours == pytest.approx(2e5 / 3600 * 1000)
    assert t.cost == pytest.approx(2.0 * 2e5 / 3600 * 1000)
    assert t.days == pytest.approx(2e5 / 86400)


def test_gpu_presets_memory():
    assert {k: v.memory for k, v in GPUS.items()} == {"H100 80 GB": 80e9, "H200 141 GB": 141e9,
                                                      "B200 192 GB": 192e9, "A100 80 GB": 80e9}


def test_step_flops_by_hand():
    # TINY per token: projections 2 layers x 2 x (4 x 8 x 8) = 1024, SwiGLU 2 x 2 x 3 x 8 x 16 = 1536,
    # logits 2 x 8 x 10 = 160; scores + values 2 layers x 2 x (2 x 4 x 8) = 256 full, 128 causal.
    tokens = 3 * 4
    causal, full = 1024 + 1536 + 160 + 128, 1024 + 1536 + 160 + 256
    flash = step_flops(TINY, TrainLayout(micro_batch=3))
    assert flash.model == flash.hardware == 3 * causal * tokens
    ckpt_math = step_flops(TINY, TrainLayout(micro_batch=3, checkpointing=True, attention="math"))
    assert ckpt_math.model == 3 * causal * tokens       # MFU counts the model, not the recompute
    assert ckpt_math.hardware == 4 * full * tokens     # the math path multiplies the masked half
    assert mfu_of_step(TINY, TrainLayout(micro_batch=3), 1.0, 1e6) == pytest.approx(
        3 * causal * tokens / (1e-3 * 1e6))


def test_step_time_prediction_dense_and_moe():
    ref = TrainLayout(micro_batch=2)
    big = TINY.replace(seq_len=8)
    assert predict_step_ms(big, ref, TINY, ref, 10.0) == pytest.approx(
        10.0 * step_flops(big, ref).hardware / step_flops(TINY, ref).hardware)
    moe = TINY.replace(num_experts=4, top_k=2)
    ckpt = TrainLayout(micro_batch=2, checkpointing=True)
    counterpart = 10.0 * step_flops(dense_counterpart(moe, "same_ff"), ckpt).hardware \
        / step_flops(TINY, ref).hardware
    # 2 MoE layers, each 0.5 ms more forward and 1.5 ms more forward+backward; checkpointing
    # runs the forward once more.
    assert predict_step_ms(moe, ckpt, TINY, ref, 10.0, (0.5, 1.5)) == pytest.approx(counterpart + 2 * 2.0)
    with pytest.raises(ValueError, match="moe_extra_ms"):
        predict_step_ms(moe, ckpt, TINY, ref, 10.0)


@pytest.mark.parametrize("kwargs, name", [
    ({"mfu": 0.0}, "MFU"), ({"mfu": 1.01}, "MFU"), ({"mfu": math.nan}, "MFU"),
    ({"price_per_gpu_hour": "abc"}, "price per GPU-hour must be a number"),
    ({"price_per_gpu_hour": -1}, "price per GPU-hour"), ({"gpus": 0}, "GPUs"),
    ({"train_flops": math.inf}, "training FLOPs"), ({"peak_flops": 0}, "peak FLOP/s"),
])
def test_bad_input_names_the_field(kwargs, name):
    args = {"train_flops": 1e20, "gpus": 8, "peak_flops": 1e15, "mfu": 0.4, "price_per_gpu_hour": 2.0}
    with pytest.raises(ValueError, match=name):
        time_to_train(**{**args, **kwargs})
