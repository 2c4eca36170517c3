"""Routing metrics against hand-computed values and simple reference formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import routing_metrics as rm
from engine.moe_router import (Routing, SwitchRouter, apply_capacity, expert_capacity,
                               expert_utilization, load_balance_std)

C = torch.tensor([4, 0, 2, 2])  # E = 4, N = 8, mean 2


def test_hand_computed_metrics_on_4_0_2_2():
    # std = sqrt((2^2 + 2^2 + 0 + 0) / 4) = sqrt(2); mean 2.
    assert rm.cv(C) == pytest.approx(math.sqrt(2) / 2)
    assert rm.max_over_mean(C) == pytest.approx(2.0)
    assert rm.max_vio(C) == pytest.approx(1.0)
    # cap 2: only expert 0 overflows, by 2 of 8 slots.
    assert rm.drop_rate(C, 2) == pytest.approx(0.25)
    assert rm.drop_rate(C, 4) == 0.0
    # p = (1/2, 0, 1/4, 1/4): H = 1.5 ln 2, over ln 4.
    assert rm.normalized_entropy(C) == pytest.approx(0.75)
    # Ordered pairs sum |ci - cj| = 24; / (2 E N) = 24 / 64.
    assert rm.gini(C) == pytest.approx(0.375)


def test_extremes_perfect_balance_and_one_expert():
    even, one = torch.full((8,), 5), torch.tensor([40, 0, 0, 0, 0, 0, 0, 0])
    assert rm.cv(even) == 0 and rm.max_vio(even) == 0 and rm.gini(even) == 0
    assert rm.normalized_entropy(even) == pytest.approx(1.0)
    assert rm.normalized_entropy(one) == 0.0
    assert rm.gini(one) == pytest.approx(7 / 8)
    assert rm.max_over_mean(one) == pytest.approx(8.0)
    assert rm.cv(one) == pytest.approx(math.sqrt(7))  # std = 5 sqrt(7), mean 5


def test_capacity_formula():
    assert expert_capacity(1.25, 2, 1000, 64) == math.ceil(1.25 * 2 * 1000 / 64)  # 40
    assert expert_capacity(1.0, 1, 10, 4) == 3
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(0.0, 1, 10, 4)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(-1.0, 1, 10, 4)


def test_per_rank_load_contiguous_and_custom_placement():
    counts = torch.tensor([4, 0, 2, 2, 1, 1, 3, 3])
    assert rm.contiguous_placement(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    loads = rm.per_rank_load(counts, 4)
    assert loads.tolist() == [4, 4, 2, 6]
    assert rm.balancedness(loads) == pytest.approx(4 / 6)
    # Round-robin placement, as an expert-parallel layout would pass it.
    rr = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    assert rm.per_rank_load(counts, 2, rr).tolist() == [4 + 2 + 1 + 3, 0 + 2 + 1 + 3]
    assert rm.contiguous_placement(6, 4).tolist() == [0, 0, 1, 2, 2, 3]  # floor(i * 4 / 6)
    with pytest.raises(ValueError, match="placement values must be ranks"):
        rm.per_rank_load(counts, 2, torch.full((8,), 2))
    with pytest.raises(ValueError, match="num_ranks must be >= 1 and <= 8"):
        rm.per_rank_load(counts, 9)


def test_switch_aux_loss_by_hand():
    # T = 2 tokens, E = 2: token 0 -> expert 0, token 1 -> expert 0. f = (1, 0).
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    r = Routing(torch.tensor([[0], [0]]), torch.ones(2, 1), 2, probs)
    # P = (0.5, 0.5): aux = 2 * (1 * 0.5 + 0 * 0.5) = 1.
    assert rm.switch_aux_loss(r) == pytest.approx(1.0)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    r = Routing(torch.tensor([[0], [1]]), torch.ones(2, 1), 2, probs)
    # f = (0.5, 0.5), P = (0.8, 0.2): aux = 2 * (0.4 + 0.1) = 1.
    assert rm.switch_aux_loss(r) == pytest.approx(1.0)
    r = Routing(torch.tensor([[0], [0]]), torch.ones(2, 1), 2, probs)
    assert rm.switch_aux_loss(r) == pytest.approx(2 * 0.8)
    assert rm.switch_aux_loss(Routing(torch.tensor([[0]]), torch.ones(1, 1), 2)) is None


def test_null_cv_matches_simulated_uniform_routing():
    e, k, t = 16, 2, 400
    assert rm.null_cv(e, k, t) == pytest.approx(math.sqrt(15 / 800))
    gen = torch.Generator().manual_seed(0)
    cv2 = [rm.cv(torch.bincount(torch.randint(0, e, (k * t,), generator=gen), minlength=e)) ** 2
           for _ in range(400)]
    # E[CV^2] = (E - 1) / (k T) exactly for the multinomial; 400 trials: about 4 % standard error.
    assert sum(cv2) / len(cv2) == pytest.approx(rm.null_cv(e, k, t) ** 2, rel=0.15)


def test_unrouted_fraction_and_summary_fields():
    experts = torch.tensor([[0, -1], [-1, -1], [1, 0], [-1, -1]])
    r = Routing(experts, (experts >= 0).float(), 2)
    assert rm.unrouted_fraction(r) == 0.5
    s = rm.summarize(r, top_k=2, capacity_factor=1.0, num_ranks=2)
    assert s["slots routed"] == 3 and math.isnan(s["aux loss"]) and math.isnan(s["null CV"])
    assert s["CV"] == pytest.approx(rm.cv(torch.tensor([2, 1])))
    # cap = ceil(1 * 2 * 4 / 2) = 4: nothing over capacity.
    assert s["drop rate at C"] == 0.0


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="counts must be a non-empty 1-D tensor"):
        rm.cv(torch.zeros(0))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        rm.gini(torch.tensor([1, -1]))


counts_strategy = st.lists(st.integers(0, 1000), min_size=1, max_size=64)


@settings(max_examples=60, deadline=None)
@given(counts_strategy)
def test_gini_matches_pairwise_definition(values):
    c = torch.tensor(values)
    n, total = len(values), sum(values)
    pairwise = sum(abs(a - b) for a in values for b in values)
    if not total:  # nothing routed: undefined, not perfect balance
        assert math.isnan(rm.gini(c))
        return
    assert rm.gini(c) == pytest.approx(pairwise / (2 * n * total), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(counts_strategy, st.integers(0, 1200))
def test_drop_rate_matches_loop_and_cv_matches_statistics(values, cap):
    c = torch.tensor(values)
    total = sum(values)
    over = sum(max(v - cap, 0) for v in values)
    if not total:
        assert math.isnan(rm.drop_rate(c, cap)) and math.isnan(rm.cv(c))
    else:
        assert rm.drop_rate(c, cap) == pytest.approx(over / total)
        mean = total / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        assert rm.cv(c) == pytest.approx(std / mean, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(1, 50))
def test_balanced_assignment_has_zero_cv_and_full_entropy(e, per_expert):
    experts = torch.arange(e).repeat(per_expert)[:, None]
    r = Routing(experts, torch.ones_like(experts, dtype=torch.float32), e)
    assert load_balance_std(r) == 0.0
    assert rm.normalized_entropy(expert_utilization(r)) == pytest.approx(1.0)


def test_non_finite_counts_are_refused():
    with pytest.raises(ValueError, match="counts must be finite"):
        rm.cv(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="counts must be finite"):
        rm.gini(torch.tensor([1.0, float("inf")]))


def test_capacity_drop_rate_and_aux_loss_count_the_choices_before_the_drops():
    # E = 2, T = 4: tokens 0-2 choose expert 0, token 3 expert 1; capacity 1 keeps one of each.
    probs = torch.tensor([[0.6, 0.4]] * 4)
    r = apply_capacity(Routing(torch.tensor([[0], [0], [0], [1]]), torch.ones(4, 1), 2, probs), 1)
    assert r.experts.view(-1).tolist() == [0, -1, -1, 1]
    assert r.demand.tolist() == [3, 1] and expert_utilization(r).tolist() == [1, 1]
    # f before the drops = (3/4, 1/4), P = (0.6, 0.4): 2 * (0.45 + 0.1) = 1.1 (after them: 1.0).
    assert rm.switch_aux_loss(r) == pytest.approx(1.1)
    # C = 0.5: cap = ceil(0.5 * 1 * 4 / 2) = 1, and 2 of the 4 choices are over it.
    assert rm.summarize(r, top_k=1, capacity_factor=0.5, num_ranks=1)["drop rate at C"] == 0.5


def test_switch_router_drop_rate_is_the_share_of_tokens_it_dropped():
    x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(1))
    r = SwitchRouter(16, d_model=32, seed=2, capacity_factor=0.8)(x)
    dropped = float((r.experts[:, 0] < 0).double().mean())
    assert dropped > 0.1  # C = 0.8 below 1 must drop
    assert rm.summarize(r, top_k=1, capacity_factor=0.8, num_ranks=1)["drop rate at C"] \
        == pytest.approx(dropped)
