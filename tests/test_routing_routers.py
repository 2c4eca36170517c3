"""Routers against small reference implementations (plain Python loops or the papers' recipes)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import routing_metrics as rm
from engine.moe_router import (BalancedHashRouter, DeepSeekV3Router, ExpertChoiceRouter,
                               GShardRouter, HashRouter, Routing, SwitchRouter, TopKRouter,
                               apply_capacity, expert_utilization, load_balance_std,
                               top_k, topk_softmax_route)

M64 = (1 << 64) - 1


def _ref_hash(router: HashRouter, token: int) -> list[int]:
    """The id hash in Python integers: x = id * mult + add mod 2^64; each 32-bit half's top 16
    bits (as signed, + 2^15) are scaled to [0, E)."""
    x = (token * (router._mult & M64) + (router._add & M64)) & M64
    out = []
    for half in (x & 0xFFFFFFFF, x >> 32):
        top = half >> 16
        signed_top = top - 65536 if top >= 32768 else top
        out.append(((signed_top + 32768) * router.num_experts) >> 16)
    return out


def _ref_counts(experts: torch.Tensor, e: int) -> list[int]:
    counts = [0] * e
    for v in experts.reshape(-1).tolist():
        if v >= 0:
            counts[v] += 1
    return counts


@pytest.mark.parametrize("e", [1, 7, 16, 64, 1000])
def test_id_hash_matches_python_reference_with_collisions(e):
    router = HashRouter(num_experts=e, top_k=2, seed=3)
    ids = torch.cat([torch.arange(300), torch.tensor([2**31 - 1, 123456789, 5, 5])])
    r = router(ids)
    for t, token in enumerate(ids.tolist()):
        e0, e1 = _ref_hash(router, token)
        want = [e0, -1 if e1 == e0 else e1]
        assert r.experts[t].tolist() == want
        assert r.weights[t].tolist() == ([1.0, 0.0] if e1 == e0 else [0.5, 0.5])
    assert r.counts.tolist() == _ref_counts(r.experts, e)
    assert r.experts.dtype == torch.int64 and r.weights.dtype == torch.float32


def test_top1_hash_is_slot_zero_of_top2():
    ids = torch.randint(0, 5000, (777,), generator=torch.Generator().manual_seed(1))
    r1, r2 = HashRouter(32, 1, 9)(ids), HashRouter(32, 2, 9)(ids)
    assert torch.equal(r1.experts[:, 0], r2.experts[:, 0])
    assert r1.counts.tolist() == _ref_counts(r1.experts, 32)
    assert torch.all(r1.weights == 1)


def test_seed_snippet_and_expert_utilization_fallback():
    x = torch.randn(4, 512, 256)
    router = HashRouter(num_experts=16)
    assign = router(x)
    assert assign.experts.shape == (2048, 2) and assign.batch_shape == (4, 512)
    counts = expert_utilization(assign)
    assert counts.tolist() == _ref_counts(assign.experts, 16)
    # Without the cached counts the fallback bincount must agree.
    plain = Routing(assign.experts, assign.weights, 16)
    assert expert_utilization(plain).tolist() == counts.tolist()
    mean = sum(counts.tolist()) / 16
    std = math.sqrt(sum((c - mean) ** 2 for c in counts.tolist()) / 16)
    assert load_balance_std(assign) == pytest.approx(std / mean)


def test_lsh_similar_vectors_share_experts_and_distant_ones_spread():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200, 64, generator=gen)
    near = base + 1e-4 * torch.randn(200, 64, generator=gen)
    router = HashRouter(16, 2, 0)
    same = (router(base).experts == router(near).experts).all(dim=1).float().mean()
    assert same > 0.95
    # Unrelated Gaussian vectors: a chance match of both slots is about 1/E^2.
    other = torch.randn(200, 64, generator=gen)
    assert (router(base).experts == router(other).experts).all(dim=1).float().mean() < 0.1


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 300), st.sampled_from([(1, 1), (1, 2), (2, 3)]),
       st.integers(1, 2), st.integers(1, 300))
def test_hash_is_deterministic_and_batch_shape_invariant(seed, e, split, k, n):
    a, b = split
    ids = torch.randint(0, 50_000, (6 * n,), generator=torch.Generator().manual_seed(seed))
    r = HashRouter(e, k, seed % 1000)(ids)
    again = HashRouter(e, k, seed % 1000)(ids.view(a * n, -1))
    assert torch.equal(r.experts, again.experts)
    assert again.batch_shape == (a * n, 6 // a)
    # Counts sum to k * T minus the collided second slots.
    collided = int((r.experts[:, -1] < 0).sum()) if k == 2 else 0
    assert int(r.counts.sum()) == k * ids.numel() - collided


def test_lsh_is_batch_shape_invariant_and_matches_the_hyperplane_signs():
    x = torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(8))
    router = HashRouter(12, 2, 5)
    r = router(x)
    assert torch.equal(r.experts, router(x.reshape(60, 32)).experts)
    assert torch.equal(r.experts, HashRouter(12, 2, 5)(x.reshape(3, 20, 32)).experts)
    # Reference: E = 12 is no power of two, so slot s reads the 4 + 4 bits s*8 .. s*8+7 of the
    # sign pattern as a code c in [0, 256) and takes expert floor(c * 12 / 256).
    signs = (x.reshape(60, 32) @ router._planes[32] > 0).long()
    for t in range(60):
        codes = [sum(int(signs[t, s * 8 + b]) << b for b in range(8)) * 12 // 256 for s in range(2)]
        assert r.experts[t].tolist() == [codes[0], -1 if codes[1] == codes[0] else codes[1]]


@pytest.mark.parametrize("e", [48, 64])
def test_lsh_gives_every_expert_a_fair_share_of_isotropic_vectors(e):
    # Isotropic Gaussian vectors fall on either side of each hyperplane with probability 1/2,
    # so every code is equally likely and each expert's share is its share of codes. For E = 48
    # that is 21 or 22 of 1024 codes (code % E on 6 bits gave experts 0-15 two codes of 64, the
    # rest one); 100k first slots put about 2100 on each expert, sampling noise about 2 %.
    x = torch.randn(100_000, 64, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(HashRouter(e, 1, 0)(x).experts[:, 0], minlength=e).double()
    assert float(counts.max() / counts.min()) < 1.35


def test_balanced_table_spread_is_bounded_by_the_heaviest_id():
    # LPT in rounds: max load - min load <= the largest frequency (exact while all rounds are greedy).
    gen = torch.Generator().manual_seed(5)
    for e in (2, 5, 8):
        freq = torch.randint(0, 1000, (40,), generator=gen)
        router = BalancedHashRouter(e, 1, 0, freq)
        loads = [0] * e
        for token, f in enumerate(freq.tolist()):
            loads[router(torch.tensor([token])).experts[0, 0]] += f
        assert max(loads) - min(loads) <= int(freq.max())


def test_balanced_table_beats_plain_hash_on_zipf_and_falls_back_outside_the_table():
    vocab = 2000
    pmf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(pmf, 50_000, replacement=True, generator=torch.Generator().manual_seed(2))
    plain, balanced = HashRouter(16, 2, 1), BalancedHashRouter(16, 2, 1, pmf)
    rb = balanced(ids)
    assert load_balance_std(rb) < load_balance_std(plain(ids))
    assert rb.counts.tolist() == _ref_counts(rb.experts, 16)
    # Two copies of an id go to different experts when E is even.
    assert bool((rb.experts[:, 1] >= 0).all())
    outside = torch.tensor([vocab + 5, vocab + 77])
    assert torch.equal(balanced(outside).experts, plain(outside).experts)
    with pytest.raises(ValueError, match="token ids"):
        balanced(torch.randn(3, 4))


def _mixtral_reference(logits, k):
    probs = torch.softmax(logits, dim=-1)
    w, idx = probs.topk(k, dim=-1)
    return idx, w / w.sum(dim=-1, keepdim=True)


def test_topk_softmax_route_matches_mixtral_values_and_gradients():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    r = topk_softmax_route(a, 2)
    idx, w = _mixtral_reference(b, 2)
    assert torch.equal(r.experts, idx)
    torch.testing.assert_close(r.weights, w)
    torch.testing.assert_close(r.probs, torch.softmax(logits, -1))
    coeff = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (r.weights * coeff).sum().backward()
    (w * coeff).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="k must be >= 1 and <= 8"):
        topk_softmax_route(logits, 9)
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        topk_softmax_route(torch.zeros(3, 4, 5), 1)


def test_topk_router_uses_its_gate():
    router = TopKRouter(num_experts=8, top_k=2, d_model=16, seed=4)
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    r = router(x)
    idx, w = _mixtral_reference(x.reshape(-1, 16) @ router.gate, 2)
    assert torch.equal(r.experts, idx) and r.batch_shape == (3, 10)
    torch.testing.assert_close(r.weights, w)


def _capacity_reference(experts, cap, e):
    """Slot 0 of every token first, then slot 1, tokens in order; keep while the expert has room."""
    fill = [0] * e
    keep = [[False] * experts.shape[1] for _ in range(experts.shape[0])]
    for slot in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            x = int(experts[t, slot])
            if x >= 0 and fill[x] < cap:
                fill[x] += 1
                keep[t][slot] = True
    return torch.where(torch.tensor(keep), experts, -1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 60), st.integers(0, 30),
       st.integers(0, 10_000))
def test_apply_capacity_matches_loop_reference(e, k, t, cap, seed):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randint(-1, e, (t, k), generator=gen)
    weights = torch.rand(t, k, generator=gen)
    r = apply_capacity(Routing(experts, weights, e), cap)
    want = _capacity_reference(experts, cap, e)
    assert torch.equal(r.experts, want)
    assert torch.equal(r.weights, torch.where(want >= 0, weights, 0.0))
    assert r.counts.tolist() == _ref_counts(want, e)
    # Counts sum to the routed slots minus the drops.
    drops = int(((experts >= 0) & (want < 0)).sum())
    assert int(r.counts.sum()) == int((experts >= 0).sum()) - drops
    # Choices per slot before the drops, by a loop; choice_counts counts them itself without it.
    per_slot = [[sum(int(experts[i, j]) == x for i in range(t)) for x in range(e)] for j in range(k)]
    assert r.slot_demand.tolist() == per_slot
    assert rm.choice_counts(Routing(experts, weights, e)).tolist() == per_slot


def test_switch_and_gshard_follow_their_papers():
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(3))
    sw = SwitchRouter(num_experts=8, d_model=32, seed=1, capacity_factor=1.0)
    r = sw(x)
    probs = torch.softmax(x @ sw.gate, dim=-1)
    p, top1 = probs.max(dim=-1)
    cap = math.ceil(1.0 * 400 / 8)
    want = _capacity_reference(top1[:, None], cap, 8)
    assert torch.equal(r.experts, want)
    torch.testing.assert_close(r.weights[:, 0], torch.where(want[:, 0] >= 0, p, 0.0))
    assert max(r.counts.tolist()) <= cap

    gs = GShardRouter(num_experts=8, d_model=32, seed=1, capacity_factor=0.5)
    r = gs(x)
    idx, w = _mixtral_reference(x @ gs.gate, 2)
    want = _capacity_reference(idx, math.ceil(0.5 * 2 * 400 / 8), 8)
    assert torch.equal(r.experts, want)
    torch.testing.assert_close(r.weights, torch.where(want >= 0, w, 0.0))
    with pytest.raises(ValueError, match="top_k must be >= 2 and <= 2"):
        GShardRouter(8, 1, 32)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        SwitchRouter(8, 1, 32, capacity_factor=0)


def test_expert_choice_each_expert_takes_its_top_tokens():
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(7))
    router = ExpertChoiceRouter(num_experts=4, top_k=1, d_model=16, seed=2, capacity_factor=1.0)
    r = router(x)
    probs = torch.softmax(x @ router.gate, dim=-1)
    cap = math.ceil(100 / 4)
    want = set()
    for expert in range(4):
        order = sorted(range(100), key=lambda t: -float(probs[t, expert]))[:cap]
        want |= {(t, expert) for t in order}
    got = {(t, int(v)) for t in range(100) for v in r.experts[t].tolist() if v >= 0}
    assert got == want
    assert r.counts.tolist() == [cap] * 4 == _ref_counts(r.experts, 4)
    for t, expert in got:
        slot = r.experts[t].tolist().index(expert)
        assert float(r.weights[t, slot]) == pytest.approx(float(probs[t, expert]))


def test_deepseek_bias_selects_and_updates_by_sign():
    router = DeepSeekV3Router(num_experts=4, top_k=1, d_model=8, seed=0, bias_update_speed=0.1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    scores = torch.sigmoid(x @ router.gate)
    r = router(x)
    assert torch.equal(r.experts[:, 0], scores.argmax(dim=-1))
    torch.testing.assert_close(r.weights, torch.ones(64, 1))  # one expert: renormalised to 1
    counts0 = torch.bincount(scores.argmax(dim=-1), minlength=4).double()
    hist = router.balance(x, steps=1, batch_tokens=64)
    assert len(hist) == 2 and hist[0].cv == pytest.approx(float(counts0.std(unbiased=False) / 16))
    torch.testing.assert_close(router.bias, 0.1 * torch.sign(16 - counts0).float())
    # A large bias on one expert wins every selection but does not enter the weights.
    router.bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    r = router(x)
    assert bool((r.experts == 2).all())
    k2 = DeepSeekV3Router(num_experts=4, top_k=2, d_model=8, seed=0)
    r = k2(x)
    chosen = scores.gather(1, r.experts)
    torch.testing.assert_close(r.weights, chosen / chosen.sum(1, keepdim=True))


def test_deepseek_bf16_routing_ignores_a_constant_added_to_every_bias():
    """Only differences between experts' biases may matter. Under bf16 autocast the bias was added
    in bf16, where a level of 4 has steps of 0.03, above a trained gate's typical score of 0.01:
    about a fifth of the tokens changed experts when every bias rose by 4. The selection now runs
    in float32 and matches a float64 reference wherever that has no tie; weights stay bf16."""
    gen = torch.Generator().manual_seed(0)
    t, e = 4096, 16
    logits = (torch.randn(t, e, generator=gen) * 2 - 4).to(torch.bfloat16)  # scores ~0.01
    bias = torch.randn(e, generator=gen) * 0.05
    router = DeepSeekV3Router(e, 2, 64)
    base = router.route_logits(logits, (t,), bias=bias)
    assert base.weights.dtype == torch.bfloat16
    for c in (1.0, 2.0, 4.0):
        assert torch.equal(router.route_logits(logits, (t,), bias=bias + c).experts, base.experts), c
    ref = torch.sigmoid(logits.double()) + bias.double()
    top3 = ref.topk(3, dim=-1)
    clear = top3.values[:, 1] > top3.values[:, 2]  # rows whose top two are not tied with a third
    assert clear.float().mean() > 0.9
    assert torch.equal(base.experts.sort(dim=-1).values[clear],
                       top3.indices[:, :2].sort(dim=-1).values[clear])


def test_deepseek_balancing_reduces_imbalance_on_clustered_tokens():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=gen)
    x = centres[torch.randint(0, 4, (4096,), generator=gen)] + 0.3 * torch.randn(4096, 32, generator=gen)
    router = DeepSeekV3Router(16, 2, 32, 0, bias_update_speed=0.02)
    hist = router.balance(x, steps=60, batch_tokens=4096)
    assert hist[-1].max_vio < 0.5 * hist[0].max_vio


@pytest.mark.parametrize("bad, match", [
    (lambda: HashRouter(0), "num_experts must be >= 1"),
    (lambda: HashRouter(8, 3), "top_k must be >= 1 and <= 2"),
    (lambda: HashRouter(8)(torch.zeros(0, dtype=torch.long)), "x must not be empty"),
    (lambda: HashRouter(8)(torch.zeros(3, dtype=torch.bool)), "integer token ids or float"),
    (lambda: HashRouter(8)([1, 2]), "x must be a torch.Tensor"),
    (lambda: HashRouter(8)(torch.randn(5)), r"shape \(\.\.\., D\)"),
    (lambda: TopKRouter(8, 2, 16)(torch.randn(4, 15)), "d_model = 16"),
    (lambda: TopKRouter(8, 2, 16)(torch.ones(4, 16, dtype=torch.long)), "must be a float tensor"),
    (lambda: TopKRouter(8, 9, 16), "top_k must be >= 1 and <= 8"),
    (lambda: ExpertChoiceRouter(8, 1, 16, capacity_factor=-1), "capacity_factor must be > 0"),
    (lambda: DeepSeekV3Router(8, 2, 16).balance(torch.randn(4, 16), -1), "steps must be >= 0"),
])
def test_bad_input_raises_value_error_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_gate_over_memory_budget_is_refused_before_allocating(monkeypatch):
    # E x D float32 gate: 32768 x 40000 x 4 bytes = 4.9 GiB, over the 4 GiB budget.
    called = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="gate would need about 4.9 GiB"):
        TopKRouter(1 << 15, 2, 40_000)
    assert not called


@pytest.mark.parametrize("e", [2047, 2048, 1 << 15])
def test_many_experts_count_without_an_e_squared_buffer(monkeypatch, e):
    # Counting (expert, expert) pairs needs E (E + 1) bins: 8 GiB at E = 32768 for any T.
    real = torch.bincount

    def bounded(x, weights=None, minlength=0):
        assert minlength <= (1 << 22) + 1, f"bincount of {minlength} bins"
        return real(x, weights, minlength)

    monkeypatch.setattr(torch, "bincount", bounded)
    ids = torch.arange(5000)
    r = HashRouter(e, 2, 1)(ids)
    assert r.counts.tolist() == _ref_counts(r.experts, e)
    for t in (0, 17, 4999):
        e0, e1 = _ref_hash(HashRouter(e, 2, 1), t)
        assert r.experts[t].tolist() == [e0, -1 if e1 == e0 else e1]


def test_balanced_table_refuses_non_finite_frequencies():
    with pytest.raises(ValueError, match="frequencies must be finite"):
        BalancedHashRouter(8, 2, 0, torch.tensor([1.0, float("nan"), 2.0]))


@pytest.mark.parametrize("e, k", [(1, 1), (1, 2), (6000, 2), (10_000, 1)])
def test_lsh_experts_are_in_range_for_any_expert_count(e, k):
    # E = 1: every token to expert 0 (slot 1 collides). E > 8192, not a power of two: code * E
    # passes 2^31, so the reduction must not wrap to negative experts.
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(2))
    r = HashRouter(e, k, 0)(x)
    valid = r.experts[r.experts >= 0]
    assert int(valid.min()) >= 0 and int(valid.max()) < e
    assert int(expert_utilization(r).sum()) == int((r.experts >= 0).sum())
    if e == 1:
        assert r.experts[:, 0].eq(0).all() and (k == 1 or r.experts[:, 1].eq(-1).all())


def test_cpu_top2_picks_two_different_experts_even_without_finite_scores():
    inf = float("-inf")
    scores = torch.tensor([[inf, inf, inf], [0.5, inf, inf], [inf, 0.5, inf], [0.1, 0.3, 0.2]])
    values, index = top_k(scores, 2)
    assert (index[:, 0] != index[:, 1]).all()
    # The values are the picked experts' scores, and match topk's (which picks distinct ones too).
    assert torch.equal(values, scores.gather(1, index))
    assert torch.equal(values, scores.topk(2, dim=-1).values)
    assert index[3].tolist() == [1, 2]
