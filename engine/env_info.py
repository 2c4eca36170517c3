"""The environment a result was produced in: device, cores and threads, torch, CUDA, FA3 provider."""

from __future__ import annotations

import os
import platform

import torch


def environment() -> dict[str, str]:
    """Plain strings describing this process's device and library versions."""
    from engine.flash_attention3 import PROVIDER

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        cuda = torch.version.cuda or "?"
    else:
        n = torch.get_num_threads()
        device = f"CPU ({platform.processor() or platform.machine()}, {n} thread{'s' if n != 1 else ''})"
        cuda = "none"
    fa3 = f"{PROVIDER.description} {PROVIDER.version or ''}".strip() if PROVIDER.available else "not available"
    # Cores this process may run on (a container or taskset can allow fewer than the machine has).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": device, "torch": torch.__version__, "cuda": cuda, "fa3": fa3,
            "python": platform.python_version(), "cores": str(cores),
            "threads": str(torch.get_num_threads())}
