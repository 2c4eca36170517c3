"""Routing figures against their published definitions: each reference is computed here,
independently (exact fractions, the paper's or reference code's formula written out in the test,
a simulation), on the same inputs as the engine."""

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import routing_metrics as rm
from engine import workloads as wl
from engine.moe_router import (DEEPSEEK_V3, BalancedHashRouter, DeepSeekV3Router,
                               ExpertChoiceRouter, GShardRouter, HashRouter, Routing,
                               SwitchRouter, TopKRouter, apply_capacity, expert_capacity,
                               expert_utilization, load_balance_std, topk_softmax_route)
from engine.routing_lab import PAGE_LABELS, LabSettings, run_lab, settings_dict

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = """x = torch.randn(4, 512, 256)
router = HashRouter(num_experts=16)
assign = router(x)
print('std:', router.load_balance_std(assign))
print('counts:', router.expert_utilization(assign))
"""


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seed_snippet_runs_as_written_and_the_docs_show_it(capsys):
    code = "import torch\nfrom engine.moe_router import HashRouter\n\n" + SNIPPET
    assert code in (ROOT / "docs" / "load_balance.md").read_text()
    ns: dict = {}
    exec(code, ns)  # noqa: S102 - the documented snippet, verbatim
    out = capsys.readouterr().out
    assign = ns["assign"]
    counts = [0] * 16
    for e in assign.experts.reshape(-1).tolist():
        if e >= 0:
            counts[e] += 1
    mean = sum(counts) / 16
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / 16)
    assert out.startswith(f"std: {std / mean}"[:10])
    assert out == f"std: {load_balance_std(assign)}\ncounts: {torch.tensor(counts)}\n"


def test_every_router_has_the_seed_methods():
    ids = torch.randint(0, 100, (300,), generator=_gen())
    x = torch.randn(300, 16, generator=_gen(1))
    freq = torch.ones(100)
    routers = [(HashRouter(8), ids), (BalancedHashRouter(8, 2, 0, freq), ids),
               (TopKRouter(8, 2, 16), x), (SwitchRouter(8, 1, 16), x), (GShardRouter(8, 2, 16), x),
               (ExpertChoiceRouter(8, 2, 16), x), (DeepSeekV3Router(8, 2, 16), x)]
    for router, inp in routers:
        assign = router(inp)
        assert router.load_balance_std(assign) == load_balance_std(assign)
        assert torch.equal(router.expert_utilization(assign), expert_utilization(assign))


@pytest.mark.parametrize("c", ["0.1", "0.2", "0.3", "0.35", "0.7", "1.1", "1.15", "1.2", "1.25",
                               "1.3", "1.35", "2.2", "2.3", "3.3", "7.1"])
def test_capacity_is_exact_for_the_decimal_typed(c):
    for k in (1, 2, 3, 8):
        for t in (7, 100, 1000, 1023, 65_536, 99_999):
            for e in (3, 7, 10, 64, 100):
                assert expert_capacity(float(c), k, t, e) == math.ceil(Fraction(c) * k * t / e)


def test_capacity_figures_inherit_the_exact_capacity():
    assert expert_capacity(1.1, 1, 100, 10) == 11  # 1.1 * 100 / 10 = 11.000000000000002 in floats
    # Drop-rate column: 12 of 100 tokens on expert 0 overflow capacity 11 by exactly one.
    experts = torch.tensor([0] * 12 + [1 + i % 9 for i in range(88)])[:, None]
    r = Routing(experts, torch.ones(100, 1), 10)
    assert rm.summarize(r, 1, 1.1, 1)["drop rate at C"] == pytest.approx(1 / 100)
    # Switch: all 100 tokens prefer expert 0; it keeps 11.
    sw = SwitchRouter(10, 1, 4, capacity_factor=1.1)
    sw.gate = torch.zeros(4, 10)
    sw.gate[:, 0] = 1.0
    assert int(expert_utilization(sw(torch.ones(100, 4)))[0]) == 11
    # The lab's capacity line (1.1 * 1000 / 10 = 110.00000000000001 in floats).
    s = LabSettings(num_tokens=1000, num_experts=10, top_k=1, capacity_factor=1.1)
    assert settings_dict(s)["capacity_slots"] == 110


def _hf_mixtral_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF transformers MixtralSparseMoeBlock.forward's routing, written out."""
    routing_weights = F.softmax(logits, dim=1, dtype=torch.float)
    routing_weights, selected = torch.topk(routing_weights, k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(logits.dtype), selected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [2, 3])
def test_low_precision_gate_logits_follow_hf_mixtral(dtype, k):
    logits = (2 * torch.randn(4096, 16, generator=_gen(k))).to(dtype)
    want_w, want_idx = _hf_mixtral_weights(logits, k)
    r = topk_softmax_route(logits, k)
    assert r.weights.dtype == dtype
    assert torch.equal(r.weights, want_w)
    # Experts agree wherever the k-th and (k+1)-th probabilities differ (else either is right).
    p = torch.softmax(logits.float(), dim=-1).topk(k + 1).values
    untied = p[:, k - 1] > p[:, k]
    assert torch.equal(r.experts[untied].sort(dim=1).values, want_idx[untied].sort(dim=1).values)
    router = TopKRouter(16, k, 8, seed=1)
    x = torch.randn(64, 8, generator=_gen(2)).to(dtype)
    assert torch.equal(router(x).weights, _hf_mixtral_weights(x @ router.gate.to(dtype), k)[0])


def _cv2(counts: torch.Tensor) -> torch.Tensor:
    return counts.var(dim=1, unbiased=False) / counts.mean(dim=1) ** 2


def test_null_cv_matches_simulation_for_independent_slots_and_distinct_picks():
    e, k, t, trials = 12, 3, 200, 2000
    gen = _gen(5)
    slots = torch.randint(0, e, (trials, k * t), generator=gen)
    indep = _cv2(torch.zeros(trials, e).scatter_add_(1, slots, torch.ones(trials, k * t)))
    picks = torch.rand(trials, t, e, generator=gen).argsort(dim=-1)[..., :k].reshape(trials, -1)
    distinct = _cv2(torch.zeros(trials, e).scatter_add_(1, picks, torch.ones(trials, k * t)))
    for sims, want in ((indep, rm.null_cv(e, k, t) ** 2),
                       (distinct, rm.null_cv(e, k, t, distinct=True) ** 2)):
        assert abs(float(sims.mean()) - want) < 4 * float(sims.std()) / math.sqrt(trials)
    assert rm.null_cv(e, k, t, distinct=True) == pytest.approx(math.sqrt((e - k) / (k * t)))
    # The two nulls are told apart by the simulation (E = 12, k = 3: 9/600 against 11/600).
    assert float(distinct.mean()) < rm.null_cv(e, k, t) ** 2 * 0.9
    assert rm.null_cv(8, 8, 100, distinct=True) == 0.0


def test_each_router_row_uses_its_own_k_and_null():
    s = LabSettings(workload="uniform", num_tokens=3000, vocab_size=500, num_experts=16,
                    top_k=3, routers=("hash", "topk", "switch", "gshard", "expert_choice"))
    m = run_lab(s).metrics.set_index("router")
    t = 3000
    assert m.loc["Hash", "k"] == 2  # hash routers run at k <= 2 ...
    assert m.loc["Hash", "null CV"] == pytest.approx(math.sqrt(15 / (2 * t)))  # ... null too
    assert m.loc["Top-k softmax", "null CV"] == pytest.approx(math.sqrt(13 / (3 * t)))
    assert m.loc["Switch top-1", "null CV"] == pytest.approx(math.sqrt(15 / t))
    assert m.loc["GShard top-2", "null CV"] == pytest.approx(math.sqrt(14 / (2 * t)))
    assert math.isnan(m.loc["Expert Choice", "null CV"])


def _hf_load_balancing_loss(logits: torch.Tensor, k: int) -> float:
    """HF transformers' Mixtral load_balancing_loss_func for one layer, no attention mask."""
    num_experts = logits.shape[1]
    routing_weights = F.softmax(logits, dim=-1)
    _, selected_experts = torch.topk(routing_weights, k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    router_prob_per_expert = torch.mean(routing_weights, dim=0)
    return float(torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts)


def _switch_loss(logits: torch.Tensor) -> float:
    """Switch Transformer eq. 4: N * sum_i f_i P_i, f_i the share of tokens dispatched (top-1,
    before capacity) to expert i, P_i the mean router probability."""
    probs = torch.softmax(logits, dim=-1)
    f = F.one_hot(probs.argmax(dim=-1), logits.shape[1]).double().mean(dim=0)
    return float(logits.shape[1] * (f * probs.double().mean(dim=0)).sum())


def _deepspeed_top2_l_aux(logits: torch.Tensor) -> float:
    """DeepSpeed sharded_moe.top2gating's l_aux: first choices only."""
    num_experts = logits.shape[1]
    gates = F.softmax(logits, dim=1)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=num_experts)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    return float(torch.mean(me * ce) * num_experts * num_experts)


def test_aux_loss_column_is_each_routers_own_definition():
    s = LabSettings(workload="uniform", num_tokens=3000, vocab_size=500, num_experts=8, top_k=3,
                    capacity_factor=0.5, routers=("topk", "switch", "gshard", "hash"))
    m = run_lab(s).metrics.set_index("router")
    ids = wl.token_ids("uniform", 3000, 500, seed=0)
    logits = wl.embed(ids, 500, 64, seed=0) @ TopKRouter(8, 1, 64, 0).gate
    assert m.loc["Top-k softmax", "aux loss"] == pytest.approx(_hf_load_balancing_loss(logits, 3),
                                                               rel=1e-5)
    assert m.loc["Switch top-1", "aux loss"] == pytest.approx(_switch_loss(logits), rel=1e-5)
    assert m.loc["GShard top-2", "aux loss"] == pytest.approx(_deepspeed_top2_l_aux(logits),
                                                              rel=1e-5)
    assert math.isnan(m.loc["Hash", "aux loss"])
    # C = 0.5 drops tokens: the losses count the choices before the drops.
    assert m.loc["Switch top-1", "tokens unrouted"] > 0.1


def test_all_tokens_dropped_leaves_the_metrics_undefined():
    probs = torch.softmax(torch.randn(50, 8, generator=_gen()), dim=-1)
    routings = [Routing(torch.full((50, 2), -1), torch.zeros(50, 2), 8, probs),
                apply_capacity(Routing(torch.randint(0, 8, (50, 2), generator=_gen(1)),
                                       torch.ones(50, 2), 8, probs), 0)]
    for r in routings:
        m = rm.summarize(r, 2, 1.0, 2, aux_loss="switch", null_model="distinct")
        for key in ("CV", "max/mean", "MaxVio", "norm. entropy", "Gini", "rank balancedness",
                    "drop rate at C" if r.demand is None else "CV"):
            assert math.isnan(m[key]), key
        assert m["slots routed"] == 0 and m["tokens unrouted"] == 1.0
        assert math.isnan(load_balance_std(r)) and math.isnan(HashRouter(8).load_balance_std(r))


def _v3_gate(scores: torch.Tensor, bias: torch.Tensor, n_groups: int, topk_groups: int, k: int,
             route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's Gate.forward (inference/model.py) after the sigmoid, with its bias."""
    original_scores = scores
    scores = scores + bias
    if n_groups > 1:
        scores = scores.view(scores.shape[0], n_groups, -1)
        group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(topk_groups, dim=-1)[1]
        mask = scores.new_ones(scores.shape[0], n_groups, dtype=bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, k, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


def _by_expert(experts: torch.Tensor, weights: torch.Tensor):
    order = experts.argsort(dim=1)
    return experts.gather(1, order), weights.gather(1, order)


def test_deepseek_v3_group_limited_routing_and_scaling_match_its_gate():
    assert DEEPSEEK_V3 == {"num_experts": 256, "top_k": 8, "n_groups": 8, "topk_groups": 4,
                           "route_scale": 2.5}
    router = DeepSeekV3Router.v3(d_model=32, seed=1)
    router.bias = 0.05 * torch.randn(256, generator=_gen(3))
    x = torch.randn(500, 32, generator=_gen(4))
    scores = torch.sigmoid(x @ router.gate)
    r = router(x)
    want_w, want_idx = _v3_gate(scores, router.bias, 8, 4, 8, 2.5)
    got_e, got_w = _by_expert(r.experts, r.weights)
    ref_e, ref_w = _by_expert(want_idx, want_w)
    assert torch.equal(got_e, ref_e)
    torch.testing.assert_close(got_w, ref_w)
    assert max(len(set((row // 32).tolist())) for row in r.experts) <= 4
    torch.testing.assert_close(r.weights.sum(dim=1), torch.full((500,), 2.5))
    # The group limit changes some tokens' experts: without it the same scores pick otherwise.
    plain = _v3_gate(scores, router.bias, 1, 1, 8, 2.5)[1]
    assert not torch.equal(ref_e, plain.sort(dim=1).values)


def test_deepseek_one_group_keeps_plain_top_k_of_biased_scores():
    x = torch.randn(300, 16, generator=_gen(6))
    old = DeepSeekV3Router(32, 4, 16, seed=2)
    new = DeepSeekV3Router(32, 4, 16, seed=2, n_groups=1, topk_groups=1, route_scale=1.0)
    old.bias = new.bias = 0.1 * torch.randn(32, generator=_gen(7))
    a, b = old(x), new(x)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)
    want_w, want_idx = _v3_gate(torch.sigmoid(x @ old.gate), old.bias, 1, 1, 4, 1.0)
    assert torch.equal(_by_expert(a.experts, a.weights)[0], _by_expert(want_idx, want_w)[0])
    with pytest.raises(ValueError, match="n_groups must divide"):
        DeepSeekV3Router(64, 2, 16, n_groups=3)
    with pytest.raises(ValueError, match="top_k must be <= groups per token"):
        DeepSeekV3Router(64, 8, 16, n_groups=16, topk_groups=1)


def _deepspeed_top2(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed sharded_moe.top2gating without noise: capacity masks, then the kept gates
    renormalised, gates1_s / (gates1_s + gates2_s) (clamped at eps)."""
    num_experts = logits.shape[1]
    gates = F.softmax(logits, dim=1)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=num_experts)
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    mask2 = F.one_hot(torch.argmax(logits_except1, dim=1), num_classes=num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)
    gates1_s = (gates * mask1).sum(dim=1)
    gates2_s = (gates * mask2).sum(dim=1)
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
    return gates1_s / denom_s, gates2_s / denom_s


def test_gshard_after_a_drop_paper_and_deepspeed_weights():
    x = torch.randn(400, 16, generator=_gen(8))
    paper = GShardRouter(8, 2, 16, seed=3, capacity_factor=0.6)
    ds = GShardRouter(8, 2, 16, seed=3, capacity_factor=0.6, renormalize_after_drop=True)
    logits = x @ paper.gate
    a, b = paper(x), ds(x)
    assert torch.equal(a.experts, b.experts)
    one = (a.experts >= 0).sum(dim=1) == 1
    assert int(one.sum()) > 20  # the capacity drops one expert of many tokens
    g1, g2 = _deepspeed_top2(logits, paper.capacity(400))
    torch.testing.assert_close(b.weights, torch.stack([g1, g2], dim=1))
    # GShard's Algorithm 1: the survivor keeps g / (g1 + g2) of the full top-2.
    top = torch.softmax(logits, dim=-1).topk(2).values
    full = top / top.sum(dim=1, keepdim=True)
    torch.testing.assert_close(a.weights, torch.where(a.experts >= 0, full, 0.0))
    assert bool((a.weights[one].sum(dim=1) < 1).all())
    notes = run_lab(LabSettings(num_tokens=2000, capacity_factor=0.6, routers=("gshard",),
                                gshard_renormalize=True)).notes
    assert "renormalised to 1" in notes[0]


def test_lab_shares_one_gate_and_matches_the_routers_called_directly():
    s = LabSettings(workload="clustered", num_tokens=2000, num_experts=16, top_k=2,
                    routers=("topk", "switch", "gshard", "expert_choice", "deepseek"),
                    deepseek_steps=0)
    counts = run_lab(s).counts
    x = wl.hidden_states("clustered", 2000, 64, 8, seed=0)
    for label, router in (("Top-k softmax", TopKRouter(16, 2, 64)),
                          ("Switch top-1", SwitchRouter(16, 1, 64, 0, 1.25)),
                          ("GShard top-2", GShardRouter(16, 2, 64, 0, 1.25)),
                          ("Expert Choice", ExpertChoiceRouter(16, 2, 64, 0, 1.25)),
                          ("DeepSeek-V3 bias", DeepSeekV3Router(16, 2, 64, 0))):
        got = counts[counts["router"] == label]["tokens"].tolist()
        assert got == expert_utilization(router(x)).tolist(), label


def test_errors_name_the_field_as_the_page_labels_it():
    with pytest.raises(ValueError, match=r"^Experts E must be >= 2 and <= 1024, got 1$"):
        run_lab(LabSettings(num_experts=1), labels=PAGE_LABELS)
    with pytest.raises(ValueError, match=r"^Expert groups must divide the 64 experts"):
        run_lab(LabSettings(n_groups=3), labels=PAGE_LABELS)
