"""Attention kernels side by side: FA3, FA2, each SDPA backend, FlexAttention, over shape sweeps.

Every row times one backend on one shape with engine.timing (CUDA events with L2 flush, or CPU
perf_counter), counts FLOPs as 4 * B * H * S_q * S_k * D (halved when causal; backward 2.5x
forward), and checks the output against an fp32 SDPA-math reference on a slice. A row that cannot
run (backend missing, out of memory, no kernel for the shape) says why and the sweep goes on.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import flash_attention3 as fa
from engine.env_info import environment
from engine.timing import time_fn
from engine.validation import MAX_BYTES, check_bytes, check_choice, check_int

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
# "wrapper" is engine.flash_attention3.attention() itself, to show what the dispatch costs.
BACKENDS = ("fa3", "fa2", *SDPA_BACKENDS, "flex", "wrapper")
MODES = ("fwd", "fwd+bwd")
BWD_FACTOR = 2.5  # backward FLOPs over forward FLOPs (two matmuls forward, five backward)
REF_ROWS = 1024  # query rows of the fp32 reference slice


@dataclass(frozen=True)
class SweepSettings:
    """One sweep: every combination of dtype x head dim x GQA ratio x causal x seqlen, each backend.

    Shapes follow the FA3 paper: batch = tokens // seqlen, heads = hidden // head_dim,
    kv heads = heads // gqa.
    """

    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...] = (128,)
    causal: tuple[bool, ...] = (False,)
    gqa: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("bf16",)
    tokens: int = 16384
    hidden: int = 2048
    backends: tuple[str, ...] = ("fa3", "fa2", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
    mode: str = "fwd"
    warmup: int = 3
    reps: int = 10
    seed: int = 0
    device: str = "auto"


PRESETS: dict[str, SweepSettings] = {
    # FA3 paper (Shah et al. 2024, fig. 5/6): 16k tokens, hidden 2048, head dim 64/128/256.
    "fa3-paper": SweepSettings(seqlens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128, 256),
                               causal=(False, True)),
    # A few seconds on a CPU (fp32: CPU attention has no fast bf16 path); same code as the paper sweep.
    "quick": SweepSettings(seqlens=(128, 256, 512), head_dims=(64,), causal=(False, True), dtypes=("fp32",),
                           tokens=1024, hidden=256, reps=3, warmup=1),
    # Grouped-query attention at head dim 128: 1, 4 and 8 query heads per kv head.
    "gqa": SweepSettings(seqlens=(1024, 4096, 16384), gqa=(1, 4, 8), causal=(False, True)),
}


@dataclass(frozen=True)
class Shape:
    """One attention problem; tensors are (B, S, H, D) for FA3 and (B, H, S, D) for SDPA."""

    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    dtype: str


@dataclass
class SweepResult:
    """The rows, a per-shape FA3 speed-up table, and the environment they were measured in."""

    table: pd.DataFrame
    env: dict[str, str]
    matmul_tflops: dict[str, float]  # dtype -> TFLOP/s of a large matmul in the same run
    elapsed_s: float
    settings: dict[str, Any]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def speedups(self) -> pd.DataFrame:
        """FA3 over the fastest SDPA backend, per shape (empty when FA3 has no timed rows)."""
        return speedup_table(self.table)

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
        table = pd.DataFrame(doc["rows"], columns=COLUMNS).astype({c: float for c in FLOAT_COLUMNS})
        ceiling = doc["matmul_tflops"]
        if not isinstance(ceiling, dict):  # documents from before per-dtype ceilings: one, at the first dtype
            ceiling = {doc["settings"]["dtypes"][0]: ceiling}
        return cls(table, doc["env"], ceiling, doc["elapsed_s"], doc["settings"], doc["created"])


COLUMNS = ["dtype", "head_dim", "causal", "batch", "seqlen", "heads", "kv_heads", "backend", "status",
           "ms", "p10_ms", "p90_ms", "tflops", "frac_matmul", "peak_extra_mib", "rel_err", "note"]
FLOAT_COLUMNS = ("ms", "p10_ms", "p90_ms", "tflops", "frac_matmul", "peak_extra_mib", "rel_err")


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs of attention: 4*B*H*S_q*S_k*D forward (QK^T and PV), halved if causal; bwd is 2.5x fwd."""
    check_choice("mode", mode, MODES)
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return fwd * (1 + BWD_FACTOR) if mode == "fwd+bwd" else fwd


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a ValueError."""
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device must be cpu or auto: no CUDA GPU here")
    return torch.device(device)


def shapes_of(s: SweepSettings) -> list[Shape]:
    """Validate the settings and list the shapes in sweep order; ValueError names the bad field."""
    if not s.seqlens or not s.head_dims or not s.causal or not s.gqa or not s.dtypes or not s.backends:
        raise ValueError("seqlens, head_dims, causal, gqa, dtypes and backends must each be non-empty")
    tokens = check_int("tokens", s.tokens, 1, 2**22)
    hidden = check_int("hidden", s.hidden, 8, 65536)
    for b in s.backends:
        check_choice("backend", b, BACKENDS)
    if len(set(s.backends)) != len(s.backends):
        raise ValueError(f"backends must not repeat, got {', '.join(s.backends)}")
    check_choice("mode", s.mode, MODES)
    check_int("reps", s.reps, 1, 1000)
    check_int("warmup", s.warmup, 0, 100)
    out = []
    for dtype, d, g, causal, seqlen in itertools.product(s.dtypes, s.head_dims, s.gqa, s.causal, s.seqlens):
        check_choice("dtype", dtype, tuple(DTYPES))
        check_int("seqlen", seqlen, 16, 131072)
        check_int("head_dim", d, 8, 256)
        if d % 8 or hidden % d:
            raise ValueError(f"head_dim must be a multiple of 8 dividing hidden ({hidden}), got {d}")
        heads = hidden // d
        check_int("gqa", g, 1, heads)
        if heads % g:
            raise ValueError(f"gqa must divide the head count ({heads} = hidden / head_dim), got {g}")
        out.append(Shape(max(1, tokens // seqlen), seqlen, heads, heads // g, d, bool(causal), dtype))
    return out


def input_bytes(shape: Shape, backends: tuple[str, ...]) -> int:
    """Bytes of q, k, v and one output, in (B, S, H, D) and, for SDPA/Flex backends, (B, H, S, D)."""
    elt = DTYPES[shape.dtype].itemsize
    one = shape.batch * shape.seqlen * shape.head_dim * elt * (2 * shape.heads + 2 * shape.kv_heads)
    bhsd = any(b.startswith("sdpa") or b == "flex" for b in backends)
    return one * (2 if bhsd else 1)


def math_bytes(shape: Shape, mode: str) -> int:
    """Bytes SDPA-math materialises: (B, H, S, S) scores, probabilities and temporaries, and the mask.

    12 bytes per score element forward (measured on an H100: 8.7 at bf16), 16 with backward.
    """
    s2 = shape.batch * shape.heads * shape.seqlen**2
    return (4 if mode == "fwd+bwd" else 3) * s2 * 4 + shape.seqlen**2


def memory_budget(device: torch.device) -> int:
    """Bytes a sweep may use: 90% of free GPU memory, or the engine's CPU budget."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    return MAX_BYTES


def backend_unavailable(backend: str, device: torch.device, dtype: str) -> str | None:
    """Why `backend` cannot run on `device` at `dtype`, or None when it can."""
    cuda = device.type == "cuda"
    if backend == "fa3":
        if not fa._HAS_FLASH3:
            return "FA3 not installed"
        if not cuda or fa.device_capability(device) != (9, 0):
            return "FA3 needs a Hopper (sm_90) GPU"
        if DTYPES[dtype] not in fa.fa3_dtypes():
            return f"{fa.PROVIDER.module} has no {dtype} kernels"
    if backend == "fa2":
        if not fa.FA2.available:
            return "flash-attn (FA2) not installed"
        if not cuda or fa.device_capability(device) < (8, 0) or dtype == "fp32":
            return "FA2 needs an sm_80+ GPU and fp16/bf16"
    if backend in ("sdpa-efficient", "sdpa-cudnn") and not cuda:
        return "CUDA only"
    if backend == "flex":
        if not fa.HAS_FLEX:
            return fa.FLEX_REASON
        if not cuda:
            return "CPU: FlexAttention needs torch.compile (~30 s per shape here); GPU only"
    return None


def _make_inputs(shape: Shape, device: torch.device, seed: int, need_bhsd: bool, grad: bool
                 ) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[shape.dtype]
    b, s, d = shape.batch, shape.seqlen, shape.head_dim
    t = {n: torch.randn(b, s, h, d, generator=gen, device=device, dtype=dt)
         for n, h in (("q", shape.heads), ("k", shape.kv_heads), ("v", shape.kv_heads))}
    if need_bhsd:  # SDPA's own layout, contiguous, so no backend is timed on a transposed view
        t.update({f"{n}_bhsd": t[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")})
    if grad:
        for x in t.values():
            x.requires_grad_(True)
    return t


def _reference(t: dict[str, torch.Tensor], shape: Shape) -> torch.Tensor:
    """fp32 SDPA-math output for batch 0, kv head 0's query heads, the last REF_ROWS queries.

    Returns (rows, group, D) in bshd order. With S_q == S_k the causal mask keeps key j for query
    i iff j <= i, so the last rows of a causal slice see keys 0 .. S - rows + i.
    """
    g = shape.heads // shape.kv_heads
    rows = min(REF_ROWS, shape.seqlen)
    q = t["q"].detach()[0, -rows:, :g].float().transpose(0, 1)  # (g, rows, D)
    k = t["k"].detach()[0, :, :1].float().transpose(0, 1)  # (1, S, D)
    v = t["v"].detach()[0, :, :1].float().transpose(0, 1)
    mask = None
    if shape.causal:
        mask = torch.ones(rows, shape.seqlen, dtype=torch.bool, device=q.device).tril(shape.seqlen - rows)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k.expand(g, -1, -1), v.expand(g, -1, -1), attn_mask=mask)
    return ref.transpose(0, 1)


def _slice_bshd(out: torch.Tensor, shape: Shape, bhsd: bool) -> torch.Tensor:
    g, rows = shape.heads // shape.kv_heads, min(REF_ROWS, shape.seqlen)
    if bhsd:
        out = out.transpose(1, 2)
    return out.detach()[0, -rows:, :g].float()


def _runner(backend: str, t: dict[str, torch.Tensor], shape: Shape) -> tuple[Callable[[], torch.Tensor], bool]:
    """A zero-argument call of `backend` on the inputs, and whether its output is (B, H, S, D)."""
    c = shape.causal
    if backend == "fa3":
        return lambda: fa.fa3_call(t["q"], t["k"], t["v"], c), False
    if backend == "fa2":
        return lambda: fa.fa2_call(t["q"], t["k"], t["v"], c), False
    if backend == "wrapper":
        return lambda: fa.attention(t["q"], t["k"], t["v"], c), False
    q, k, v = t["q_bhsd"], t["k_bhsd"], t["v_bhsd"]
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if c:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, shape.seqlen, shape.seqlen,
                                     device=q.device)
        gqa = shape.heads != shape.kv_heads
        return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=gqa), True
    kind = SDPA_BACKENDS[backend]

    def run() -> torch.Tensor:
        with sdpa_kernel(kind):
            return fa.sdpa_call(q, k, v, c)

    return run, True


def _with_backward(fn: Callable[[], torch.Tensor], grad_out: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        out = fn()
        out.backward(grad_out)
        return out

    return run


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def matmul_ceiling(device: torch.device, dtype: str, seed: int = 0) -> float:
    """TFLOP/s of one large square matmul at `dtype` on `device` (8192 on GPU, 512 on CPU)."""
    n = 8192 if device.type == "cuda" else 512
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(n, n, generator=gen, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, generator=gen, device=device, dtype=DTYPES[dtype])
    t = time_fn(lambda: a @ b, device, warmup=3, reps=10 if device.type == "cuda" else 3)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def _row(shape: Shape, backend: str, status: str, note: str = "", **vals: float) -> dict[str, Any]:
    row = {**asdict(shape), "backend": backend, "status": status, "note": note}
    for col in FLOAT_COLUMNS:
        row[col] = vals.get(col, math.nan)
    return row


def _peak_extra_mib(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """MiB one call of `fn` allocates at its peak beyond what was allocated before (NaN off CUDA)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _time_row(shape: Shape, backend: str, t: dict[str, torch.Tensor], ref: torch.Tensor,
              s: SweepSettings, device: torch.device, ceiling: dict[str, float]) -> dict[str, Any]:
    fn, bhsd = _runner(backend, t, shape)
    grad = s.mode == "fwd+bwd"
    with torch.set_grad_enabled(grad):
        out = fn()  # also compiles / autotunes where a backend does, before anything is timed
        note = "attention(): " + fa.choose_path(t["q"], t["k"], t["v"]).reason if backend == "wrapper" else ""
        err = _rel_err(_slice_bshd(out, shape, bhsd), ref)
        timed = _with_backward(fn, torch.randn_like(out)) if grad else fn
        del out
        peak = _peak_extra_mib(timed, device)
        timing = time_fn(timed, device, warmup=s.warmup, reps=s.reps)
    flops = attention_flops(shape.batch, shape.heads, shape.seqlen, shape.seqlen, shape.head_dim,
                            shape.causal, s.mode)
    tflops = flops / (timing.median_ms * 1e-3) / 1e12
    return _row(shape, backend, "ok", note, ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                tflops=tflops, frac_matmul=tflops / ceiling[shape.dtype], peak_extra_mib=peak, rel_err=err)


def _time_shape(shape: Shape, backends: list[str], s: SweepSettings, device: torch.device, ceiling: dict[str, float],
                rows: dict[str, dict[str, Any]], progress: Callable[[int, int, str], None] | None,
                done: int, total: int) -> None:
    """Time `backends` on one shape's inputs into `rows`; an OOM or a missing kernel fails one row only."""
    try:
        bhsd = any(b.startswith("sdpa") or b == "flex" for b in backends)
        t = _make_inputs(shape, device, s.seed, bhsd, s.mode == "fwd+bwd")
        ref = _reference(t, shape)
    except torch.OutOfMemoryError as exc:
        rows.update({b: _row(shape, b, "OOM", "inputs: " + str(exc).splitlines()[0][:200]) for b in backends})
        return
    for i, b in enumerate(backends):
        if progress:
            progress(done + i, total, f"{b}: S={shape.seqlen} D={shape.head_dim} causal={shape.causal}")
        try:
            rows[b] = _time_row(shape, b, t, ref, s, device, ceiling)
        except torch.OutOfMemoryError as exc:
            rows[b] = _row(shape, b, "OOM", str(exc).splitlines()[0][:200])
        except Exception as exc:  # noqa: BLE001 - no kernel for this shape, a compile failure: one row only
            rows[b] = _row(shape, b, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_sweep(s: SweepSettings, progress: Callable[[int, int, str], None] | None = None) -> SweepResult:
    """Time every backend on every shape of `s`; rows that fail say why. Refuses oversize sweeps.

    `progress(done, total, label)` is called before each row.
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
            why = backend_unavailable(b, device, shape.dtype)
            if why is None and s.mode == "fwd+bwd" and b == "fa3" and fa.PROVIDER.module == "fa3_fwd_interface":
                why = "fa3-fwd is forward only"
            if why is None and b == "sdpa-math" and math_bytes(shape, s.mode) > budget - input_bytes(shape, s.backends):
                why = f"skipped: math would need {math_bytes(shape, s.mode) / 2**30:.1f} GiB for scores"
            if why is None:
                runnable.append(b)
            else:
                by_backend[b] = _row(shape, b, "skipped" if why.startswith("skipped") else "unavailable", why)
                done += 1
        if runnable:
            _time_shape(shape, runnable, s, device, ceiling, by_backend, progress, done, total)
            done += len(runnable)
        rows.extend(by_backend[b] for b in s.backends)
    table = pd.DataFrame(rows, columns=COLUMNS)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    settings["device"] = str(device)
    return SweepResult(table, environment(), ceiling, time.perf_counter() - start, settings)


def speedup_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per shape: FA3 TFLOP/s, the fastest timed SDPA backend, and FA3's speed-up over it (ratio of ms)."""
    keys = ["dtype", "head_dim", "causal", "batch", "seqlen", "heads", "kv_heads"]
    ok = table[table["status"] == "ok"]
    fa3 = ok[ok["backend"] == "fa3"].set_index(keys)
    sdpa = ok[ok["backend"].str.startswith("sdpa")]
    if fa3.empty or sdpa.empty:
        return pd.DataFrame(columns=[*keys, "fa3_tflops", "best_sdpa", "best_sdpa_tflops", "speedup"])
    best = sdpa.loc[sdpa.groupby(keys)["ms"].idxmin()].set_index(keys)
    best = best[["backend", "ms", "tflops"]].rename(columns={"ms": "sdpa_ms", "tflops": "best_sdpa_tflops",
                                                             "backend": "best_sdpa"})
    joined = fa3[["ms", "tflops"]].rename(columns={"tflops": "fa3_tflops"}).join(best, how="inner")
    joined["speedup"] = joined["sdpa_ms"] / joined["ms"]
    return joined[["fa3_tflops", "best_sdpa", "best_sdpa_tflops", "speedup"]].reset_index()


def settings_for(preset: str, **overrides: Any) -> SweepSettings:
    """A preset's settings with some fields replaced (None values are ignored)."""
    check_choice("preset", preset, tuple(PRESETS))
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def committed_results(directory: Path = RESULTS_DIR) -> dict[str, Path]:
    """Committed sweep documents (benchmarks/results/attention_sweep_*.json), newest name first."""
    return {p.stem: p for p in sorted(directory.glob("attention_sweep_*.json"), reverse=True)}


def load_result(path: Path | str) -> SweepResult:
    """Read one committed sweep document."""
    return SweepResult.from_json(Path(path).read_text())
