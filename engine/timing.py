"""Wall-clock timing of a callable, the same way on CPU and CUDA.

CUDA: CUDA events around each call, warm-up first, L2 flushed between repetitions (a write to a
buffer larger than L2) so every repetition reads its inputs from HBM, as in a real model step.
CPU: perf_counter after warm-up. Both report the median and the spread.

`steady_time` is the one for reported GPU figures: like triton.testing.do_bench it warms up for a
time (25 ms) and times a window of at least 100 ms, so it reads the clocks a GPU settles at under
sustained load, not its first-milliseconds boost (7-13% faster on an H200 for compute-bound
kernels). Where NVML answers it samples the SM clock and board power during the window and, with
`settle=True`, goes on warming up while the SM clock still falls: a 12-17 ms call heats an H200
for longer than 25 ms, and a window timed while its clock still fell read 4-7% fast.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch

from engine.validation import check_float, check_int

A = TypeVar("A")
B = TypeVar("B")
# Larger than the L2 of current GPUs (H100 and H200: 50 MB; B200: 126 MB).
_L2_FLUSH_BYTES = 256 * 2**20
MAX_STEADY_REPS = 100_000


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 10th and 90th percentile, over `reps` repetitions.

    sm_mhz / power_w: median SM clock (MHz) and board power (W) sampled during the timed window,
    NaN where the device does not report them (CPU, no NVML). host_ms: host time per call spent
    queueing the window (CUDA); near median_ms or above it, the host, not the GPU, set the pace.
    warmup_ms: device time spent warming up before the window (NaN where not measured).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int
    sm_mhz: float = math.nan
    power_w: float = math.nan
    host_ms: float = math.nan
    warmup_ms: float = math.nan

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread of the repetitions."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0


def summarize(samples: list[float], sm_mhz: float = math.nan, power_w: float = math.nan,
              host_ms: float = math.nan) -> Timing:
    """Timing of per-call samples (ms): median, p10, p90 and count, plus what was sampled beside."""
    s = sorted(samples)
    n = len(s)
    return Timing(statistics.median(s), s[int(0.1 * (n - 1))], s[int(round(0.9 * (n - 1)))], n, sm_mhz, power_w,
                  host_ms)


def _median_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def combined(windows: list[Timing]) -> Timing:
    """One Timing for several windows of the same call: the median of each field across them."""
    if not windows:
        raise ValueError("windows must not be empty")
    return Timing(*(_median_finite([getattr(w, f) for w in windows])
                    for f in ("median_ms", "p10_ms", "p90_ms")), sum(w.reps for w in windows),
                  *(_median_finite([getattr(w, f) for w in windows]) for f in ("sm_mhz", "power_w", "host_ms",
                                                                               "warmup_ms")))


def time_fn(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 3,
            reps: int = 10, flush_l2: bool = True, min_total_s: float = 0.0,
            lead: Callable[[], object] | None = None) -> Timing:
    """Time `fn()` on `device` for a count of calls; returns milliseconds per call (median, spread).

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
    return summarize(samples)


def _time_cuda(fn: Callable[[], object], dev: torch.device, warmup: int, reps: int,
               flush_l2: bool, lead: Callable[[], object] | None,
               probe: Callable[[], tuple[float, float]] | None = None) -> Timing:
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=dev) if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(dev)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    host0 = time.perf_counter()
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        if lead is not None:
            lead()
        starts[i].record()
        fn()
        ends[i].record()
    host_ms = (time.perf_counter() - host0) * 1e3 / reps
    readings = _sample_until(ends[-1], probe) if probe is not None else []
    torch.cuda.synchronize(dev)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)],
                    _median_finite([r[0] for r in readings]), _median_finite([r[1] for r in readings]), host_ms)


def _settle(fn: Callable[[], object], dev: torch.device, chunk: int, probe: Callable[[], tuple[float, float]],
            max_ms: float) -> float:
    """Warm up in chunks of `chunk` calls until the SM clock stops falling; returns the ms spent.

    Stops when a chunk's median clock is not below that of the chunk two before (about 2 x
    warm-up apart: one 15 MHz NVML step per chunk is within reading noise, two are a trend), or
    after `max_ms` of device time.
    """
    clocks: list[float] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(chunk):
            fn()
        end.record()
        clocks.append(_median_finite([r[0] for r in _sample_until(end, probe)]))
        end.synchronize()
        spent = start.elapsed_time(end)
        if not math.isfinite(clocks[-1]) or spent >= max_ms:
            return spent
        if len(clocks) >= 3 and clocks[-1] >= clocks[-3]:
            return spent


def _sample_until(done: torch.cuda.Event, probe: Callable[[], tuple[float, float]]) -> list[tuple[float, float]]:
    """Read (SM MHz, W) every ~5 ms while the queued window runs; at least once."""
    readings = [probe()]
    while not done.query() and len(readings) < 10_000:
        time.sleep(0.005)
        readings.append(probe())
    return readings


def steady_time(fn: Callable[[], object], device: str | torch.device = "cpu", warmup_ms: float = 25.0,
                rep_ms: float = 100.0, min_reps: int = 1, flush_l2: bool = True, settle: bool = True,
                max_warmup_ms: float = 2000.0) -> Timing:
    """Time `fn()` at steady clocks: warm up for `warmup_ms`, then time a window of >= `rep_ms`.

    The call count comes from a first estimate of one call (five calls, as do_bench does), so the
    window lasts at least `rep_ms` of device time whatever the call costs; at least `min_reps`
    calls are timed. `settle` (CUDA with NVML): keep warming up, in chunks of `warmup_ms`, until
    the sampled SM clock stops falling (at most `max_warmup_ms`). Returns per-call milliseconds
    (median, p10, p90) and, on CUDA with NVML, the SM clock and power sampled while the window ran.
    """
    warmup_ms = check_float("warmup_ms", warmup_ms, 0.0, 60_000.0)
    rep_ms = check_float("rep_ms", rep_ms, 0.0, 600_000.0)
    min_reps = check_int("min_reps", min_reps, 1, MAX_STEADY_REPS)
    max_warmup_ms = check_float("max_warmup_ms", max_warmup_ms, 0.0, 600_000.0)
    dev = torch.device(device)
    if dev.type == "cuda":
        est = _time_cuda(fn, dev, 0, 5, flush_l2, None).median_ms
        warm, reps = _counts(est, warmup_ms, rep_ms, min_reps)
        probe = gpu_probe(dev)
        if not settle or probe is None:
            return _time_cuda(fn, dev, warm, reps, flush_l2, None, probe)
        spent = _settle(fn, dev, warm, probe, max(warmup_ms, max_warmup_ms))
        return replace(_time_cuda(fn, dev, 0, reps, flush_l2, None, probe), warmup_ms=spent)
    t0 = time.perf_counter()
    fn()
    est = (time.perf_counter() - t0) * 1e3
    warm, reps = _counts(est, warmup_ms, rep_ms, min_reps)
    return time_fn(fn, dev, warmup=max(0, warm - 1), reps=reps)


def _counts(est_ms: float, warmup_ms: float, rep_ms: float, min_reps: int) -> tuple[int, int]:
    """Warm-up and timed call counts covering `warmup_ms` and `rep_ms` at `est_ms` per call."""
    est_ms = max(est_ms, 1e-4)
    warm = max(1, math.ceil(warmup_ms / est_ms))
    reps = max(min_reps, math.ceil(rep_ms / est_ms))
    return min(warm, MAX_STEADY_REPS), min(reps, MAX_STEADY_REPS)


def gpu_probe(device: torch.device) -> Callable[[], tuple[float, float]] | None:
    """A callable reading (SM clock MHz, board power W) of `device` through NVML, or None."""
    handle = _nvml_handle(device.index if device.index is not None else torch.cuda.current_device())
    if handle is None:
        return None
    import pynvml

    def read() -> tuple[float, float]:
        try:
            return (float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                    pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
        except pynvml.NVMLError:
            return math.nan, math.nan

    return read


_NVML_HANDLES: dict[int, object] = {}


def _nvml_handle(index: int) -> object | None:
    """NVML's handle for torch's CUDA device `index` (matched by PCI bus id), None without NVML."""
    if index in _NVML_HANDLES:
        return _NVML_HANDLES[index]
    handle = None
    try:
        import pynvml  # the nvidia-ml-py package

        pynvml.nvmlInit()
        p = torch.cuda.get_device_properties(index)
        try:
            bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except (AttributeError, pynvml.NVMLError):  # a torch without PCI ids: NVML's own order
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - no nvidia-ml-py, no driver library, or an old torch: no readings
        handle = None
    _NVML_HANDLES[index] = handle
    return handle


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


def alternating(first: Callable[[], A], second: Callable[[], B], rounds: int) -> tuple[list[A], list[B]]:
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
