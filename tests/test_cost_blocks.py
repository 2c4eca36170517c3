"""engine.moe_block: FlopCounterMode and parameter cross-checks, MoE dispatch against a per-token loop."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from engine.cost_model import TransformerConfig, estimate
from engine.moe_block import BlockBenchSettings, DenseFFN, MoEFFN, TinyTransformer, ffn_forward, time_blocks


@st.composite
def small_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    experts = draw(st.sampled_from([0, 2, 4, 5]))
    router = draw(st.sampled_from(["learned", "hash"]))
    # HashRouter may give a token one expert when its two hashes collide; k=1 keeps counts exact.
    k = 1 if (experts == 0 or router == "hash") else draw(st.integers(1, experts))
    layers = draw(st.integers(1, 3))
    return TransformerConfig(
        d_model=8 * heads * draw(st.integers(1, 2)), n_layers=layers, n_heads=heads, n_kv_heads=kv,
        d_ff=draw(st.integers(4, 40)), vocab=draw(st.integers(5, 60)), seq_len=draw(st.integers(1, 12)),
        ffn=draw(st.sampled_from(["gelu", "swiglu"])), tied_embeddings=draw(st.booleans()),
        num_experts=experts, top_k=k, shared_experts=draw(st.integers(0, 1)) if experts else 0,
        moe_every=draw(st.integers(1, layers)) if experts else 1, router=router)


@settings(max_examples=15, deadline=None)
@given(cfg=small_configs(), batch=st.integers(1, 3))
def test_module_matches_cost_model_params_and_flops(cfg, batch):
    model = TinyTransformer(cfg, seed=0)
    est = estimate(cfg, causal=False)  # the explicit path multiplies the masked half too
    assert sum(p.numel() for p in model.parameters()) == est.total_params
    ids = torch.randint(0, cfg.vocab, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(ids)
    assert logits.shape == (batch, cfg.seq_len, cfg.vocab)
    assert counter.get_total_flops() == pytest.approx(est.forward_flops * batch * cfg.seq_len, rel=0.01)


def _reference_moe(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    # Second implementation: every token, every slot, its own expert, one at a time.
    routing = moe.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(routing.experts.shape[1]):
            e = int(routing.experts[t, slot])
            if e >= 0:
                out[t] += routing.weights[t, slot] * ffn_forward(x[t:t + 1], moe.w_in[e], moe.w_out[e],
                                                                 moe.ffn)[0]
    return out + (moe.shared(x) if moe.shared is not None else 0)


@pytest.mark.parametrize("router, k, ffn, shared", [("learned", 2, "swiglu", 1), ("learned", 3, "gelu", 0),
                                                    ("hash", 2, "gelu", 0), ("hash", 1, "swiglu", 2)])
def test_grouped_dispatch_equals_per_token_loop(router, k, ffn, shared):
    moe = MoEFFN(16, 24, 5, k, ffn, router, shared, seed=3)
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _reference_moe(moe, x), rtol=1e-5, atol=1e-5)


def test_learned_router_gets_gradients():
    moe = MoEFFN(16, 24, 4, 2, "swiglu", "learned")
    moe(torch.randn(20, 16)).square().sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.w_in.grad.abs().sum() > 0


def test_dense_block_is_the_textbook_mlp():
    block = DenseFFN(8, 12, "gelu", seed=2)
    x = torch.randn(5, 8)
    expected = torch.nn.functional.gelu(x @ block.w_in) @ block.w_out
    torch.testing.assert_close(block(x), expected)


def test_time_blocks_reports_analytic_flops_and_saved_activations():
    s = BlockBenchSettings(d_model=16, d_ff=32, num_experts=4, top_k=2, ffn="gelu", tokens=64,
                           routers=("learned", "hash"), warmup=0, reps=1)
    dense, learned, hashed = time_blocks(s)
    assert [r.block for r in (dense, learned, hashed)] == ["dense", "moe-learned", "moe-hash"]
    assert dense.d_ff == 64 and learned.d_ff == 32
    # Dense: 2 matrices 16 x 64, 2 FLOPs each weight. MoE: 2 experts of 2 x 16 x 32, plus the gate
    # 16 x 4 (learned) or the LSH 16 x (2 slots x 2 bits) (hash).
    assert dense.forward_gflop == pytest.approx(64 * 2 * 2 * 16 * 64 / 1e9)
    assert learned.flop_ratio == pytest.approx((2 * 2 * 2 * 16 * 32 + 2 * 16 * 4) / (2 * 2 * 16 * 64))
    assert hashed.flop_ratio == pytest.approx((2 * 2 * 2 * 16 * 32 + 2 * 16 * 4) / (2 * 2 * 16 * 64))
    # Dense saves at least x (64 x 16) and the hidden pre-activation (64 x 64), float32.
    assert dense.saved_activations_mib * 2**20 >= 4 * (64 * 16 + 64 * 64)
    # Derived figures agree with the timed ones: 64 tokens per fwd+bwd, ratios to dense's time.
    for r in (dense, learned, hashed):
        assert r.tokens_per_s == pytest.approx(64 / (r.fwd_bwd_ms / 1e3), rel=1e-6)
        assert r.time_ratio == pytest.approx(r.fwd_bwd_ms / dense.fwd_bwd_ms, rel=1e-6)


def test_bench_refuses_huge_requests_before_allocating():
    s = BlockBenchSettings(d_model=8192, d_ff=32768, tokens=1 << 22, routers=("learned",))
    with pytest.raises(ValueError, match="GiB"):
        time_blocks(s)


def test_bench_settings_from_config_scales_d_ff_and_validates():
    cfg = TransformerConfig(4096, 2, 32, 8, 14336, 100, 16, "swiglu", False, 8, 3)
    s = BlockBenchSettings.from_config(cfg, d_model=512, tokens=128)
    assert (s.d_ff, s.num_experts, s.top_k, s.routers) == (1792, 8, 3, ("learned",))
    with pytest.raises(ValueError, match="num_experts"):
        BlockBenchSettings.from_config(dataclasses.replace(cfg, num_experts=0, top_k=1))
    with pytest.raises(ValueError, match="top_k"):
        BlockBenchSettings(top_k=3, routers=("hash",))
    with pytest.raises(ValueError, match="device"):
        BlockBenchSettings(device="tpu0")


@pytest.mark.parametrize("make, match", [
    (lambda: DenseFFN(8, -1), "d_ff must be >= 1"),
    (lambda: DenseFFN(0, 16), "d_model must be >= 1"),
    (lambda: MoEFFN(0, 16, 4, 2), "d_model must be >= 1"),
    (lambda: MoEFFN(8, 0, 4, 2), "d_ff must be >= 1"),
])
def test_blocks_refuse_bad_sizes_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bench_on_a_missing_cuda_device_is_a_value_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = BlockBenchSettings(d_model=16, d_ff=16, tokens=64, routers=("learned",), device="cuda")
    with pytest.raises(ValueError, match="device cuda is not available"):
        time_blocks(s)
