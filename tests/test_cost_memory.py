"""engine.cost_memory against figures computed here by hand: bytes per parameter, ZeRO, expert
sharding, Korthikanti et al.'s activation count, the KV cache, advice, bad input."""

import dataclasses

import pytest

from engine.cost_memory import (TrainLayout, activation_bytes, advice, check_layout, kv_cache_bytes,
                                layer_activation_bytes, memory_per_gpu, state_bytes)
from engine.cost_model import PRESETS, TransformerConfig
from engine.cost_report import report
from engine.cost_time import GPUS

LLAMA = PRESETS["Llama-2-7B"]
# Llama-2-7B by hand: 32 layers of 4 x 4096^2 attention and 3 x 4096 x 11008 SwiGLU, untied
# 32000 x 4096 embedding and head, 65 RMSNorm vectors of 4096.
LLAMA_PARAMS = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096 + 65 * 4096


def test_llama_2_7b_bf16_weights_are_13_48_gb():
    assert LLAMA_PARAMS == 6_738_415_616
    weights = state_bytes(LLAMA, TrainLayout(precision="bf16"))["weights"]
    assert weights == 2 * LLAMA_PARAMS
    assert round(weights / 1e9, 2) == 13.48


@pytest.mark.parametrize("precision, optimizer, per_param", [
    ("mixed", "adam", 2 + 2 + 4 + 4 + 4),  # bf16 weights, grads; fp32 master, m, v (ZeRO paper: 16)
    ("mixed", "sgd", 2 + 2 + 4 + 4),       # fp32 master and momentum
    ("fp32", "adam", 4 + 4 + 4 + 4),
    ("fp32", "sgd", 4 + 4 + 4),
    ("bf16", "adam", 2 + 2 + 2 + 2),
    ("bf16", "sgd", 2 + 2 + 2),
])
def test_bytes_per_parameter(precision, optimizer, per_param):
    states = state_bytes(LLAMA, TrainLayout(precision=precision, optimizer=optimizer))
    assert sum(states.values()) == per_param * LLAMA_PARAMS


@pytest.mark.parametrize("zero, sharded", [(0, ()), (1, ("optimizer states",)),
                                           (2, ("optimizer states", "gradients")),
                                           (3, ("optimizer states", "gradients", "weights"))])
def test_zero_stages_shard_over_data_parallel_gpus(zero, sharded):
    per_gpu = state_bytes(LLAMA, TrainLayout(zero=zero, gpus=8))
    full = {"weights": 2 * LLAMA_PARAMS, "gradients": 2 * LLAMA_PARAMS,
            "optimizer states": 12 * LLAMA_PARAMS}
    for part, value in full.items():
        assert per_gpu[part] == pytest.approx(value / 8 if part in sharded else value)


def test_experts_shard_over_ep_ranks_and_zero_over_the_rest():
    mixtral = PRESETS["Mixtral 8x7B"]
    experts = 32 * 8 * 3 * 4096 * 14336                      # all routed expert weights
    other = 32 * (2 * 4096**2 + 2 * 4096 * 1024) + 2 * 32000 * 4096 + 32 * 4096 * 8 + 65 * 4096
    # 16 GPUs, 8 expert-parallel ranks: each holds one expert per layer; ZeRO-3 shards the rest
    # over 16 and each expert shard over its 2 data-parallel copies.
    w = state_bytes(mixtral, TrainLayout(gpus=16, ep=8, zero=3))["weights"]
    assert w == pytest.approx(2 * (other / 16 + experts / 8 / 2))
    w0 = state_bytes(mixtral, TrainLayout(gpus=16, ep=8, zero=0))["weights"]
    assert w0 == pytest.approx(2 * (other + experts / 8))


def test_dense_layer_matches_korthikanti_without_dropout():
    # Korthikanti et al. 2022, Sec. 4.1: sbh(34 + 5as/h) with dropout and GeLU (d_ff = 4h).
    # Dropping the dropout terms (two sbh masks, the as^2b mask and the 2as^2b dropout output)
    # leaves 32sbh + 2as^2b; this model adds the causal mask's s^2 bytes.
    s, b, h, a = 512, 3, 256, 8
    cfg = TransformerConfig(h, 1, a, a, 4 * h, 100, s, "gelu")
    got = sum(layer_activation_bytes(cfg, TrainLayout(micro_batch=b, attention="math"), False).values())
    assert got == 32 * s * b * h + 2 * a * s * s * b + s * s
    # Flash-style: no s^2 terms; the output (2sbh) and the log-sum-exp (4 bytes x a x s x b) stay.
    flash = sum(layer_activation_bytes(cfg, TrainLayout(micro_batch=b), False).values())
    assert flash == 32 * s * b * h + 2 * s * b * h + 4 * a * s * b


def test_moe_layer_terms_by_hand():
    # SwiGLU experts, E 4, k 2, capacity 1.5: slots = 1.5 x T x k.
    s, b, h, f, e_, k = 64, 2, 32, 48, 4, 2
    cfg = TransformerConfig(h, 1, 4, 4, f, 100, s, "swiglu", num_experts=e_, top_k=k)
    parts = layer_activation_bytes(cfg, TrainLayout(micro_batch=b, capacity_factor=1.5), True)
    t = s * b
    slots = 1.5 * t * k
    assert parts["MoE routing"] == 4 * t * e_ + slots * (8 + 8 + 2)   # probs, 2 index vectors, weights
    assert parts["experts"] == 2 * (slots * h * 2) + 4 * slots * f * 2  # slab, outputs; SwiGLU 4 x F


def test_checkpointing_keeps_layer_inputs_and_the_larger_peak():
    cfg = LLAMA
    acts = activation_bytes(cfg, TrainLayout(checkpointing=True))
    t = cfg.seq_len
    assert acts["layer inputs (checkpointed)"] == 32 * t * 4096 * 2
    # The loss's backward (fp32 log-probs and two gradients, 12 x T x V, plus the final norm's
    # input and output) outweighs one recomputed Llama layer at 4k tokens.
    assert acts["output layer and loss (fp32)"] == 12 * t * 32000 + 2 * t * 4096 * 2
    assert sum(acts.values()) < sum(activation_bytes(cfg, TrainLayout()).values()) / 5


def test_kv_cache_of_llama_2_7b_at_4096_tokens_is_2_gib():
    # 32 layers x (K and V) x 32 heads x 128 x 2 bytes = 0.5 MiB per token.
    assert kv_cache_bytes(LLAMA, 4096) == 2 * 2**30
    # Mixtral 8x7B (8 KV heads): 128 KiB per token, 4 GiB at its 32k context; batch 3 triples it.
    assert kv_cache_bytes(PRESETS["Mixtral 8x7B"], 32768, batch=3) == 3 * 4 * 2**30


def test_memory_rows_and_advice():
    mem = memory_per_gpu(LLAMA, TrainLayout(gpus=8))
    assert list(mem) == ["weights", "gradients", "optimizer states", "activations"]
    total = sum(mem.values())
    tips = advice(LLAMA, TrainLayout(gpus=8), 80e9)
    assert total > 80e9 and any("checkpointing" in t for t in tips) and any("fits" in t for t in tips)
    assert advice(LLAMA, TrainLayout(gpus=8), total + 1) == []


def test_advice_says_which_changes_fit_together_when_none_fits_alone():
    # Llama-2-7B, mixed-precision Adam on 8 GPUs, 40 GB each: checkpointing alone leaves 16 bytes
    # per parameter (110 GB), ZeRO-1 alone the full activations (60 GB). Together by hand: 2 + 2
    # bytes of weights and gradients, 12 / 8 of optimizer states, checkpointed activations.
    acts = sum(activation_bytes(LLAMA, TrainLayout(gpus=8, checkpointing=True)).values())
    together = (2 + 2 + 12 / 8) * LLAMA_PARAMS + acts
    tips = advice(LLAMA, TrainLayout(gpus=8), 40e9)
    assert not any(t.endswith("(fits)") for t in tips[:-1])
    assert tips[-1] == (f"together, full activation checkpointing, ZeRO stage 1: "
                        f"{together / 1e9:.1f} GB per GPU (fits)")
    assert together <= 40e9
    # Nothing fits 1 GB (the checkpointed activations alone exceed it): the closest is named, and
    # the GPUs stop doubling once only activations are left.
    last = advice(LLAMA, TrainLayout(gpus=8), 1e9)[-1]
    assert last.startswith("together, full activation checkpointing, ZeRO stage 3, ")
    assert not last.endswith("(fits)") and float(last.split(": ")[1].split(" GB")[0]) > acts / 1e9


def test_report_shows_the_memory_model_computed_once():
    """The report's memory rows, activation parts, total and advice are those of memory_per_gpu,
    activation_bytes and advice called one by one; the advice weighs the training memory (the
    inference KV cache row is not among what it can change)."""
    layout, gpu = TrainLayout(gpus=8), GPUS["H100 80 GB"]
    out = report(LLAMA, layout, 1e12, gpu, 0.4, 2.5, kv_tokens=4096)
    mem, acts = memory_per_gpu(LLAMA, layout), activation_bytes(LLAMA, layout)
    kv = kv_cache_bytes(LLAMA, 4096, 1, 2)
    assert dict(zip(out["memory"]["component"], out["memory"]["bytes"])) == {**mem, "KV cache": kv}
    assert dict(zip(out["activations"]["part"], out["activations"]["bytes"])) == acts
    assert out["memory_per_gpu"]["total_bytes"] == sum(mem.values()) + kv
    tips = advice(LLAMA, layout, gpu.memory)
    assert tips and out["memory_per_gpu"]["advice"] == tips


def test_report_says_when_only_the_kv_cache_goes_over():
    """Training memory under the GPU's, training + KV cache over it: the advice names the KV cache
    (no training change can help), with both figures."""
    layout = TrainLayout(gpus=8, zero=3, checkpointing=True)
    training = sum(memory_per_gpu(LLAMA, layout).values())
    kv = kv_cache_bytes(LLAMA, 4096, 1, 2)
    gpu = dataclasses.replace(GPUS["H100 80 GB"], memory=training + kv / 2)
    fit = report(LLAMA, layout, 1e12, gpu, 0.4, 2.5, kv_tokens=4096)["memory_per_gpu"]
    assert not fit["fits"] and fit["total_bytes"] == training + kv
    assert fit["advice"] == [f"the training state fits ({training / 1e9:.1f} GB per GPU); the KV cache "
                             f"row ({kv / 1e9:.1f} GB) is what goes over: fewer KV-cache tokens"]


@pytest.mark.parametrize("changes, name", [
    ({"gpus": 6, "ep": 4}, "gpus must be a multiple of ep"), ({"zero": 4}, "zero"),
    ({"micro_batch": 0}, "micro_batch"), ({"gpus": 0}, "gpus"), ({"capacity_factor": 0.01}, "capacity_factor"),
    ({"precision": "fp8"}, "precision"), ({"capacity_factor": float("nan")}, "capacity_factor"),
])
def test_bad_layouts_name_the_field(changes, name):
    with pytest.raises(ValueError, match=name):
        TrainLayout(**changes)


def test_layout_the_config_cannot_divide():
    with pytest.raises(ValueError, match="ep must divide the number of experts"):
        check_layout(PRESETS["Mixtral 8x7B"], TrainLayout(gpus=6, ep=3))
    with pytest.raises(ValueError, match="ep must be 1 for a dense model"):
        memory_per_gpu(LLAMA, TrainLayout(gpus=2, ep=2))
