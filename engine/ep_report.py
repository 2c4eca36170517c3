"""What an expert-parallel dispatch run reports: the slowest rank per phase, the median round,
text tables, and the device, date and library versions recorded with every result.

Pure torch and stdlib: the GPU box runs it without pandas or streamlit.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

# Timed on every rank, each against its plain all_to_all_single of the rows that cross ranks:
# (name, what it covers). Ratio = plain time / phase time on the slowest rank.
PHASES = {"dispatch": "counts + their exchange + rows placed by slot + rows to their experts",
          "combine": "rows back + weighted sum per token into (T, D)",
          "layer": "dispatch + experts + combine (plain: there and back)"}


def summarize(rows: list[dict]) -> dict:
    """One configuration: per phase the slowest rank's time, its plain exchange's slowest time and
    ratio = plain / phase (1 = as fast as the bare all_to_all_single; the target is dispatch's)."""
    out = {"tokens": rows[0]["tokens"], "chunks": rows[0]["chunks"],
           "lead_ms": rows[0].get("lead_ms", 0.0)}
    for name in PHASES:
        phase = max(r[f"{name}_ms"] for r in rows)
        plain = max(r[f"plain_{name}_ms"] for r in rows)
        out.update({f"{name}_ms": phase, f"plain_{name}_ms": plain, f"{name}_ratio": plain / phase})
    out["max_abs_err"] = max(r["max_abs_err"] for r in rows)
    out["overflow_share"] = max(r.get("overflow_share", 0.0) for r in rows)
    out["graph_share"] = min(r.get("graph_share", 0.0) for r in rows)
    return out


def median_round(rounds: list[dict]) -> dict:
    """The summary of the round with the median dispatch ratio (the lower middle one for an even
    count), with every round's dispatch ratio in `dispatch_ratio_rounds`.

    A round measures a configuration afresh. On the H100 machines measured the host of one rank at times
    ran about 1.8x slower for a whole round (every host step slower, the other ranks waiting in
    the host sync), which at 8k-16k tokens halved the round's dispatch ratio.
    """
    ranked = sorted(rounds, key=lambda r: r["dispatch_ratio"])
    return {**ranked[(len(ranked) - 1) // 2],
            "dispatch_ratio_rounds": [r["dispatch_ratio"] for r in rounds]}


def format_table(rows: list[dict], keys: list[str]) -> str:
    """Rows as a right-aligned text table of `keys` (floats to 4 significant digits)."""
    def fmt(v: object) -> str:
        if isinstance(v, list):
            return " ".join(map(fmt, v))
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [keys] + [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(keys))) for c in cells)


def environment(device: torch.device) -> dict:
    """Device, date and library versions recorded with every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    nccl = None
    if device.type == "cuda":
        v = torch.cuda.nccl.version()  # a tuple on recent torch, an int on old ones
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "python": platform.python_version()}
