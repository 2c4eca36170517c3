"""The training lab's model: gradients reach learned gates and never hash routers, DeepSeek's bias
moves only by its sign rule, an MoE layer with E = 1 is the dense FFN, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from engine.train_fields import MOE_ROUTERS
from engine.train_model import ModelConfig, MoELM, lm_loss

SMALL = dict(vocab=64, d_model=16, n_layers=2, n_heads=2, seq_len=8, d_expert=8, num_experts=4,
             top_k=2)


def _model(router: str, **kw: object) -> MoELM:
    cfg = ModelConfig(**{**SMALL, "router": router, **kw})
    return MoELM(cfg, torch.arange(cfg.vocab, dtype=torch.float64) + 1)


def _ids(seed: int = 0, b: int = 4) -> torch.Tensor:
    return torch.randint(0, 64, (b, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice", "deepseek"])
def test_gradients_reach_learned_gate(router: str) -> None:
    model = _model(router)
    ids = _ids()
    logits, aux = model(ids)
    (lm_loss(logits, ids) + 0.01 * aux).backward()
    for r in model.routers():
        assert r.gate.grad is not None and float(r.gate.grad.abs().sum()) > 0


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice", "deepseek"])
def test_kept_routing_holds_no_autograd_graph(router: str) -> None:
    """The routing a router keeps for its loads outlives the step: it must not keep the step's
    graph alive. Its tensors are the forward's own (same storage), only without history."""
    model = _model(router)
    ids = _ids()
    logits, aux = model(ids)
    (lm_loss(logits, ids) + 0.01 * aux).backward()
    for r in model.routers():
        kept = r.last
        assert kept.weights.grad_fn is None and not kept.weights.requires_grad
        assert kept.probs is None or kept.probs.grad_fn is None
    model.zero_grad()
    routing, _ = model.routers()[0](torch.randn(5, 16), torch.arange(5))
    assert routing.weights.grad_fn is not None  # what forward returns still trains the gate
    assert routing.weights.data_ptr() == model.routers()[0].last.weights.data_ptr()


@pytest.mark.parametrize("router", ["hash", "balanced_hash"])
def test_hash_router_has_nothing_to_learn(router: str) -> None:
    model = _model(router)
    ids = _ids()
    logits, aux = model(ids)
    lm_loss(logits, ids).backward()
    for layer in model.moe_layers():
        assert list(layer.router.parameters()) == []
        assert float(layer.experts.w_in.grad.abs().sum()) > 0  # the experts do learn
    before = [r.last.experts.clone() for r in model.routers()]
    with torch.no_grad():  # other hidden states, same ids: same experts
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model(ids)
    for r, b in zip(model.routers(), before):
        assert torch.equal(r.last.experts, b)


def test_deepseek_bias_moves_only_by_its_rule() -> None:
    model = _model("deepseek", gamma=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ids = _ids()
    logits, _ = model(ids)
    lm_loss(logits, ids).backward()
    assert all(not r.bias.requires_grad for r in model.routers())
    assert all("bias" not in name for name, _ in model.named_parameters())
    before = [r.bias.clone() for r in model.routers()]
    opt.step()  # gradients and the optimiser leave the bias alone
    for r, b in zip(model.routers(), before):
        assert torch.equal(r.bias, b)
    for r, b in zip(model.routers(), before):
        # Loads counted here from the one-hot assignments, not from the router's counts.
        load = torch.nn.functional.one_hot(r.last.experts.reshape(-1), 4).sum(0).float()
        want = b + 0.05 * torch.sign(load.mean() - load)
        r.update_bias()
        assert torch.allclose(r.bias, want)
        assert float(r.bias.abs().sum()) > 0


@pytest.mark.parametrize("router", ["topk", "hash", "deepseek", "switch"])
def test_moe_with_one_expert_is_the_dense_ffn(router: str) -> None:
    kw = dict(num_experts=1, top_k=1, alpha=0.0)
    dense, moe = _model("dense", **kw), _model(router, **kw)
    ids = _ids()
    ld, _ = dense(ids)
    lm, _ = moe(ids)
    torch.testing.assert_close(lm, ld, rtol=1e-5, atol=1e-5)
    lm_loss(ld, ids).backward()
    lm_loss(lm, ids).backward()
    for dl, ml in zip(dense.blocks, moe.blocks):
        torch.testing.assert_close(ml.ffn.experts.w_in.grad[0], dl.ffn.ffn.w_in.grad)


def test_same_init_for_every_router() -> None:
    models = {r: _model(r) for r in MOE_ROUTERS}
    ref = models["topk"]
    for m in models.values():
        torch.testing.assert_close(m.embed.weight, ref.embed.weight, rtol=0, atol=0)
        for b, rb in zip(m.blocks, ref.blocks):
            torch.testing.assert_close(b.wqkv, rb.wqkv, rtol=0, atol=0)
            torch.testing.assert_close(b.ffn.experts.w_out, rb.ffn.experts.w_out, rtol=0, atol=0)


def test_param_counts_by_hand() -> None:
    cfg = ModelConfig(**{**SMALL, "router": "topk"})
    total, active = MoELM(cfg).param_counts()
    d, f, e, v, n = 16, 8, 4, 64, 2
    per_layer = 4 * d * d + 2 * d + d * e + e * 2 * d * f  # attention, 2 norms, gate, experts
    assert total == v * d + n * per_layer + d
    assert active == total - n * (e - 2) * 2 * d * f


@pytest.mark.parametrize("kw, field", [({"num_experts": 0}, "Experts E"),
                                       ({"router": "hash", "top_k": 3}, "Experts per token k"),
                                       ({"n_layers": 1000}, "layers"),
                                       ({"d_model": 18, "n_heads": 4}, "d_model"),
                                       ({"moe_every": 3}, "MoE every")])
def test_bad_config_names_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, **kw})


def _hf_load_balancing_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """HF transformers' Mixtral load_balancing_loss_func (one layer, no attention mask), as
    written there: one-hot of the top-k choices, mean over tokens, times mean probabilities."""
    probs = torch.softmax(logits.float(), dim=-1)
    _, chosen = torch.topk(probs, k, dim=-1)
    mask = torch.nn.functional.one_hot(chosen, logits.shape[-1]).float()  # (T, k, E)
    return (mask.mean(dim=0) * probs.mean(dim=0)[None]).sum() * logits.shape[-1]


@pytest.mark.parametrize("router, k", [("topk", 2), ("topk", 3), ("switch", 1)])
def test_router_aux_loss_is_the_reference_and_differentiable(router: str, k: int) -> None:
    from engine.train_model import Router

    cfg = ModelConfig(**{**SMALL, "router": router, "top_k": k, "num_experts": 6})
    r = Router(cfg, 0)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    _, aux = r(x, torch.zeros(50, dtype=torch.int64))
    gate = r.gate.detach().clone().requires_grad_()
    # Switch (eq. 4) is the same sum over first choices only: HF's function at k = 1.
    want = _hf_load_balancing_loss(x @ gate, k)
    torch.testing.assert_close(aux, want, rtol=1e-5, atol=1e-6)
    aux.backward()
    want.backward()
    torch.testing.assert_close(r.gate.grad, gate.grad, rtol=1e-4, atol=1e-7)
    assert float(gate.grad.abs().sum()) > 0
