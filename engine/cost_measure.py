"""Real training steps of a config (engine.moe_block.TinyTransformer): peak memory and step time.

One step: forward, fp32 cross-entropy on next-token targets, backward, optimizer step, gradients
zeroed in place (persistent gradient buffers, as the memory model assumes). Peak memory is
torch.cuda.max_memory_allocated over one steady step on CUDA; on a CPU, whose allocator keeps no
such counter (and whose resident size hides reused memory), torch's MemTracker sums the live tensors. Step time is the median over a timed window after a timed warm-up (steady clocks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.cost_memory import TrainLayout, memory_per_gpu
from engine.cost_model import TransformerConfig
from engine.cost_time import predict_step_ms, step_flops
from engine.moe_block import TinyTransformer, _saved_bytes
from engine.timing import summarize
from engine.validation import MAX_BYTES, check_bytes, check_float

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What one step may cost on a CPU before it is refused, and the rates (FLOP/s) used to estimate
# it: seen on the 2-core reference machine under load, fp32 3 GFLOP/s (small layers) to 18
# (large matmuls), bf16 about 4x slower.
CPU_STEP_LIMIT_S = 60.0
CPU_FLOPS = {"fp32": 1e10, "bf16": 2.5e9}


def estimated_step_s(cfg: TransformerConfig, layout: TrainLayout, device: str = "cpu") -> float | None:
    """A rough time of one training step on a CPU (s), from its FLOPs; None on a GPU."""
    if torch.device(device).type != "cpu":
        return None
    return step_flops(cfg, layout).hardware / CPU_FLOPS.get(layout.precision, CPU_FLOPS["bf16"])


@dataclass(frozen=True)
class StepMeasurement:
    """One config's measured training step: bytes and milliseconds."""

    peak_bytes: float        # above what was allocated before the model was built
    static_bytes: float      # weights, gradients, optimizer states (and inputs) before a step
    saved_bytes: float       # tensors autograd saved in one forward (parameters excluded); nan
                             # with checkpointing (the checkpoint keeps its own)
    step_ms: float           # median
    step_p10_ms: float
    step_p90_ms: float
    steps: int               # timed steps
    memory_method: str


def scaled_copy(cfg: TransformerConfig) -> TransformerConfig:
    """`cfg` at a size a CPU trains in seconds: d_model 256, 4 heads, 2 layers, sequence 256,
    vocabulary at most 8000; the d_ff / d_model ratio, GQA ratio, experts and top-k kept."""
    heads = 4
    kv = max(1, heads * cfg.n_kv_heads // cfg.n_heads)
    while heads % kv:
        kv -= 1
    return cfg.replace(d_model=256, n_heads=heads, n_kv_heads=kv, n_layers=2, seq_len=256,
                       d_ff=max(1, round(cfg.d_ff * 256 / cfg.d_model)), vocab=min(cfg.vocab, 8000),
                       moe_every=min(cfg.moe_every, 2))


def _check(cfg: TransformerConfig, layout: TrainLayout, device: torch.device) -> None:
    if layout.precision not in DTYPES:
        raise ValueError(f"precision must be fp32 or bf16 for a measured step (mixed precision's "
                         f"fp32 master copy is not built here), got {layout.precision!r}")
    if layout.gpus != 1 or layout.zero or layout.ep != 1 or layout.capacity_factor != 1.0:
        raise ValueError("a measured step runs on one device: gpus 1, ZeRO 0, ep 1, capacity "
                         "factor 1 (the engine's MoE is dropless)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda is not available on this machine; use cpu")
    limit = int(0.85 * torch.cuda.get_device_properties(device).total_memory) \
        if device.type == "cuda" else MAX_BYTES
    check_bytes("this training step (predicted)", sum(memory_per_gpu(cfg, layout).values()), limit)
    est = estimated_step_s(cfg, layout, str(device))
    if est is not None and est > CPU_STEP_LIMIT_S:
        raise ValueError(f"one training step of this config would take about {est:.0f} s on this "
                         f"CPU (over {CPU_STEP_LIMIT_S:.0f} s); make it smaller (layers, sequence "
                         "length, micro-batch) or measure on a GPU")


def _cpu_peak(step: Callable[[], None], model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    # torch's MemTracker follows every tensor's storage (parameters, gradients, optimizer states,
    # activations, temporaries): the live bytes a CPU allocator has no counter for.
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    return float(sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values()))


def measure_step(cfg: TransformerConfig, layout: TrainLayout, device: str = "cpu",
                 warmup_s: float = 1.0, time_s: float = 2.0, seed: int = 0,
                 progress: Callable[[float, str], None] | None = None) -> StepMeasurement:
    """Build the config, train it for a warm-up and a timed window; measure peak memory and time."""
    dev = torch.device(device)
    _check(cfg, layout, dev)
    warmup_s = check_float("warmup_s", warmup_s, 0.0, 600.0)
    time_s = check_float("time_s", time_s, 0.0, 600.0)
    note = progress or (lambda f, m: None)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
    note(0.0, "building the model")
    model = TinyTransformer(cfg, seed, layout.attention, layout.checkpointing).to(dev, DTYPES[layout.precision])
    params = list(model.parameters())
    # Fused kernels on CUDA: no optimizer temporaries; per-parameter loops on a CPU for the same.
    kw = {"fused": True} if cuda else {"foreach": False}
    opt = (torch.optim.AdamW(params, lr=1e-4, **kw) if layout.optimizer == "adam"
           else torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab, (layout.micro_batch, cfg.seq_len + 1), generator=gen).to(dev)
    x, y = ids[:, :-1], ids[:, 1:].reshape(-1)

    def step() -> None:
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    note(0.05, "first step")
    step()  # allocates gradients and optimizer states
    sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        step()
        sync()
    note(0.35, "timing")
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < 2 or time.perf_counter() - t0 < time_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            s0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - s0) * 1e3)
        note(0.35 + 0.5 * min(1.0, (time.perf_counter() - t0) / max(time_s, 1e-9)), "timing")
    note(0.9, "peak memory")
    if cuda:
        static = torch.cuda.memory_allocated(dev) - base
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        sync()
        peak, method = torch.cuda.max_memory_allocated(dev) - base, "torch.cuda.max_memory_allocated"
    else:
        static = float(sum(t.untyped_storage().nbytes() for t in _state_tensors(model, opt)))
        peak, method = _cpu_peak(step, model, opt), "live tensor bytes (torch MemTracker)"
    saved = float("nan") if layout.checkpointing else float(_saved_bytes(_Loss(model), ids))
    t = summarize(samples)
    out = StepMeasurement(float(peak), float(static), saved, t.median_ms, t.p10_ms, t.p90_ms, t.reps,
                          method)
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    note(1.0, "done")
    return out


def _state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    states = [v for st in opt.state.values() for v in st.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    return [*model.parameters(), *grads, *states]


class _Loss(torch.nn.Module):
    """The step's loss as a module of ids (B, S + 1), for counting what autograd saves."""

    def __init__(self, model: TinyTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S + 1) -> scalar loss."""
        return F.cross_entropy(self.model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].reshape(-1))


def predicted_vs_measured(cfg: TransformerConfig, layout: TrainLayout, m: StepMeasurement,
                          predicted_ms: float | None = None) -> dict[str, float | None]:
    """Predicted and measured peak memory (bytes) and step time (ms), errors in percent."""
    predicted = sum(memory_per_gpu(cfg, layout).values())
    row: dict[str, float | None] = {
        "predicted peak bytes": predicted, "measured peak bytes": m.peak_bytes,
        "memory error %": 100 * (predicted - m.peak_bytes) / m.peak_bytes,
        "predicted step ms": predicted_ms, "measured step ms": m.step_ms,
        "time error %": None if predicted_ms is None else 100 * (predicted_ms - m.step_ms) / m.step_ms}
    flops = step_flops(cfg, layout)
    row["model TFLOP per step"] = flops.model / 1e12
    return row


def run_from_dict(run: dict) -> tuple[TransformerConfig, TrainLayout]:
    """The config and layout of one committed run (the dicts its JSON holds)."""
    return TransformerConfig(**run["config"]), TrainLayout(**run["layout"])


def block_key(cfg: TransformerConfig, layout: TrainLayout) -> str:
    """The MoE FFN shape a block-ratio measurement stands for (d_model, d_ff, E, k, FFN, tokens)."""
    return (f"d{cfg.d_model} f{cfg.d_ff} E{cfg.num_experts} k{cfg.top_k} {cfg.ffn} "
            f"T{layout.micro_batch * cfg.seq_len} {layout.precision}")


def compare_runs(runs: list[dict], calibration: str,
                 moe_extra: dict[str, tuple[float, float]] | None = None,
                 mem_target: float = 10.0, time_target: float = 15.0) -> list[dict]:
    """Predicted against measured for measured runs (dicts of name, config, layout, measured).

    Memory: the model's peak per GPU. Step time: scaled from the `calibration` run's measured
    step by hardware FLOPs (its MFU carried over); MoE runs add the MoE block's measured extra
    (forward, forward+backward) ms per layer at their shapes (`moe_extra`, keyed by block_key).
    Runs in another precision, or MoE runs without that measurement, get no prediction.
    """
    extras = moe_extra or {}
    ref = next((r for r in runs if r["name"] == calibration and "measured" in r), None)
    rows = []
    for run in runs:
        cfg, layout = run_from_dict(run)
        row: dict = {"run": run["name"], "precision": layout.precision,
                     "attention": layout.attention, "checkpointing": layout.checkpointing,
                     "seq_len": cfg.seq_len, "micro_batch": layout.micro_batch,
                     "experts": cfg.num_experts}
        if "measured" not in run:
            rows.append({**row, "verdict": f"not measured: {run.get('error', '?')}"})
            continue
        m = StepMeasurement(**run["measured"])
        pred_ms, why = None, ""
        extra = extras.get(block_key(cfg, layout)) if cfg.is_moe else None
        if ref is not None and run is not ref:
            ref_cfg, ref_layout = run_from_dict(ref)
            if ref_layout.precision != layout.precision:
                why = "time not predicted: calibrated in another precision"
            elif cfg.is_moe and extra is None:
                why = "time not predicted: no MoE block time measured at these shapes"
            else:
                pred_ms = predict_step_ms(cfg, layout, ref_cfg, ref_layout,
                                          ref["measured"]["step_ms"], extra)
        row.update(predicted_vs_measured(cfg, layout, m, pred_ms))
        mem_ok = abs(row["memory error %"]) <= mem_target
        if run is ref:
            verdict = "calibration (MFU measured here)"
        elif pred_ms is None:
            verdict = why
        else:
            verdict = "within" if abs(row["time error %"]) <= time_target else "time miss"
        row["verdict"] = verdict if mem_ok else f"memory miss; {verdict}"
        rows.append(row)
    return rows


def extra_ms(blocks: dict[str, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """MoE block minus dense FFN block, (forward, forward+backward) ms, per shape key."""
    return {k: (b["moe_forward_ms"] - b["dense_forward_ms"], b["moe_fwd_bwd_ms"] - b["dense_fwd_bwd_ms"])
            for k, b in blocks.items()}
