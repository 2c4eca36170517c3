"""Attention kernels side by side: FA4, FA3, FA2, each SDPA backend, FlexAttention, over sweeps.

Every row times one backend on one shape at steady clocks (engine.timing.steady_time: warm-up for
a time, a window of >= 100 ms, SM clock and power sampled), counts FLOPs as in
engine.attention_shapes, and checks the output (and, forward+backward, dq) against an fp32
reference on a slice. First-call time (kernel compilation, autotuning) is reported apart. A row
that cannot run (backend missing, out of memory, no kernel for the shape) says why; the sweep goes on.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace  # noqa: F401 (replace: for callers)
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from engine import flash_attention3 as fa
from engine.attention_backends import (backend_unavailable, make_inputs, output_slice, reference,
                                       runner)
from engine.attention_masks import mask_unfit
from engine.attention_shapes import (DTYPES, PRESETS, Shape, SweepSettings, attention_flops,  # noqa: F401
                                     describe, input_bytes, mask_bytes, math_bytes, settings_for, shape_flops,
                                     shapes_of)
from engine.env_info import environment
from engine.timing import Timing, alternating, combined, steady_time
from engine.validation import MAX_BYTES, check_bytes

Progress = Callable[[int, int, str], None]
CrossCheck = Callable[[Callable[[], object]], float]

@dataclass
class SweepResult:
    """The rows, per-shape speed-up tables, and the environment they were measured in."""

    table: pd.DataFrame
    env: dict[str, str]
    matmul_tflops: dict[str, float]  # dtype -> TFLOP/s of a large matmul in the same run
    elapsed_s: float
    settings: dict[str, Any]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def speedups(self, kernel: str = "fa3") -> pd.DataFrame:
        """`kernel` over the fastest SDPA backend, per shape (empty when it has no timed rows)."""
        return speedup_table(self.table, kernel)

    def to_json(self) -> str:
        """One JSON document holding everything (rows as records)."""
        doc = {"created": self.created, "env": self.env, "matmul_tflops": self.matmul_tflops,
               "elapsed_s": self.elapsed_s, "settings": self.settings,
               "rows": json.loads(self.table.to_json(orient="records"))}
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SweepResult":
        """Read a document written by to_json."""
        doc = json.loads(text)
        table = pd.DataFrame(doc["rows"]).reindex(columns=COLUMNS)  # older documents lack later columns
        table["mask"] = table["mask"].fillna("none")
        table["note"] = table["note"].fillna("")
        table = table.astype({c: float for c in FLOAT_COLUMNS})
        ceiling = doc["matmul_tflops"]
        if not isinstance(ceiling, dict):  # documents from before per-dtype ceilings: one, at the first dtype
            ceiling = {doc["settings"]["dtypes"][0]: ceiling}
        settings = dict(doc["settings"])
        if "cross_rounds" in settings:  # documents from before the field's rename
            settings["windows"] = settings.pop("cross_rounds")
        return cls(table, doc["env"], ceiling, doc["elapsed_s"], settings, doc["created"])


KEYS = ["dtype", "head_dim", "causal", "mask", "batch", "seqlen", "heads", "kv_heads"]
FLOAT_COLUMNS = ("ms", "p10_ms", "p90_ms", "tflops", "frac_matmul", "peak_extra_mib", "rel_err", "dq_err",
                 "first_call_s", "sm_mhz", "power_w", "host_ms", "warmup_ms", "do_bench_ms", "vs_do_bench_pct",
                 "window_range_pct")
COLUMNS = [*KEYS, "backend", "status", *FLOAT_COLUMNS, "note"]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a ValueError."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device must be cpu or auto: no CUDA GPU here")
    return torch.device(device)


def memory_budget(device: torch.device) -> int:
    """Bytes a sweep may use: 90% of free GPU memory, or the engine's CPU budget."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    return MAX_BYTES


def sweep_environment() -> dict[str, str]:
    """engine.env_info's environment plus the FA4 build and triton version."""
    env = environment()
    env["fa4"] = f"{fa.FA4.description} {fa.FA4.version or ''}".strip() if fa._HAS_FLASH4 else "not available"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    return env


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def matmul_ceiling(device: torch.device, dtype: str, seed: int = 0) -> float:
    """TFLOP/s of one large square matmul at `dtype` on `device` (8192 on GPU, 512 on CPU), steady clocks."""
    n = 8192 if device.type == "cuda" else 512
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(n, n, generator=gen, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, generator=gen, device=device, dtype=DTYPES[dtype])
    t = steady_time(lambda: a @ b, device, rep_ms=100.0 if device.type == "cuda" else 20.0)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def _row(shape: Shape, backend: str, status: str, note: str = "", **vals: float) -> dict[str, Any]:
    row = {**asdict(shape), "backend": backend, "status": status, "note": note}
    for col in FLOAT_COLUMNS:
        row[col] = vals.get(col, math.nan)
    return row


def _peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB one call of `fn` allocates at its peak beyond what was allocated before (NaN off CUDA)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_row(shape: Shape, backend: str, t: dict[str, torch.Tensor], s: SweepSettings,
              device: torch.device, ceiling: dict[str, float], crosscheck: CrossCheck | None,
              refs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One backend's row; `refs` keeps the shape's fp32 forward reference across its backends."""
    fn, bhsd = runner(backend, t, shape)
    grad = s.mode == "fwd+bwd"
    with torch.set_grad_enabled(grad):
        start = time.perf_counter()
        out = fn()  # compiles / autotunes where a backend does: reported apart, never timed
        if grad:
            wrt = tuple(t[n + ("_bhsd" if bhsd else "")] for n in ("q", "k", "v"))
            dout = torch.randn_like(out)
            dq = torch.autograd.grad(out, wrt, dout)[0]
        _sync(device)
        first = time.perf_counter() - start
        note = "attention(): " + fa.choose_path(t["q"], t["k"], t["v"]).reason if backend == "wrapper" else ""
        if grad:  # dq's reference depends on this row's dout
            ref, dq_ref = reference(t, shape, output_slice(dout, shape, bhsd))
        else:
            if "out" not in refs:
                refs["out"] = reference(t, shape)[0]
            ref = refs["out"]
        err = _rel_err(output_slice(out, shape, bhsd), ref)
        dq_err = _rel_err(output_slice(dq, shape, bhsd), dq_ref) if grad else math.nan
        if grad:
            def timed() -> None:
                torch.autograd.grad(fn(), wrt, dout)
        else:
            timed = fn
        del out
        peak = _peak_extra_mib(timed, device)
        timing, checked, noise = _timed(timed, device, s, crosscheck)
    tflops = shape_flops(shape, s.mode, s.seed) / (timing.median_ms * 1e-3) / 1e12
    return _row(shape, backend, "ok", note, ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                tflops=tflops, frac_matmul=tflops / ceiling[shape.dtype], peak_extra_mib=peak, rel_err=err,
                dq_err=dq_err, first_call_s=max(0.0, first - timing.median_ms / 1e3), sm_mhz=timing.sm_mhz,
                power_w=timing.power_w, host_ms=timing.host_ms, warmup_ms=timing.warmup_ms, do_bench_ms=checked,
                vs_do_bench_pct=100 * (timing.median_ms / checked - 1), window_range_pct=noise)


def window_ms(s: SweepSettings, device: torch.device) -> tuple[float, float]:
    """(warm-up, window) in ms as rows are timed: on a GPU never less than do_bench's 25 ms warm-up
    and 100 ms window, as shorter ones read the boost clocks."""
    if device.type == "cuda":
        return max(s.warmup_ms, 25.0), max(s.rep_ms, 100.0)
    return s.warmup_ms, s.rep_ms


def _timed(timed: Callable[[], object], device: torch.device, s: SweepSettings, crosscheck: CrossCheck | None
           ) -> tuple[Timing, float, float]:
    """The row's timing: the median of `s.windows` windows (the first settles the clock; the others
    follow without a pause); with `crosscheck`, as many of do_bench's, alternating, their median,
    and the window-to-window range (percent; with a cross-check the larger of the two timers')."""
    # ABBA order: a drift between windows (clocks, a host's pace) cancels in the comparison, and one
    # noisy window moves a median of several less than it moves a single window.
    warm, window = window_ms(s, device)
    done: list[Timing] = []

    def ours() -> Timing:
        done.append(steady_time(timed, device, warm, window, s.min_reps, settle=not done))
        return done[-1]

    if crosscheck is None:
        windows, theirs = [ours() for _ in range(s.windows)], []
    else:
        windows, theirs = alternating(ours, lambda: crosscheck(timed), s.windows)
    noise = max((max(x) - min(x)) / statistics.median(x) for x in ([w.median_ms for w in windows], theirs) if x)
    return combined(windows), statistics.median(theirs) if theirs else math.nan, 100 * noise


def _time_shape(shape: Shape, backends: list[str], s: SweepSettings, device: torch.device, ceiling: dict[str, float],
                rows: dict[str, dict[str, Any]], progress: Progress | None, done: int, total: int,
                crosscheck: CrossCheck | None) -> None:
    """Time `backends` on one shape's inputs into `rows`; an OOM or a missing kernel fails one row only."""
    try:
        t = make_inputs(shape, device, s.seed, backends, s.mode == "fwd+bwd")
    except torch.OutOfMemoryError as exc:
        rows.update({b: _row(shape, b, "OOM", "inputs: " + str(exc).splitlines()[0][:200]) for b in backends})
        return
    refs: dict[str, torch.Tensor] = {}
    for i, b in enumerate(backends):
        if progress:  # may raise to stop the sweep (a closed page, Ctrl-C): nothing below catches that
            progress(done + i, total, f"{b}: S={shape.seqlen} D={shape.head_dim} "
                                      f"{shape.mask if shape.mask != 'none' else 'causal' if shape.causal else ''}")
        try:
            rows[b] = _time_row(shape, b, t, s, device, ceiling, crosscheck, refs)
        except torch.OutOfMemoryError as exc:
            rows[b] = _row(shape, b, "OOM", str(exc).splitlines()[0][:200])
        except Exception as exc:  # noqa: BLE001 - no kernel for this shape, a compile failure: one row only
            rows[b] = _row(shape, b, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def why_skip(shape: Shape, b: str, s: SweepSettings, device: torch.device, budget: int) -> str | None:
    """Why backend `b` will not run on `shape` here (missing, mask unfit, over `budget` bytes), or None."""
    why = backend_unavailable(b, device, shape.dtype, shape.mask) or mask_unfit(shape.mask, shape.seqlen)
    if why is None and s.mode == "fwd+bwd" and b == "fa3" and fa.PROVIDER.module == "fa3_fwd_interface":
        why = "fa3-fwd is forward only"
    room = budget - input_bytes(shape, s.backends)
    if why is None and b == "sdpa-math" and math_bytes(shape, s.mode) + mask_bytes(shape) > room:
        why = f"skipped: math would need {(math_bytes(shape, s.mode) + mask_bytes(shape)) / 2**30:.1f} GiB for scores"
    if why is None and b.startswith("sdpa") and mask_bytes(shape) > room:
        why = f"skipped: the explicit mask would need {mask_bytes(shape) / 2**30:.1f} GiB"
    return why


def run_sweep(s: SweepSettings, progress: Progress | None = None, crosscheck: CrossCheck | None = None
              ) -> SweepResult:
    """Time every backend on every shape of `s`; rows that fail say why. Refuses oversize sweeps.

    `progress(done, total, label)` is called before each row; whatever it raises stops the sweep.
    `crosscheck(fn)` (e.g. triton's do_bench) times each row's own callable again for comparison.
    """
    shapes = shapes_of(s)
    device = resolve_device(s.device)
    budget = memory_budget(device)
    biggest = max(shapes, key=lambda sh: input_bytes(sh, s.backends))
    # Twice the inputs: room for gradients (fwd+bwd) and the backends' own workspaces.
    check_bytes("the largest shape's inputs", 2 * input_bytes(biggest, s.backends), budget)
    start = time.perf_counter()
    ceiling = {dt: matmul_ceiling(device, dt, s.seed) for dt in s.dtypes}
    rows: list[dict[str, Any]] = []
    total, done = len(shapes) * len(s.backends), 0
    for shape in shapes:
        by_backend: dict[str, dict[str, Any]] = {}
        runnable = []
        for b in s.backends:
            why = why_skip(shape, b, s, device, budget)
            if why is None:
                runnable.append(b)
            else:
                by_backend[b] = _row(shape, b, "skipped" if why.startswith("skipped") else "unavailable", why)
                done += 1
        if runnable:
            _time_shape(shape, runnable, s, device, ceiling, by_backend, progress, done, total, crosscheck)
            done += len(runnable)
        rows.extend(by_backend[b] for b in s.backends)
    if progress:
        progress(total, total, "done")
    table = pd.DataFrame(rows, columns=COLUMNS)
    settings = describe(s)
    settings["device"] = str(device)
    return SweepResult(table, sweep_environment(), ceiling, time.perf_counter() - start, settings)


def speedup_table(table: pd.DataFrame, kernel: str = "fa3") -> pd.DataFrame:
    """Per shape: `kernel`'s TFLOP/s, the fastest timed SDPA backend, and the speed-up (ratio of ms)."""
    keys = [k for k in KEYS if k in table.columns]
    ok = table[table["status"] == "ok"]
    mine = ok[ok["backend"] == kernel].set_index(keys)
    sdpa = ok[ok["backend"].str.startswith("sdpa") & (ok["backend"] != "sdpa-fa4")]
    col = f"{kernel}_tflops"
    if mine.empty or sdpa.empty:
        return pd.DataFrame(columns=[*keys, col, "best_sdpa", "best_sdpa_tflops", "speedup"])
    best = sdpa.loc[sdpa.groupby(keys)["ms"].idxmin()].set_index(keys)
    best = best[["backend", "ms", "tflops"]].rename(columns={"ms": "sdpa_ms", "tflops": "best_sdpa_tflops",
                                                             "backend": "best_sdpa"})
    joined = mine[["ms", "tflops"]].rename(columns={"tflops": col}).join(best, how="inner")
    joined["speedup"] = joined["sdpa_ms"] / joined["ms"]
    return joined[[col, "best_sdpa", "best_sdpa_tflops", "speedup"]].reset_index()


RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def committed_results(directory: Path = RESULTS_DIR) -> dict[str, Path]:
    """Committed sweep documents (benchmarks/results/attention_sweep_*.json), newest name first."""
    return {p.stem: p for p in sorted(directory.glob("attention_sweep_*.json"), reverse=True)}


def load_result(path: Path | str) -> SweepResult:
    """Read one committed sweep document."""
    return SweepResult.from_json(Path(path).read_text())
