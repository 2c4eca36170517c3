"""engine.cost_model: published preset totals, a hand-computed tiny config, validation, baselines."""

import pytest

from engine.cost_model import (PRESETS, PUBLISHED, ConfigError, TransformerConfig, dense_counterpart,
                               estimate, flops_table, preset_config)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_published_totals_within_1pct(name):
    est = estimate(PRESETS[name])
    total, active = PUBLISHED[name]
    assert est.total_params == pytest.approx(total, rel=0.01)
    if active is not None:
        assert est.active_params == pytest.approx(active, rel=0.01)


def test_mixtral_8x7b_by_hand():
    # Per layer: attention 2*4096*4096 + 2*4096*1024; one expert 3*4096*14336; router 4096*8.
    attn = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    expert = 3 * 4096 * 14336
    rest = attn + 2 * 32000 * 4096 + 32 * 4096 * 8 + 65 * 4096
    est = estimate(PRESETS["Mixtral 8x7B"])
    assert est.total_params == rest + 32 * 8 * expert
    assert est.active_params == rest + 32 * 2 * expert


TINY = TransformerConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16, vocab=10, seq_len=4,
                         ffn="swiglu", tied_embeddings=False, num_experts=4, top_k=2,
                         shared_experts=1, moe_every=2, router="learned")


def test_tiny_config_params_by_hand():
    # head_dim 4; attention per layer q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, two layers 384.
    # One SwiGLU FFN 3*8*16 = 384. Layer 1 is MoE (moe_every 2): 4 experts, 2 active, 1 shared,
    # router 8x4 = 32; layer 0 has a dense FFN. Embeddings untied 2*10*8 = 160; norms 5*8 = 40.
    p = estimate(TINY).params
    assert p == {"embeddings": (160, 160), "attention": (384, 384), "dense FFN": (384, 384),
                 "experts": (1536, 768), "shared experts": (384, 384), "router": (32, 32),
                 "norms": (40, 40)}
    assert estimate(TINY).total_params == 2920 and estimate(TINY).active_params == 2152


def test_tiny_config_flops_by_hand():
    # 2 FLOPs per weight for projections/FFNs; scores and values 2*S*d_q = 2*4*8 = 64 per layer.
    # Full context (causal=False): 2 layers x 64; causal (the default): half, 2 layers x 32.
    f = estimate(TINY, causal=False).flops
    assert f == {"attention projections": 2 * 384, "attention scores (QK^T)": 128,
                 "attention values (AV)": 128, "dense FFN": 768, "experts": 2 * 768,
                 "shared experts": 768, "router": 2 * 8 * 4, "logits": 2 * 8 * 10}
    causal = estimate(TINY).flops
    assert causal["attention scores (QK^T)"] == causal["attention values (AV)"] == 64
    table = flops_table(estimate(TINY), tokens=1000).set_index("row")
    assert table.loc["forward total", "FLOPs per token"] == 4320 - 128
    assert table.loc["training (3 x forward)", "FLOPs per token"] == 3 * (4320 - 128)
    assert table.loc["6N (N = active params)", "FLOPs per token"] == 6 * 2152
    assert table.loc["forward total", "FLOPs for D tokens"] == (4320 - 128) * 1000


@pytest.mark.parametrize("k", [1, 2])
def test_hash_router_has_no_params_and_lsh_flops(k):
    est = estimate(TINY.replace(router="hash", top_k=k))
    assert est.params["router"] == (0, 0)
    # LSH: 2 hash slots x ceil(log2 4) = 2 hyperplanes each -> an 8 x 4 projection, 2*8*4 FLOPs.
    assert est.flops["router"] == 2 * 8 * 2 * 2


@pytest.mark.parametrize("changes, field", [
    ({"n_heads": 3}, "n_heads"),                      # 3 does not divide 8
    ({"n_kv_heads": 3, "n_heads": 4}, "n_kv_heads"),  # 3 does not divide 4
    ({"top_k": 5}, "top_k"),                          # > E = 4
    ({"router": "hash", "top_k": 3}, "top_k"),        # HashRouter: k <= 2
    ({"d_model": 0}, "d_model"), ({"d_ff": -1}, "d_ff"), ({"vocab": 0}, "vocab"),
    ({"num_experts": -1}, "num_experts"), ({"moe_every": 3}, "moe_every"),  # > n_layers
    ({"ffn": "relu6"}, "ffn"), ({"num_experts": 0}, "top_k"),  # dense needs top_k 1
])
def test_bad_fields_raise_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as info:
        TINY.replace(**changes)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_dense_counterparts_match_their_targets():
    cfg = PRESETS["Mixtral 8x7B"]
    moe = estimate(cfg)
    same = estimate(dense_counterpart(cfg, "same_ff"))
    # Same d_ff: the MoE's extra parameters are exactly 7 more experts and the router per layer.
    assert moe.total_params - same.total_params == 32 * (7 * 3 * 4096 * 14336 + 4096 * 8)
    # Widened dense d_ff: equal within d_ff rounding (half a column of 3*4096 weights per layer).
    tol = 32 * 3 * 4096 * 0.5
    assert abs(estimate(dense_counterpart(cfg, "active")).total_params - moe.active_params) <= tol
    assert abs(estimate(dense_counterpart(cfg, "total")).total_params - moe.total_params) <= tol


def test_preset_config_overrides_and_rejects_unknown():
    assert preset_config("Llama-2-7B", d_ff=None, n_layers=2).n_layers == 2
    with pytest.raises(ValueError, match="preset"):
        preset_config("GPT-5")
