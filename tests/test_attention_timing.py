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
