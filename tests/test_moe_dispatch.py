"""MoE dispatch: the per-expert loop and the grouped kernel (torch._grouped_mm) both equal a
token-by-token reference written here, forward and gradients, empty slots included; on a Hopper
GPU the grouped path runs forward and backward without a host sync."""

from __future__ import annotations

import pytest
import torch

from engine.moe_dispatch import grouped_ffn, grouped_mm_runs


def _reference(x, experts, weights, w_in, w_out, ffn):
    """sum over slots j of weights[t, j] * FFN_{experts[t, j]}(x[t]), one token at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if e < 0:
                continue
            h = x[t] @ w_in[e]
            if ffn == "swiglu":
                g, u = h.chunk(2)
                h = torch.nn.functional.silu(g) * u
            else:
                h = torch.nn.functional.gelu(h)
            acc = acc + weights[t, j] * (h @ w_out[e])
        rows.append(acc)
    return torch.stack(rows)


def _case(ffn: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, d, f, e, k = 29, 16, 24, 5, 2
    x = torch.randn(t, d, generator=g)
    w_in = torch.randn(e, d, f * (2 if ffn == "swiglu" else 1), generator=g) / 4
    w_out = torch.randn(e, f, d, generator=g) / 5
    experts = torch.randint(0, e - 1, (t, k), generator=g)  # the last expert gets no real token
    experts[3, 1] = experts[7, 0] = experts[11, 1] = -1     # collisions, drops
    weights = torch.rand(t, k, generator=g).masked_fill(experts < 0, 0.0)
    grad = torch.randn(t, d, generator=g)
    return (x, w_in, w_out, weights), experts, grad


def _run(args, experts, grad, ffn, dtype, device, grouped):
    leaves = [a.to(device, dtype, copy=True).requires_grad_() for a in args]
    x, w_in, w_out, weights = leaves
    out = grouped_ffn(x, experts.to(device), weights, w_in, w_out, ffn, grouped=grouped)
    out.float().backward(grad.to(device))
    return out.detach().float().cpu(), [a.grad.float().cpu() for a in leaves]


def _want(args, experts, grad, ffn):
    leaves = [a.double().detach().requires_grad_() for a in args]
    x, w_in, w_out, weights = leaves
    out = _reference(x, experts, weights, w_in, w_out, ffn)
    out.backward(grad.double())
    return out.float().detach(), [a.grad.float() for a in leaves]


def _close(got, want, rel):
    """Max error within rel of the reference's largest entry (bf16 rounds to 2^-8)."""
    assert float((got - want).abs().max()) <= rel * float(want.abs().max()), (got - want).abs().max()


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_loop_path_equals_reference(ffn: str) -> None:
    args, experts, grad = _case(ffn)
    out, grads = _run(args, experts, grad, ffn, torch.float32, "cpu", grouped=False)
    want, want_grads = _want(args, experts, grad, ffn)
    _close(out, want, 1e-5)
    for g, w in zip(grads, want_grads):
        _close(g, w, 1e-5)


def _grouped_devices() -> list[str]:
    devs = []
    try:  # torch's CPU build runs _grouped_mm through its per-group fallback (2.13: yes)
        a = torch.zeros(8, 8, dtype=torch.bfloat16)
        torch._grouped_mm(a, torch.zeros(1, 8, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([8], dtype=torch.int32))
        devs.append("cpu")
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    if torch.cuda.is_available() and grouped_mm_runs(torch.zeros(1, 8, device="cuda",
                                                                 dtype=torch.bfloat16),
                                                     torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)):
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _grouped_devices() or
                         [pytest.param("none", marks=pytest.mark.skip("no _grouped_mm here"))])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_grouped_path_equals_reference(ffn: str, device: str) -> None:
    args, experts, grad = _case(ffn, seed=1)
    out, grads = _run(args, experts, grad, ffn, torch.bfloat16, device, grouped=True)
    want, want_grads = _want(args, experts, grad, ffn)
    _close(out, want, 2e-2)
    for g, w in zip(grads, want_grads):
        _close(g, w, 2e-2)
    # Empty slots ran through the last expert with weight 0: no trace in any gradient.
    assert float(grads[3][experts < 0].abs().max()) == 0.0
    assert float(grads[1][-1].abs().max()) == 0.0 and float(grads[2][-1].abs().max()) == 0.0


@pytest.mark.skipif("cuda" not in _grouped_devices(), reason="needs sm90 CUDA")
def test_grouped_path_never_waits_for_the_gpu() -> None:
    args, experts, grad = _case("gelu")
    dev = "cuda"
    x, w_in, w_out, weights = [a.to(dev).requires_grad_() for a in args]
    experts, grad = experts.to(dev), grad.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        with torch.autocast("cuda", torch.bfloat16):
            out = grouped_ffn(x, experts, weights, w_in, w_out, "gelu")
        out.float().backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == x.dtype and w_in.grad is not None


@pytest.mark.parametrize("device", _grouped_devices() or
                         [pytest.param("none", marks=pytest.mark.skip("no _grouped_mm here"))])
@pytest.mark.parametrize("used", [(0, 2, 4), (0, 1, 2)])  # idle experts in the middle; at the end
def test_grouped_path_with_idle_experts(used: tuple[int, ...], device: str) -> None:
    """Experts with no slot form empty groups (no empty slots here, so nothing pads the last
    group): the result still equals the reference and idle experts get exactly zero gradient."""
    args, _, grad = _case("swiglu", seed=2)
    g = torch.Generator().manual_seed(3)
    experts = torch.tensor(used)[torch.randint(0, len(used), (grad.shape[0], 2), generator=g)]
    out, grads = _run(args, experts, grad, "swiglu", torch.bfloat16, device, grouped=True)
    want, want_grads = _want(args, experts, grad, "swiglu")
    _close(out, want, 2e-2)
    for got, w in zip(grads, want_grads):
        _close(got, w, 2e-2)
    idle = [e for e in range(args[1].shape[0]) if e not in used]
    assert float(grads[1][idle].abs().max()) == 0.0 and float(grads[2][idle].abs().max()) == 0.0
