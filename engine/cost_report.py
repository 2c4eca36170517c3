"""Every table and sentence the cost page and `python -m engine cost` show, from the same functions
(so both agree): `report` for the CLI; the page calls its two parts, `sizing` and `training_time`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.cost_memory import TrainLayout, advice, kv_cache_bytes, memory_parts
from engine.cost_model import TransformerConfig, compare, estimate, flops_table, params_table, summary
from engine.cost_time import GpuSpec, time_to_train

if TYPE_CHECKING:
    import pandas as pd

# The page's defaults, which the CLI shares: training tokens, GPUs, price per GPU-hour (USD), and
# the layout a run of the default Mixtral 8x7B (32k context) on 64 GPUs would use, which fits an
# H200: ZeRO stage 1 (a distributed optimizer) and full activation checkpointing (without them its
# activations alone take 353 GB per GPU).
DEFAULTS: dict[str, Any] = {"tokens": 1e12, "gpus": 64, "ep": 8, "gpu": "H200 141 GB", "mfu": 0.4,
                            "price": 2.5, "zero": 1, "checkpointing": True}


def report(cfg: TransformerConfig, layout: TrainLayout, tokens: float, gpu: GpuSpec, mfu: float,
           price: float, causal: bool = True, kv_tokens: int | None = None) -> dict[str, Any]:
    """Parameters, FLOPs (for `tokens` training tokens), MoE/dense ratios, memory per GPU (bytes),
    activation parts, whether it fits `gpu`, what to change (sizing), and the time to train."""
    return {**sizing(cfg, layout, tokens, gpu, causal, kv_tokens),
            "time_to_train": training_time(cfg, layout, tokens, gpu, mfu, price, causal)}


def sizing(cfg: TransformerConfig, layout: TrainLayout, tokens: float, gpu: GpuSpec,
           causal: bool = True, kv_tokens: int | None = None) -> dict[str, Any]:
    """Everything of `report` that MFU and price do not change: a bad MFU hides only the time."""
    import pandas as pd

    est = estimate(cfg, causal)
    out: dict[str, Any] = {"parameters": params_table(est), "FLOPs": flops_table(est, tokens)}
    if cfg.is_moe:
        out["MoE / dense"] = compare(cfg, tokens, causal)
    memory, acts = memory_parts(cfg, layout)
    training = sum(memory.values())  # what `advice` weighs its changes against (no KV cache)
    if kv_tokens is not None:
        memory["KV cache"] = kv_cache_bytes(cfg, kv_tokens, layout.micro_batch, layout.act_bytes)
    out["memory"] = pd.DataFrame({"component": list(memory), "bytes": list(memory.values())})
    out["activations"] = pd.DataFrame({"part": list(acts), "bytes": list(acts.values())})
    total = sum(memory.values())
    out["summary"] = summary(est)
    tips = advice(cfg, layout, gpu.memory, training)
    if training <= gpu.memory < total:  # only the inference KV cache is over: no training change helps
        tips = [f"the training state fits ({training / 1e9:.1f} GB per GPU); the KV cache row "
                f"({memory['KV cache'] / 1e9:.1f} GB) is what goes over: fewer KV-cache tokens"]
    out["memory_per_gpu"] = {"total_bytes": total, "gpu_bytes": gpu.memory, "fits": total <= gpu.memory,
                             "advice": tips}
    return out


def training_time(cfg: TransformerConfig, layout: TrainLayout, tokens: float, gpu: GpuSpec,
                  mfu: float, price: float, causal: bool = True) -> dict[str, Any]:
    """Wall time, GPU-hours and cost of training on `tokens` tokens at `mfu` (`report`'s time)."""
    train = time_to_train(estimate(cfg, causal).train_flops * tokens, layout.gpus, gpu.peak_flops,
                          mfu, price)
    return {"tokens": tokens, "training_flops": train.flops, "gpus": layout.gpus,
            "peak_flops_per_gpu": gpu.peak_flops, "mfu": mfu, "price_per_gpu_hour": price,
            "seconds": train.seconds, "days": train.days, "gpu_hours": train.gpu_hours,
            "cost": train.cost, "attention_flops": "causal (S² terms halved)" if causal else "full S²"}


def fit_text(fit: dict[str, Any]) -> str:
    """The cost page's "Will it fit?" verdict from `sizing`'s memory_per_gpu: fits, or what is
    needed and what to change (one "- " line each)."""
    need, have = fit["total_bytes"] / 1e9, fit["gpu_bytes"] / 1e9
    if fit["fits"]:
        return f"Fits: {need:.1f} GB of {have:.0f} GB per GPU."
    tips = "\n".join(f"- {a}" for a in fit["advice"]) or "- nothing on this list helps; use a larger GPU"
    return f"Does not fit: {need:.1f} GB needed, {have:.0f} GB per GPU. What to change:\n{tips}"


def mfu_text(mfu: float, measured: str | None = None) -> str:
    """How the time-to-train sentence names its MFU: typed, or `measured` (where and when)."""
    return f"MFU {mfu:.1%} measured {measured}" if measured else f"MFU {mfu:.0%} (typed)"


def time_text(ttt: dict[str, Any], gpu_name: str, mfu_named: str) -> str:
    """The cost page's time-to-train sentence from `training_time`'s dict; `mfu_named` names the
    MFU and where it came from (mfu_text)."""
    return (f"Time to train {ttt['tokens']:.3g} tokens on {ttt['gpus']} x {gpu_name} at {mfu_named}: "
            f"{ttt['days']:,.1f} days, {ttt['gpu_hours']:,.0f} GPU-hours, ${ttt['cost']:,.0f} at "
            f"${ttt['price_per_gpu_hour']:,.2f} per GPU-hour ({ttt['training_flops']:.3e} training "
            f"FLOPs, attention {ttt['attention_flops']}).")
