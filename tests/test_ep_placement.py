"""engine.expert_parallel: placements, replica choice and traffic, against hand counts and a loop."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine.expert_parallel import (EPSettings, Placement, contiguous_placement, destinations, ep_stats,
                                    greedy_placement, parse_placement, rank_batch,
                                    round_robin_placement, validate_placement)


def test_contiguous_and_round_robin_by_hand():
    # floor(e * 3 / 8) for e = 0..7 is 0 0 0 1 1 1 2 2.
    assert contiguous_placement(8, 3).slots == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert round_robin_placement(8, 3).slots == ((0, 3, 6), (1, 4, 7), (2, 5))


def test_greedy_replicates_the_hot_expert_onto_distinct_ranks():
    # Expert 0 carries 10, the rest 1 each. Two extra slots both go to expert 0 (10/2 = 5 > 1,
    # then 10/3 = 3.33 > 1); 10 slots over 4 ranks allow 3 per rank.
    p = greedy_placement([10, 1, 1, 1, 1, 1, 1, 1], ranks=4, replicas=2)
    hosts = [r for r, s in enumerate(p.slots) if 0 in s]
    assert len(hosts) == 3
    assert sorted(e for s in p.slots for e in s) == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert max(len(s) for s in p.slots) == 3
    # Heaviest first onto the lightest rank: the three copies of 0 (3.33 each) land on three ranks,
    # the 1s fill the fourth rank up to its 3 slots, then the others: max load 10/3 + 2.
    loads = [sum(10 / 3 if e == 0 else 1 for e in s) for s in p.slots]
    assert max(loads) == pytest.approx(10 / 3 + 2)
    assert min(loads) == pytest.approx(3)


def test_greedy_balances_better_than_contiguous_on_skewed_loads():
    loads = [64, 32, 16, 8, 4, 2, 1, 1]
    per_rank = lambda p: [sum(loads[e] for e in s) for s in p.slots]  # noqa: E731
    # contiguous on 2 ranks: 64+32+16+8 = 120 vs 8. Greedy, 4 slots per rank: 64 -> r0; 32, 16,
    # 8, 4 -> r1 (60, full); 2, 1, 1 -> r0 (68).
    assert max(per_rank(contiguous_placement(8, 2))) == 120
    assert sorted(per_rank(greedy_placement(loads, 2))) == [60, 68]


@pytest.mark.parametrize("text,message", [
    ("0-3;4-6", "misses experts [7]"),
    ("0-3;4-8", "outside [0, 7]"),
    ("0-7;", "rank 1 hosts no expert"),
    ("0-3;x", "not an expert id"),
])
def test_bad_placements_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_placement(text, 8)


def test_parse_placement_ranges_and_lists():
    assert parse_placement("0-2,7;3,4-6", 8).slots == ((0, 1, 2, 7), (3, 4, 5, 6))


def test_more_ranks_than_experts_is_refused():
    with pytest.raises(ValueError, match="Ranks R must be <= Experts E"):
        EPSettings(experts=4, ranks=8).validated()
    with pytest.raises(ValueError, match="Ranks R must be <= Experts E"):
        round_robin_placement(4, 8)


def test_traffic_of_a_hand_made_routing():
    # E = 4 on R = 2 contiguous ranks (0,1 | 2,3); rank 0 has tokens 0, 1 and rank 1 tokens 2, 3.
    # Pairs: t0 -> 0 (r0), 3 (r1); t1 -> 1 (r0); t2 -> 2, 3 (r1, r1); t3 -> 0, 1 (r0, r0).
    p = contiguous_placement(4, 2)
    experts = torch.tensor([[0, 3], [1, -1], [2, 3], [0, 1]])
    slots = destinations(experts, torch.arange(4), p.replica_table())
    dst = p.slot_rank()[slots.clamp(min=0)].masked_fill(slots < 0, -1)
    assert dst.tolist() == [[0, 1], [0, -1], [1, 1], [0, 0]]


def _loop_stats(s: EPSettings, p: Placement):
    """Second implementation: walk every (token, slot) pair with plain Python."""
    reps = {e: [i for i, x in enumerate(x for sl in p.slots for x in sl) if x == e]
            for e in range(s.experts)}
    rank_of_slot = [r for r, sl in enumerate(p.slots) for _ in sl]
    m = [[0] * s.ranks for _ in range(s.ranks)]
    for r in range(s.ranks):
        experts = rank_batch(s, r)[1].tolist()
        for t, row in enumerate(experts):
            g = r * s.tokens + t
            for e in row:
                if e >= 0:
                    m[r][rank_of_slot[reps[e][g % len(reps[e])]]] += 1
    return m


@pytest.mark.parametrize("placement,replicas,hot", [("contiguous", 0, 0.0), ("round_robin", 0, 0.3),
                                                   ("greedy", 5, 0.4)])
def test_ep_stats_match_a_pair_by_pair_loop(placement, replicas, hot):
    s = EPSettings(experts=12, ranks=3, top_k=2, tokens=200, d_model=96, dtype="fp16",
                   placement=placement, replicas=replicas, hot_share=hot, seed=3)
    st_ = ep_stats(s)
    m = _loop_stats(s, st_.placement)
    assert [list(r) for r in st_.pair_matrix] == m
    load = [sum(m[i][j] for i in range(3)) for j in range(3)]
    assert list(st_.load) == load
    assert st_.balancedness == pytest.approx(sum(load) / 3 / max(load))
    total = sum(map(sum, m))
    assert st_.leave_share == pytest.approx((total - sum(m[i][i] for i in range(3))) / total)
    assert st_.dispatch_bytes()[0][1] == m[0][1] * 96 * 2  # fp16 rows of 96 values
    assert st_.combine_bytes()[1][0] == st_.dispatch_bytes()[0][1]
    # The heatmap's and the CLI's matrix: off-rank cells only, adding up to the off-rank metric.
    off = st_.off_rank_mb()
    assert [off[i][j] for i in range(3) for j in range(3) if i == j] == [None] * 3
    assert off[2][0] == pytest.approx(m[2][0] * 96 * 2 / 1e6)
    assert sum(v for row in off for v in row if v is not None) == pytest.approx(
        (total - sum(m[i][i] for i in range(3))) * 96 * 2 / 1e6)


def test_hot_share_one_sends_every_first_slot_to_expert_zero_and_keeps_weights():
    base = EPSettings(experts=8, ranks=2, tokens=300, seed=1)
    _, e0, w0 = rank_batch(base, 1)
    _, e1, w1 = rank_batch(EPSettings(experts=8, ranks=2, tokens=300, seed=1, hot_share=1.0), 1)
    assert bool((e1[:, 0] == 0).all())
    assert not bool((e1[:, 1] == 0).any())
    torch.testing.assert_close(w1.sum(dim=1), w0.sum(dim=1))
    # Tokens whose second slot was already expert 0 lose it.
    had = (e0[:, 1] == 0)
    assert bool((e1[had, 1] == -1).all())


def test_a_hot_expert_slows_contiguous_but_replicas_absorb_it():
    s = EPSettings(experts=16, ranks=4, tokens=1000, hot_share=0.5, zipf=0.0, seed=2)
    cont = ep_stats(s)
    greedy = ep_stats(EPSettings(**{**s.__dict__, "placement": "greedy", "replicas": 3}))
    # Half of all first slots on expert 0 (rank 0): rank 0 computes at least 0.5 * 4000 pairs.
    assert cont.load[0] >= 2000
    assert greedy.balancedness > 0.9 > cont.balancedness


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 24), r=st.integers(1, 6), k=st.integers(1, 2), t=st.integers(1, 40),
       placement=st.sampled_from(["contiguous", "round_robin", "greedy"]), rep=st.integers(0, 6),
       hot=st.sampled_from([0.0, 0.5]), router=st.sampled_from(["hash", "topk", "expert_choice"]),
       seed=st.integers(0, 100))
def test_traffic_conserves_pairs(e, r, k, t, placement, rep, hot, router, seed):
    r = min(r, e)
    s = EPSettings(experts=e, ranks=r, top_k=min(k, e), tokens=t, placement=placement,
                   replicas=min(rep, e * (r - 1)), hot_share=hot, router=router, seed=seed)
    st_ = ep_stats(s)
    validate_placement(st_.placement)
    sent = [int((rank_batch(s, i)[1] >= 0).sum()) for i in range(r)]
    assert [sum(row) for row in st_.pair_matrix] == sent  # every valid pair leaves its source once
    assert sum(st_.load) == sum(sent)
    assert 0 < st_.balancedness <= 1 or sum(sent) == 0
    if placement == "greedy":
        assert sum(map(len, st_.placement.slots)) == e + min(rep, e * (r - 1))
        assert max(map(len, st_.placement.slots)) == math.ceil((e + min(rep, e * (r - 1))) / r)
