"""How long an attention sweep should take, and the CPU limit: refuse, or shrink the sweep to fit.

The page and the CLI both ask `plan_run`; rows that would not run (engine.attention_bench.why_skip:
a backend missing here, a mask that does not fit, scores too large for memory) cost nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from engine.attention_bench import memory_budget, why_skip, window_ms
from engine.attention_shapes import SweepSettings, shape_flops, shapes_of

CPU_LIMIT_S = 120.0  # runs estimated longer than this on a CPU are refused or offered reduced
# Effective attention TFLOP/s assumed for estimates: about half of what the kernels reach.
_GPU_TFLOPS = {9: 300.0, 10: 600.0}
_COMPILE_S = {"fa4": 3.0, "flex": 15.0}  # first call of a new configuration; backward about twice
# A GPU row's first warm-up goes on until the SM clock stops falling, at least three warm-ups long
# (engine.timing._settle): a median 85 ms for 25 ms warm-ups on the H200 sweeps of 2026-12-03.
_SETTLE = 3.5


@dataclass(frozen=True)
class RunPlan:
    """A sweep's estimate and, when it is over the CPU limit, a reduced sweep that fits (else None)."""

    estimate_s: float
    too_long: bool
    reduced: SweepSettings | None = None
    reduced_s: float = math.nan


def device_tflops(device: torch.device, dtype: str) -> float:
    """Attention TFLOP/s to expect on `device`: nominal on GPU; on CPU a 512^3 fp32 matmul's rate,
    measured now (a loaded machine gives a slower, truer estimate; SDPA's CPU flash kernel ran at
    0.7-1.3x of it on the 2-core reference machine, 2026-12-03; math at 0.4x)."""
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        rate = _GPU_TFLOPS.get(major, 100.0)
        return rate / 8 if dtype == "fp32" else rate
    n, calls = 512, 0
    a = torch.randn(n, n)  # fp32 even for bf16: CPU attention kernels accumulate in fp32 (a bf16 matmul is far slower)
    for _ in range(2):  # thread pool start-up
        a @ a
    t0 = time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < 0.05:
        a @ a
        calls += 1
    return calls * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def estimate_seconds(s: SweepSettings, device: torch.device, tflops: float | None = None) -> float:
    """Seconds a sweep should take: per timed row its calls (first, reference, memory probe, and per
    window a warm-up, the window and on a GPU five estimate calls) at `tflops`, plus kernel
    compilation; rows that cannot run cost nothing. An estimate, not a bound."""
    shapes = shapes_of(s)
    rate = (tflops or device_tflops(device, s.dtypes[0])) * 1e12
    budget = memory_budget(device)
    total, compiled, cuda = 0.0, set(), device.type == "cuda"
    warm_ms, rep_ms = window_ms(s, device)
    for shape in shapes:
        call = shape_flops(shape, s.mode, s.seed) / rate
        for b in s.backends:
            if why_skip(shape, b, s, device, budget) is not None:
                continue
            # SDPA-math materialises the scores (4x); at half precision on a CPU its matmuls are slower still.
            slow = (10.0 if device.type == "cpu" and shape.dtype != "fp32" else 2.5) if b == "sdpa-math" else 1.0
            t = call * slow
            warm = max(warm_ms / 1e3, t)
            total += ((_SETTLE if cuda else 1.0) * warm + (s.windows - 1) * warm
                      + s.windows * (max(rep_ms / 1e3, t * s.min_reps) + (5 * t if cuda else 0.0)) + 3 * t)
            key = (b, shape.head_dim, shape.mask, shape.causal, shape.seqlen if b == "flex" else 0)
            if b in _COMPILE_S and key not in compiled:
                compiled.add(key)
                total += _COMPILE_S[b] * (3 if s.mode == "fwd+bwd" else 1)
    return total


def reduced(s: SweepSettings, device: torch.device, limit_s: float, tflops: float | None = None
            ) -> SweepSettings:
    """`s` shrunk until its estimate fits `limit_s`: fewer tokens, then the longest seqlens dropped,
    then a smaller hidden size, then a shorter sequence (the same backends, dtypes and masks)."""
    rate = tflops or device_tflops(device, s.dtypes[0])
    for _ in range(64):
        if estimate_seconds(s, device, rate) <= limit_s:
            return s
        if s.tokens > min(s.seqlens):
            s = replace(s, tokens=s.tokens // 2)
        elif len(s.seqlens) > 1:
            s = replace(s, seqlens=tuple(sorted(s.seqlens))[:-1], tokens=s.tokens)
        elif all((s.hidden // 2) % (d * g) == 0 for d in s.head_dims for g in s.gqa):  # shapes stay valid
            s = replace(s, hidden=s.hidden // 2)
        elif s.seqlens[0] >= 32:
            s = replace(s, seqlens=(s.seqlens[0] // 2,), tokens=s.seqlens[0] // 2)
        else:
            break
    return s


def plan_run(s: SweepSettings, device: torch.device, limit_s: float = CPU_LIMIT_S, tflops: float | None = None
             ) -> RunPlan:
    """The sweep's estimate; on a CPU over `limit_s` seconds, also the reduced sweep that fits and its estimate."""
    rate = tflops or device_tflops(device, s.dtypes[0])
    estimate = estimate_seconds(s, device, rate)
    if device.type != "cpu" or estimate <= limit_s:
        return RunPlan(estimate, False)
    small = reduced(s, device, limit_s, rate)
    return RunPlan(estimate, True, small, estimate_seconds(small, device, rate))


def format_seconds(seconds: float) -> str:
    """'45 s', '12 min', '3.2 h': an estimate at the precision it deserves."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{round(seconds / 86400)} days"
