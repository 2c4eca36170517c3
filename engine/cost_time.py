"""Time to train: training FLOPs / (GPUs x peak x MFU) -> wall time, GPU-hours, cost; step time.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, PaLM, Appendix B) counts the model's training
FLOPs (3 x forward, causal attention halved) whatever the run recomputes. A step's time depends on
what the hardware executes: the model FLOPs plus one more forward under full checkpointing, and the
masked half of the S x S products on the math attention path. Predicting one config's step time
from another's measured step therefore scales by hardware FLOPs (the hardware FLOPs utilisation of
the measured step carries over). An MoE layer costs more than FLOPs say (the gather, the
scatter, smaller matmuls, a host sync for the split sizes): an MoE config's step is predicted as
its dense counterpart's (the same model with one expert's FFN in each MoE layer) plus, per MoE
layer, the extra time of the MoE block over that dense FFN block, both timed by
engine.moe_block.time_blocks at the config's shapes on the same device (forward and backward; one
more forward under checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.cost_memory import TrainLayout
from engine.cost_model import TransformerConfig, dense_counterpart, estimate
from engine.validation import check_float, check_int


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's memory (bytes, decimal GB as marketed) and dense bf16 tensor-core peak (FLOP/s)."""

    memory: float
    peak_flops: float


# NVIDIA datasheets, dense (no sparsity) BF16 tensor-core peak: H100 SXM5 and H200 989 TFLOP/s,
# B200 (HGX) 2250 TFLOP/s, A100 SXM 312 TFLOP/s.
GPUS: dict[str, GpuSpec] = {"H100 80 GB": GpuSpec(80e9, 989e12), "H200 141 GB": GpuSpec(141e9, 989e12),
                            "B200 192 GB": GpuSpec(192e9, 2250e12), "A100 80 GB": GpuSpec(80e9, 312e12)}


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch step on one GPU: model (3 x forward, causal) and executed."""

    model: float
    hardware: float


def step_flops(cfg: TransformerConfig, layout: TrainLayout) -> StepFlops:
    """Model and hardware FLOPs of one training step of `layout.micro_batch` sequences."""
    tokens = layout.micro_batch * cfg.seq_len
    model = 3 * estimate(cfg).forward_flops * tokens
    executed_fwd = estimate(cfg, causal=layout.attention == "flash").forward_flops * tokens
    return StepFlops(model, (4 if layout.checkpointing else 3) * executed_fwd)


def mfu_of_step(cfg: TransformerConfig, layout: TrainLayout, step_ms: float, peak_flops: float) -> float:
    """MFU of a measured step: model FLOPs / (step time x peak)."""
    step_ms = check_float("step_ms", step_ms, 0.0, lo_open=True)
    peak_flops = check_float("peak FLOP/s", peak_flops, 0.0, lo_open=True)
    return step_flops(cfg, layout).model / (step_ms / 1e3 * peak_flops)


def predict_step_ms(cfg: TransformerConfig, layout: TrainLayout, ref_cfg: TransformerConfig,
                    ref_layout: TrainLayout, ref_ms: float,
                    moe_extra_ms: tuple[float, float] | None = None) -> float:
    """Step time of `cfg` predicted from a measured step of a dense `ref_cfg` on the same device (ms).

    MoE configs need `moe_extra_ms`: the MoE block's extra (forward, forward+backward) time over
    its dense counterpart's FFN block at these shapes, in ms per layer.
    """
    ref_ms = check_float("ref_ms", ref_ms, 0.0, lo_open=True)
    ref_hw = step_flops(ref_cfg, ref_layout).hardware
    if not cfg.is_moe:
        return ref_ms * step_flops(cfg, layout).hardware / ref_hw
    if moe_extra_ms is None:
        raise ValueError("an MoE config's step time needs the MoE block's extra time (moe_extra_ms)")
    fwd, fwd_bwd = moe_extra_ms
    dense = dense_counterpart(cfg, "same_ff")
    per_layer = fwd_bwd + (fwd if layout.checkpointing else 0.0)
    return ref_ms * step_flops(dense, layout).hardware / ref_hw + cfg.n_moe_layers * per_layer


@dataclass(frozen=True)
class TrainTime:
    """Wall time (s), GPU-hours and cost (in the price's currency) of a training run."""

    flops: float
    seconds: float
    gpu_hours: float
    cost: float

    @property
    def days(self) -> float:
        """Wall time in days."""
        return self.seconds / 86400


def time_to_train(train_flops: float, gpus: int, peak_flops: float, mfu: float,
                  price_per_gpu_hour: float = 0.0) -> TrainTime:
    """Training FLOPs / (GPUs x peak x MFU): wall time, GPU-hours and cost at a price per GPU-hour."""
    train_flops = check_float("training FLOPs", train_flops, 0.0, lo_open=True)
    gpus = check_int("GPUs", gpus, 1, 1 << 24)
    peak_flops = check_float("peak FLOP/s", peak_flops, 0.0, lo_open=True)
    mfu = check_float("MFU", mfu, 0.0, 1.0, lo_open=True)
    price = check_float("price per GPU-hour", price_per_gpu_hour, 0.0)
    seconds = train_flops / (gpus * peak_flops * mfu)
    gpu_hours = seconds / 3600 * gpus
    return TrainTime(train_flops, seconds, gpu_hours, gpu_hours * price)
