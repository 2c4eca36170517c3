"""Workload generators: distributions checked against their definitions, determinism, refusals."""

import math

import pytest
import torch

from engine import workloads as wl


def test_zipf_pmf_follows_the_power_law():
    p = wl.zipf_pmf(1000, 1.2)
    assert float(p.sum()) == pytest.approx(1.0)
    assert float(p[0] / p[1]) == pytest.approx(2 ** 1.2)
    assert float(p[9] / p[99]) == pytest.approx(10 ** 1.2)
    harmonic = sum(r ** -1.0 for r in range(1, 101))
    assert float(wl.zipf_pmf(100, 1.0)[0]) == pytest.approx(1 / harmonic)


def test_zipf_samples_match_the_pmf_through_the_id_permutation():
    t, v, s = 200_000, 50, 1.1
    ids = wl.token_ids("zipf", t, v, s, seed=4)
    freq = torch.bincount(ids, minlength=v).double() / t
    pmf = wl.id_pmf("zipf", v, s, seed=4)
    # Binomial standard error per id; 5 sigma leaves no room for flakiness yet catches a wrong map.
    se = (pmf * (1 - pmf) / t).sqrt()
    assert bool(((freq - pmf).abs() <= 5 * se + 1e-9).all())
    assert int(pmf.argmax()) == int(freq.argmax())
    # The most frequent id is not simply id 0: ranks are permuted.
    assert sorted(pmf.tolist(), reverse=True) == pytest.approx(wl.zipf_pmf(v, s).tolist())


def test_uniform_ids_and_hidden_states_have_the_stated_moments():
    ids = wl.token_ids("uniform", 100_000, 10, seed=0)
    assert ids.min() >= 0 and ids.max() <= 9
    assert torch.bincount(ids, minlength=10).min() > 9_500  # expected 10,000, sd ~95
    x = wl.hidden_states("gaussian", 20_000, 16, seed=1)
    assert x.shape == (20_000, 16) and x.dtype == torch.float32
    assert float(x.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(x.var()) == pytest.approx(1.0, abs=0.02)
    c = wl.hidden_states("clustered", 20_000, 16, clusters=3, seed=1)
    # The noise alone has variance 0.5^2 = 0.25 per coordinate; the spread of the centres adds more.
    centred = c - c.mean(0)
    assert float(centred.var()) > 0.25
    e = wl.embed(torch.tensor([3, 3, 7]), 10, 8, seed=0)
    assert torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])


def test_same_seed_same_workload_other_seed_other_workload():
    a = wl.token_ids("zipf", 1000, 500, 1.0, seed=7)
    assert torch.equal(a, wl.token_ids("zipf", 1000, 500, 1.0, seed=7))
    assert not torch.equal(a, wl.token_ids("zipf", 1000, 500, 1.0, seed=8))
    h = wl.hidden_states("clustered", 100, 4, 2, seed=3)
    assert torch.equal(h, wl.hidden_states("clustered", 100, 4, 2, seed=3))


@pytest.mark.parametrize("call, match", [
    (lambda: wl.token_ids("zipf", 0, 10), "num_tokens must be >= 1"),
    (lambda: wl.token_ids("poisson", 10, 10), "workload must be one of"),
    (lambda: wl.token_ids("zipf", 10, 10, s=-1), "zipf_s must be >= 0"),
    (lambda: wl.hidden_states("gaussian", 1 << 22, 4096), "would need about"),
    (lambda: wl.hidden_states("gaussian", 1 << 23, 4), "num_tokens must be >= 1 and <= 4194304"),
])
def test_bad_sizes_are_refused_before_allocating(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_memory_estimate_is_checked_before_generation(monkeypatch):
    # 4M tokens x D=4096 floats is 64 GiB: refused by the estimate, so randn is never called.
    called = []
    monkeypatch.setattr(wl.torch, "randn", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="hidden states would need about 128.0 GiB"):
        wl.hidden_states("gaussian", 1 << 22, 4096)
    assert not called
    assert math.isclose(8.0 * (1 << 22) * 4096 / 2**30, 128.0)
