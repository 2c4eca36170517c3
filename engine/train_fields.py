"""The training lab's settings as plain values: routers, fields and defaults (TrainFields), and
input ranges (LIMITS).

Stdlib only, so `python -m engine train --help` states them without importing torch;
engine.train_loop.TrainSettings adds the checks, engine.train_model.ModelConfig checks the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.validation import CAPACITY_FACTOR

# Routers the lab trains; "dense" has the MoE's active FFN width (k x expert width), "dense_total"
# its total width (E x expert width).
MOE_ROUTERS = ("hash", "balanced_hash", "topk", "switch", "expert_choice", "deepseek")
ROUTERS = MOE_ROUTERS + ("dense", "dense_total")
HASH_ROUTERS = ("hash", "balanced_hash")
DEFAULT_ROUTERS = ("hash", "balanced_hash", "topk", "switch", "expert_choice", "deepseek", "dense")
DTYPES = ("float32", "bf16")
BPE_VOCAB = (300, 32768)  # 256 bytes + some merges

# The one source of the input ranges, by TrainFields' names: ModelConfig and TrainSettings check
# them, the training page's widgets and `train --help` take their bounds from here. Every range is
# closed (a page's number input cannot express "above 0"): a learning rate under 1e-6 does not move
# a one-minute run; the capacity factor's range is every lab's (validation.CAPACITY_FACTOR).
LIMITS: dict[str, tuple[float, float]] = {
    "vocab": (2, 1 << 17), "d_model": (8, 8192), "layers": (1, 64), "heads": (1, 128),
    "seq_len": (2, 8192), "d_expert": (1, 1 << 16), "experts": (1, 1024), "alpha": (0.0, 10.0),
    "capacity": CAPACITY_FACTOR, "gamma": (0.0, 1.0), "seed": (0, 2**31 - 1),
    "steps": (1, 100_000), "batch": (1, 4096), "lr": (1e-6, 1e4), "warmup": (0, 100_000),
    "eval_every": (1, 100_000), "eval_batches": (1, 1000), "seeds": (1, 16)}


@dataclass(frozen=True)
class TrainFields:
    """One experiment: data, model shape, optimiser and the routers to compare (plain values)."""

    routers: tuple[str, ...] = DEFAULT_ROUTERS
    data: str = "pydoc"
    tokenizer: str = "bpe"
    vocab: int = 1024
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    experts: int = 8
    k: int = 2
    d_expert: int = 96
    moe_every: int = 1
    positions: str = "rope"
    steps: int = 120
    batch: int = 16
    seq_len: int = 64
    lr: float = 1e-2
    warmup: int = 12
    eval_every: int = 20
    eval_batches: int = 4
    alpha: float = 0.01
    capacity: float = 1.25
    gamma: float = 0.01
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graphs: bool = False  # replay each training step from a CUDA graph (engine.train_step)
