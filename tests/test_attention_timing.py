"""engine.timing's steady-clock timer: call counts by hand, the CPU path, NVML readings (faked)."""

import math
import sys
import types

import pytest
import torch

from engine import timing


@pytest.mark.parametrize("est, warm, reps, min_reps, want", [
    (1.0, 25.0, 100.0, 1, (25, 100)),  # do_bench's defaults at 1 ms per call
    (0.3, 25.0, 100.0, 1, (84, 334)),  # ceil(25 / 0.3), ceil(100 / 0.3)
    (40.0, 25.0, 100.0, 3, (1, 3)),  # slow call: one warm-up call, min_reps win over ceil(100 / 40) = 3
    (250.0, 25.0, 100.0, 3, (1, 3)),
    (0.0, 25.0, 100.0, 1, (timing.MAX_STEADY_REPS, timing.MAX_STEADY_REPS)),  # capped
])
def test_counts_cover_the_warm_up_and_the_window(est, warm, reps, min_reps, want):
    assert timing._counts(est, warm, reps, min_reps) == want


def test_steady_time_on_cpu_calls_estimate_warm_up_then_the_window(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "_counts", lambda est, w, r, m: (4, 7))
    t = timing.steady_time(lambda: calls.append(1), "cpu", warmup_ms=5, rep_ms=10, min_reps=2)
    # One estimating call, which also warms up, then 3 more warm-up calls, then 7 timed.
    assert len(calls) == 1 + 3 + 7 and t.reps == 7
    assert math.isnan(t.sm_mhz) and math.isnan(t.power_w)


def test_steady_time_refuses_bad_windows():
    with pytest.raises(ValueError, match="rep_ms must be >= 0.0"):
        timing.steady_time(lambda: None, "cpu", rep_ms=-1)
    with pytest.raises(ValueError, match="min_reps must be >= 1"):
        timing.steady_time(lambda: None, "cpu", min_reps=0)


class _Event:
    """Reports done after `pending` queries, like a CUDA event whose work is still queued."""

    def __init__(self, pending: int):
        self.pending = pending

    def query(self) -> bool:
        self.pending -= 1
        return self.pending < 0


def test_readings_are_sampled_until_the_window_ends(monkeypatch):
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    values = iter([(1980.0, 600.0), (1830.0, 690.0), (1755.0, 700.0)])
    assert timing._sample_until(_Event(2), lambda: next(values)) == [(1980.0, 600.0), (1830.0, 690.0),
                                                                    (1755.0, 700.0)]


def test_gpu_probe_reads_clock_and_power_through_nvml(monkeypatch):
    fake = types.ModuleType("pynvml")
    fake.NVML_CLOCK_SM = 1
    fake.NVMLError = RuntimeError
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByPciBusId = lambda bus: ("handle", bus)
    fake.nvmlDeviceGetClockInfo = lambda h, kind: 1755 if kind == 1 else 0
    fake.nvmlDeviceGetPowerUsage = lambda h: 612_500  # milliwatts
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(timing, "_NVML_HANDLES", {})
    probe = timing.gpu_probe(torch.device("cuda", 0))
    assert probe() == (1755.0, 612.5)
    assert timing._NVML_HANDLES[0] == ("handle", "00000000:1b:00.0")


def test_no_nvml_means_no_readings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(timing, "_NVML_HANDLES", {})
    assert timing.gpu_probe(torch.device("cuda", 3)) is None


class _FakeCudaEvent:
    """A CUDA event stand-in: done at once; elapsed time 10 ms per chunk recorded since `start`."""

    records = 0

    def __init__(self, enable_timing: bool = False):
        pass

    def record(self) -> None:
        _FakeCudaEvent.records += 1

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end) -> float:
        return 10.0 * (_FakeCudaEvent.records - 1)


@pytest.mark.parametrize("clocks, max_ms, chunks", [
    # Falling 1980 -> 1750, then level: stops at the first chunk not below the one two before.
    ([1980, 1900, 1800, 1750, 1750, 1755, 1700, 1600], 1000.0, 6),
    ([1980, 1980, 1980, 1900], 1000.0, 3),  # level from the start: the three-chunk minimum
    ([1980, 1965, 1950, 1935, 1920, 1905, 1890, 1875, 1860], 80.0, 8),  # one step per chunk is a trend: to the cap
    ([1980, 1900, 1800, 1700, 1600, 1500], 30.0, 3),  # still falling at the cap: stops there
])
def test_settle_warms_up_until_the_clock_stops_falling(monkeypatch, clocks, max_ms, chunks):
    monkeypatch.setattr(timing.torch.cuda, "Event", _FakeCudaEvent)
    monkeypatch.setattr(_FakeCudaEvent, "records", 0)
    readings = iter([(float(c), 700.0) for c in clocks])
    calls = []
    spent = timing._settle(lambda: calls.append(1), torch.device("cuda"), 2, lambda: next(readings), max_ms)
    assert len(calls) == 2 * chunks and spent == 10.0 * chunks


def test_settle_without_clock_readings_stops_after_one_chunk(monkeypatch):
    monkeypatch.setattr(timing.torch.cuda, "Event", _FakeCudaEvent)
    monkeypatch.setattr(_FakeCudaEvent, "records", 0)
    calls = []
    timing._settle(lambda: calls.append(1), torch.device("cuda"), 3, lambda: (math.nan, math.nan), 1000.0)
    assert len(calls) == 3


def test_combined_takes_the_median_of_each_field_and_sums_reps():
    a = timing.Timing(1.0, 0.9, 1.2, 10, 1800.0, 650.0, 0.3, 75.0)
    b = timing.Timing(1.4, 1.1, 1.6, 12, 1700.0, math.nan, 0.5, 100.0)
    c = timing.Timing(1.2, 1.0, 1.3, 11, 1750.0, 660.0, 0.4, 125.0)
    assert timing.combined([a, b, c]) == timing.Timing(1.2, 1.0, 1.3, 33, 1750.0, 655.0, 0.4, 100.0)
    assert timing.combined([a, b]).median_ms == pytest.approx(1.2)
    with pytest.raises(ValueError, match="windows"):
        timing.combined([])
