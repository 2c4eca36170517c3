"""engine.flash_attention3: provider detection, the SDPA fallback, layouts, GQA, the FA3 and FA4
branches, and which kernel a call takes (forward-only, with gradients, `prefer=`).

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
    fa3 = "FA3 not installed" if not fa._HAS_FLASH3 else "tensors on cpu; FA3 needs a Hopper GPU"
    fa4 = "FA4 not installed" if not fa._HAS_FLASH4 else "tensors on cpu; FA4 needs an sm_90 or sm_100 GPU"
    assert path.reason == f"{fa3}; {fa4}"  # forward only: FA3 is tried first
    q.requires_grad_(True)
    assert fa.choose_path(q, k, v).reason == f"{fa4}; {fa3}"  # with gradients: FA4 first


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
    monkeypatch.setattr(fa, "choose_path",
                        lambda q, k, v, layout, causal=False, prefer="auto": fa.AttentionPath("fa3", "forced"))
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


def _fake_fa4():
    """An FA4 interface whose flash_attn_func checks the (B, S, H, D) contract, returns (out, lse)
    like FA4, and is differentiable (float64 reference ops)."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), softcap=0.0):
        calls.append((tuple(q.shape), causal, window_size, softcap))
        out = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale)
        return out.transpose(1, 2).to(q.dtype), None

    mod = _Found("flash_attn.cute.interface")
    mod.flash_attn_func = flash_attn_func
    return mod, calls


def _kernels(monkeypatch, fa3: str | None, fa4: str | None) -> None:
    """Pretend each kernel can (None) or cannot (the reason) take the call."""
    monkeypatch.setattr(fa, "_WHY_NOT", {"fa3": lambda q, k, v: fa3, "fa4": lambda q, k, v: fa4})


@pytest.mark.parametrize("grad, prefer, fa3, fa4, backend, reason", [
    (False, "auto", None, None, "fa3", "on cpu"),  # forward only: FA3 first
    (True, "auto", None, None, "fa4", "on cpu"),  # gradients: FA4 first
    (False, "fa4", None, None, "fa4", "on cpu"),
    (True, "fa3", "inputs require grad and fa3-fwd is forward only", None, "fa4",
     "asked for FA3: inputs require grad and fa3-fwd is forward only; "),
    (True, "auto", None, "FA4 not installed", "fa3", "FA4 not installed; "),
    (False, "fa4", "FA3 not installed", "tensors on cpu", "sdpa", "asked for FA4: tensors on cpu; FA3 not installed"),
    (False, "sdpa", None, None, "sdpa", "asked for SDPA"),
])
def test_which_kernel_a_call_takes(monkeypatch, grad, prefer, fa3, fa4, backend, reason):
    _kernels(monkeypatch, fa3, fa4)
    q, k, v = (x.requires_grad_(grad) for x in _qkv(1, 4, 2, 2, 8, "bshd"))
    path = fa.choose_path(q, k, v, prefer=prefer)
    assert path.backend == backend and reason in path.reason


def test_no_grad_mode_counts_as_forward_only(monkeypatch):
    _kernels(monkeypatch, None, None)
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 4, 2, 2, 8, "bshd"))
    with torch.no_grad():
        assert fa.choose_path(q, k, v).backend == "fa3"


def test_bad_prefer_is_refused_naming_the_choices():
    q, k, v = _qkv(1, 4, 2, 2, 8, "bshd")
    with pytest.raises(ValueError, match="prefer must be one of auto, fa4, fa3, sdpa"):
        fa.attention(q, k, v, prefer="fa5")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_fa4_branch_passes_bshd_restores_the_layout_and_carries_gradients(monkeypatch, layout):
    mod, calls = _fake_fa4()
    monkeypatch.setattr(fa, "_FA4_MODULE", mod)
    _kernels(monkeypatch, "FA3 not installed", None)
    q, k, v = (x.double().requires_grad_(True) for x in _qkv(2, 6, 4, 2, 8, layout))
    out, path = fa.attention_with_path(q, k, v, causal=True, layout=layout)
    assert path.backend == "fa4" and calls == [((2, 6, 4, 8), True, (None, None), 0.0)]
    bhsd = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    qr, kr, vr = (bhsd(x).detach().requires_grad_(True) for x in (q, k, v))
    ref = naive_attention(qr, kr, vr, causal=True)
    torch.testing.assert_close(bhsd(out), ref)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(bhsd(out), (q, k, v), dout)
    want = torch.autograd.grad(ref, (qr, kr, vr), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(bhsd(g), w)


def test_fa4_call_passes_window_and_softcap_and_returns_out_only(monkeypatch):
    mod, calls = _fake_fa4()
    monkeypatch.setattr(fa, "_FA4_MODULE", mod)
    q, k, v = _qkv(1, 5, 2, 2, 8, "bshd")
    out = fa.fa4_call(q, k, v, causal=True, window=3, softcap=50.0)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    assert calls[-1][1:] == (True, (3, 0), 50.0)


@pytest.mark.parametrize("d, cap, ok", [(8, (9, 0), True), (256, (9, 0), True), (264, (9, 0), False),
                                        (12, (9, 0), False), (128, (10, 0), True), (192, (10, 0), False),
                                        (256, (10, 0), True)])
def test_fa4_head_dims_per_architecture(d, cap, ok):
    assert fa.fa4_head_dim_ok(d, cap) is ok


def test_fa4_on_a_cpu_or_missing_says_why_instead_of_failing(monkeypatch):
    q, k, v = _qkv(1, 4, 2, 2, 8, "bshd")
    monkeypatch.setattr(fa, "_HAS_FLASH4", False)
    assert fa.fa4_readiness(torch.device("cpu")) == (False, "not installed (pip install flash-attn-4)")
    monkeypatch.setattr(fa, "_HAS_FLASH4", True)
    usable, why = fa.fa4_readiness(torch.device("cpu"))
    assert not usable and "this is a CPU run; FA4 needs an sm_90 or sm_100 GPU" in why
    assert fa._fa4_why_not(q, k, v) == "tensors on cpu; FA4 needs an sm_90 or sm_100 GPU"
    out, path = fa.attention_with_path(q, k, v, prefer="fa4")  # asked for, cannot run: SDPA, and why
    assert path.backend == "sdpa" and path.reason.startswith("asked for FA4: tensors on cpu")
    torch.testing.assert_close(out.transpose(1, 2).double(), naive_attention(*(x.transpose(1, 2) for x in (q, k, v))),
                               rtol=1e-4, atol=1e-5)


def test_a_gpu_of_another_architecture_is_named(monkeypatch):
    monkeypatch.setattr(fa, "_HAS_FLASH4", True)
    monkeypatch.setattr(fa, "_HAS_FLASH3", True)
    monkeypatch.setattr(fa, "device_capability", lambda device: (8, 0))
    gpu = torch.device("cuda", 0)
    assert fa.fa4_readiness(gpu)[1].endswith("the GPU is sm_80, not sm_90 or sm_100")
    assert fa.fa3_readiness(gpu)[1].endswith("the GPU is sm_80, not Hopper sm_90")
