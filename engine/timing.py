"""Wall-clock timing of a callable, the same way on CPU and CUDA.

CUDA: CUDA events around each call, warm-up first, L2 flushed between repetitions (a write to a
buffer larger than L2) so every repetition reads its inputs from HBM, as in a real model step.
CPU: perf_counter after warm-up. Both report the median and the spread.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engine.validation import check_int

# Larger than the L2 of current GPUs (H100 and H200: 50 MB; B200: 126 MB).
_L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 10th and 90th percentile, over `reps` repetitions."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread of the repetitions."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0


def _summary(samples: list[float]) -> Timing:
    s = sorted(samples)
    n = len(s)
    return Timing(statistics.median(s), s[int(0.1 * (n - 1))], s[int(round(0.9 * (n - 1)))], n)


def time_fn(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 3,
            reps: int = 10, flush_l2: bool = True, min_total_s: float = 0.0,
            lead: Callable[[], object] | None = None) -> Timing:
    """Time `fn()` on `device`; returns milliseconds per call (median and spread).

    `min_total_s` raises the repetition count for very fast calls so the median is stable.
    `lead` (CUDA): untimed GPU work queued before every repetition, after the L2 flush, standing
    for the rest of a model step: the host then reaches fn() ahead of the GPU, as in a model,
    instead of finding it idle.
    """
    warmup = check_int("warmup", warmup, 0, 10_000)
    reps = check_int("reps", reps, 1, 100_000)
    dev = torch.device(device)
    if dev.type == "cuda":
        return _time_cuda(fn, dev, warmup, reps, flush_l2, lead)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start_all < min_total_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 100_000:
            break
    return _summary(samples)


def _time_cuda(fn: Callable[[], object], dev: torch.device, warmup: int, reps: int,
               flush_l2: bool, lead: Callable[[], object] | None) -> Timing:
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=dev) if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(dev)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        if lead is not None:
            lead()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(dev)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def gpu_work(ms: float, device: torch.device) -> Callable[[], None]:
    """A callable that queues about `ms` milliseconds of matrix products on a CUDA device (a
    stand-in for a model's compute; see time_fn's `lead`). Calibrated once, here."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)  # ~0.2 ms: few launches
    out = torch.empty_like(a)
    one = _time_cuda(lambda: torch.matmul(a, a, out=out), device, 3, 10, False, None).median_ms
    count = max(1, round(ms / one))

    def work() -> None:
        for _ in range(count):
            torch.matmul(a, a, out=out)

    return work


def alternating(first: Callable[[], float], second: Callable[[], float], rounds: int
                ) -> tuple[list[float], list[float]]:
    """Call two measurements `rounds` times each, swapping which goes first every round (ABBA...);
    returns both lists of what they returned.

    A machine's speed drifts between rounds (an H100's clocks under full load by up to 10%, a
    shared CPU by more): pairing each round and swapping the order cancels that drift in a ratio.
    """
    a, b = [], []
    for i in range(rounds):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b
