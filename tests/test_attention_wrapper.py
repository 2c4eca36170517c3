"""engine.flash_attention3: provider detection, the SDPA fallback, layouts, GQA and the FA3 branch.

Every output is compared with `naive_attention`, a float64 softmax(q k^T * scale) v written here.
"""

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import flash_attention3 as fa


def naive_attention(q, k, v, causal=False, scale=None):
    """Reference on (B, H, S, D): float64, kv heads repeated, top-left causal mask."""
    q, k, v = (x.double() for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def _qkv(b, s, hq, hkv, d, layout="bhsd", seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda h: (b, h, s, d)) if layout == "bhsd" else (lambda h: (b, s, h, d))
    return [torch.randn(*shape(h), generator=gen, dtype=dtype) for h in (hq, hkv, hkv)]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), s=st.integers(1, 24), hkv=st.integers(1, 3), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([8, 16, 32]), causal=st.booleans(), seed=st.integers(0, 10_000))
def test_fallback_matches_reference_in_both_layouts_with_gqa(b, s, hkv, g, d, causal, seed):
    q, k, v = _qkv(b, s, hkv * g, hkv, d, "bhsd", seed)
    ref = naive_attention(q, k, v, causal)
    out_bhsd, path = fa.attention_with_path(q, k, v, causal=causal, layout="bhsd")
    out_bshd = fa.attention(*(x.transpose(1, 2).contiguous() for x in (q, k, v)), causal=causal, layout="bshd")
    assert path.backend == "sdpa"
    assert out_bhsd.shape == q.shape and out_bshd.shape == (b, s, hkv * g, d)
    torch.testing.assert_close(out_bhsd.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_bshd.transpose(1, 2).double(), ref, rtol=1e-4, atol=1e-5)


def test_softmax_scale_is_applied():
    q, k, v = _qkv(1, 10, 2, 2, 16, "bshd")
    out = fa.attention(q, k, v, softmax_scale=0.3)
    ref = naive_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.3)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=1e-4, atol=1e-5)


def test_cpu_path_says_why():
    q, k, v = _qkv(1, 4, 2, 2, 8, "bshd")
    path = fa.choose_path(q, k, v)
    assert path.backend == "sdpa"
    assert path.reason == ("FA3 not installed" if not fa._HAS_FLASH3 else
                           "tensors on cpu; FA3 needs a CUDA Hopper GPU")


@pytest.mark.parametrize("shapes, layout, match", [
    (((1, 4, 2, 8), (2, 4, 2, 8), (2, 4, 2, 8)), "bshd", "batch sizes differ"),
    (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "bshd", r"q heads \(3\) must be a multiple of kv heads \(2\)"),
    (((1, 4, 2, 8), (1, 4, 2, 16), (1, 4, 2, 16)), "bshd", "q and k head dims differ: 8 vs 16"),
    (((1, 4, 2, 8), (1, 5, 2, 8), (1, 4, 2, 8)), "bshd", "k and v seqlens differ: 5 vs 4"),
    (((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 4, 8)), "bhsd", "k and v seqlens differ: 5 vs 4"),
    (((4, 2, 8), (4, 2, 8), (4, 2, 8)), "bshd", "q must be 4-D"),
    (((1, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "sbhd", "layout must be one of bshd, bhsd"),
])
def test_bad_shapes_raise_value_errors_naming_the_problem(shapes, layout, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fa.attention(q, k, v, layout=layout)


def test_mixed_dtypes_are_refused():
    q, k, v = _qkv(1, 4, 2, 2, 8, "bshd")
    with pytest.raises(ValueError, match="share one dtype"):
        fa.attention(q, k.half(), v)


class _Found(types.ModuleType):
    pass


def _fake_importer(present: dict[str, object]):
    def import_module(name):
        if name in present:
            return present[name]
        raise ModuleNotFoundError(f"No module named {name!r}")
    return import_module


def test_detection_finds_fa3_fwd_when_only_it_imports(monkeypatch):
    mod = _Found("fa3_fwd_interface")
    mod.flash_attn_func = lambda *a, **k: None
    monkeypatch.setattr(fa.importlib, "import_module", _fake_importer({"fa3_fwd_interface": mod}))
    found, status = fa._detect()
    assert found is mod
    assert (status.available, status.module, status.description) == (
        True, "fa3_fwd_interface", "fa3-fwd (PyPI, forward only)")


def test_detection_prefers_the_official_build(monkeypatch):
    official, fwd = _Found("flash_attn_interface"), _Found("fa3_fwd_interface")
    official.flash_attn_func = fwd.flash_attn_func = lambda *a, **k: None
    monkeypatch.setattr(fa.importlib, "import_module",
                        _fake_importer({"flash_attn_interface": official, "fa3_fwd_interface": fwd}))
    assert fa._detect()[1].module == "flash_attn_interface"


def test_detection_reports_every_reason_when_nothing_imports(monkeypatch):
    broken = _Found("flash_attn_interface")  # imports, but is not a kernel interface
    monkeypatch.setattr(fa.importlib, "import_module", _fake_importer({"flash_attn_interface": broken}))
    found, status = fa._detect()
    assert found is None and not status.available
    assert "flash_attn_interface: has no flash_attn_func" in status.reason
    assert "fa3_fwd_interface: ModuleNotFoundError" in status.reason
    assert "flash_attn_3.flash_attn_interface: ModuleNotFoundError" in status.reason


def _fake_fa3(returns_tuple: bool):
    """A provider whose flash_attn_func checks the (B, S, H, D) contract and computes the reference."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(tuple(q.shape))
        out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale)
        out = out.transpose(1, 2).to(q.dtype)
        return (out, None) if returns_tuple else out

    mod = _Found("fa3_fwd_interface")
    mod.flash_attn_func = flash_attn_func
    return mod, calls


@pytest.mark.parametrize("returns_tuple", [False, True])
def test_fa3_branch_passes_bshd_and_restores_the_callers_layout(monkeypatch, returns_tuple):
    mod, calls = _fake_fa3(returns_tuple)
    monkeypatch.setattr(fa, "_FA3_MODULE", mod)
    monkeypatch.setattr(fa, "choose_path", lambda q, k, v, layout, causal=False: fa.AttentionPath("fa3", "forced"))
    q, k, v = _qkv(2, 6, 4, 2, 8, "bhsd")
    out, path = fa.attention_with_path(q, k, v, causal=True, layout="bhsd")
    assert path.backend == "fa3" and calls == [(2, 6, 4, 8)]  # the provider saw (B, S, H, D)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


def test_fa3_readiness_explains_cpu_and_missing_builds(monkeypatch):
    monkeypatch.setattr(fa, "_HAS_FLASH3", False)
    assert fa.fa3_readiness(torch.device("cpu"))[0] is False
    assert "not installed" in fa.fa3_readiness(torch.device("cpu"))[1]
    monkeypatch.setattr(fa, "_HAS_FLASH3", True)
    monkeypatch.setattr(fa, "PROVIDER", fa.ProviderStatus(True, "fa3_fwd_interface", "fa3-fwd", "0.0.3", "ok"))
    usable, why = fa.fa3_readiness(torch.device("cpu"))
    assert not usable and "CPU run" in why
    assert fa.fa3_dtypes() == (torch.bfloat16,)  # fa3-fwd ships no fp16 kernels


@pytest.mark.parametrize("layout, sq, sk", [("bshd", 1, 8), ("bhsd", 8, 3)])
def test_causal_with_unequal_query_and_key_lengths_is_refused(layout, sq, sk):
    """FA3 aligns the causal mask bottom-right, SDPA top-left: they agree only when S_q == S_k, so
    any other causal call would give a different answer per path and is refused."""
    q = _qkv(1, sq, 2, 2, 8, layout)[0]
    k, v = _qkv(1, sk, 2, 2, 8, layout, seed=1)[1:]
    with pytest.raises(ValueError, match=rf"causal attention needs S_q == S_k, got S_q {sq}, S_k {sk}"):
        fa.attention(q, k, v, causal=True, layout=layout)
    out = fa.attention(q, k, v, causal=False, layout=layout)  # non-causal cross-attention is fine
    bhsd = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    torch.testing.assert_close(bhsd(out).double(), naive_attention(bhsd(q), bhsd(k), bhsd(v)), rtol=1e-4, atol=1e-5)
