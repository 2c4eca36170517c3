"""Training memory per GPU (weights, gradients, optimizer states, activations) and the KV cache.

Bytes per parameter (weights / gradients / optimizer states):
- fp32: 4 / 4 / Adam m, v 8 (SGD momentum 4);
- bf16: 2 / 2 / Adam m, v in bf16 4 (SGD 2), as torch.optim keeps states in the parameters' dtype;
- mixed: 2 / 2 / fp32 master copy + Adam m, v 12 (SGD: master + momentum 8): Adam's 16 bytes per
  parameter of Rajbhandari et al. 2020 (ZeRO), Section 3.1.
Gradients live in persistent buffers, as Megatron-LM and DeepSpeed keep them.

Layout: `gpus` data-parallel GPUs; expert parallelism splits the routed experts over `ep` of them
(ep divides gpus and E), so expert weights are data-parallel over gpus / ep. ZeRO stage 1 shards
optimizer states over the data-parallel group, stage 2 also gradients, stage 3 also weights.
No tensor or pipeline parallelism.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Section 4.1): count every tensor the backward pass keeps, per layer, for T = b x s tokens
of width h in e bytes. Their layer needs sbh(34 + 5as/h) bytes with dropout and GeLU; this model
drops dropout (none of the presets uses it) and applies the same rule to what the engine's
TinyTransformer runs:
- each RMSNorm keeps its input (T h e, fused kernel) and its output feeds the next matmul (T h e);
- attention keeps Q, K, V (T (d_q + 2 d_kv) e) and the input of the output projection (T d_q e);
  flash-style kernels keep its output and the log-sum-exp (4 bytes per token and head) instead of
  the math path's softmax probabilities (b H s^2 e) and causal mask (s^2 bytes);
- SwiGLU keeps the fused gate|up product (2 T F e), SiLU(gate) and the product (2 T F e); GELU
  keeps its input and output (2 T F e);
- MoE (derived here by the same rule): the router keeps its logits' softmax (T E, fp32); dispatch
  keeps the gathered slab of T k c rows (c = capacity factor; 1 for a dropless router), each
  expert's FFN terms on those rows, and the weighted expert outputs before the scatter (T k c h e);
  the gather/scatter keeps two int64 index vectors of T k c entries and the combine weights;
- the output layer keeps the final norm's input and output; the loss upcasts the logits to fp32
  and keeps the log-probabilities (4 T V, the 4sbv term of Korthikanti et al.); at the start of
  backward the gradient of those and of the logits (8 T V) sit beside them: the step's peak.
Full checkpointing keeps each layer's input only (T h e) plus one layer's activations recomputed
during its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.cost_model import TransformerConfig, estimate
from engine.validation import CAPACITY_FACTOR, check_choice, check_float, check_int

PRECISIONS = ("fp32", "bf16", "mixed")
OPTIMIZERS = ("adam", "sgd")
ATTENTION_KINDS = ("flash", "math")
MEMORY_COMPONENTS = ("weights", "gradients", "optimizer states", "activations")
# (weights, gradients, {optimizer: states}) bytes per parameter.
BYTES_PER_PARAM = {"fp32": (4, 4, {"adam": 8, "sgd": 4}),
                   "bf16": (2, 2, {"adam": 4, "sgd": 2}),
                   "mixed": (2, 2, {"adam": 12, "sgd": 8})}


@dataclass(frozen=True)
class TrainLayout:
    """Precision, optimizer and parallel layout of one training run; micro_batch in sequences."""

    precision: str = "mixed"
    optimizer: str = "adam"
    zero: int = 0
    gpus: int = 1
    ep: int = 1
    micro_batch: int = 1
    checkpointing: bool = False
    attention: str = "flash"
    capacity_factor: float = 1.0

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_int("zero", self.zero, 0, 3)
        check_int("gpus", self.gpus, 1, 1 << 20)
        check_int("ep", self.ep, 1, 1 << 16)
        check_int("micro_batch", self.micro_batch, 1, 1 << 16)
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_float("capacity_factor", self.capacity_factor, *CAPACITY_FACTOR)
        if not isinstance(self.checkpointing, bool):
            raise ValueError("checkpointing must be True or False")
        if self.gpus % self.ep:
            raise ValueError(f"gpus must be a multiple of ep ({self.ep}), got {self.gpus}")

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element: 4 in fp32, else 2."""
        return 4 if self.precision == "fp32" else 2


def check_layout(cfg: TransformerConfig, layout: TrainLayout) -> None:
    """Refuse a layout the config cannot use: ep must divide E (and needs an MoE config)."""
    if layout.ep > 1 and not cfg.is_moe:
        raise ValueError(f"ep must be 1 for a dense model (experts 0), got {layout.ep}")
    if cfg.is_moe and cfg.num_experts % layout.ep:
        raise ValueError(f"ep must divide the number of experts ({cfg.num_experts}), got {layout.ep}")


def state_bytes(cfg: TransformerConfig, layout: TrainLayout) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU, in bytes, after ZeRO and expert sharding."""
    check_layout(cfg, layout)
    params = estimate(cfg).params
    experts = params["experts"][0]
    dense = sum(t for t, _ in params.values()) - experts
    w, g, states = BYTES_PER_PARAM[layout.precision]
    o = states[layout.optimizer]
    expert_dp = layout.gpus // layout.ep  # data-parallel group of each expert shard

    def held(stage: int) -> float:  # parameters whose copy of a stage's tensors one GPU holds
        sharded = layout.zero >= stage
        return dense / (layout.gpus if sharded else 1) + experts / layout.ep / (expert_dp if sharded else 1)

    return {"weights": w * held(3), "gradients": g * held(2), "optimizer states": o * held(1)}


def layer_activation_bytes(cfg: TransformerConfig, layout: TrainLayout, moe: bool) -> dict[str, float]:
    """Saved activations of one layer for one micro-batch, by part, in bytes (no checkpointing)."""
    b, s, e = layout.micro_batch, cfg.seq_len, layout.act_bytes
    t, h = b * s, cfg.d_model
    d_q, d_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    glu = 2 if cfg.ffn == "swiglu" else 1

    def ffn(rows: float, width: int) -> float:  # SwiGLU 4 x rows x F, GELU 2 x rows x F elements
        return (2 * glu * rows * width) * e

    out = {"norms": 2 * 2 * t * h * e,  # two norms: input kept, output kept by the next matmul
           "attention": (t * (d_q + 2 * d_kv) + t * d_q) * e}
    if layout.attention == "flash":
        out["attention"] += t * d_q * e + 4 * t * cfg.n_heads  # output and log-sum-exp
    else:
        out["attention"] += b * cfg.n_heads * s * s * e + s * s  # probabilities, bool mask
    if moe:
        slots = t * cfg.top_k * layout.capacity_factor
        out["MoE routing"] = 4 * t * cfg.num_experts + slots * (2 * 8 + e)
        out["experts"] = 2 * slots * h * e + ffn(slots, cfg.d_ff)
        if cfg.shared_experts:
            out["experts"] += ffn(t, cfg.shared_experts * cfg.d_ff)
    else:
        out["FFN"] = ffn(t, cfg.d_ff)
    return out


def activation_bytes(cfg: TransformerConfig, layout: TrainLayout) -> dict[str, float]:
    """Activation memory at the step's peak, by part, in bytes per GPU.

    The peak is the larger of two moments: the loss's backward (every layer's activations, the
    output layer's and the loss buffers) and the last layer's backward, where the math path's
    softmax gradient and score gradient (2 b H s^2 e) sit beside that layer's saved tensors.
    """
    b, s, e = layout.micro_batch, cfg.seq_len, layout.act_bytes
    t = b * s
    n_moe = cfg.n_moe_layers
    per_layer = {"dense": sum(layer_activation_bytes(cfg, layout, False).values()),
                 "MoE": sum(layer_activation_bytes(cfg, layout, True).values()) if n_moe else 0.0}
    counts = {"dense": cfg.n_layers - n_moe, "MoE": n_moe}
    loss = 2 * t * cfg.d_model * e + 12 * t * cfg.vocab
    grad_work = 2 * b * cfg.n_heads * s * s * e if layout.attention == "math" else 0.0
    if layout.checkpointing:
        # Every layer's input; one layer's activations again while it is recomputed.
        parts = {"layer inputs (checkpointed)": cfg.n_layers * t * cfg.d_model * e}
        recompute = max(v for k, v in per_layer.items() if counts[k]) + grad_work
        late = ("one layer recomputed", recompute)
    else:
        parts = {f"{k} layers": counts[k] * v for k, v in per_layer.items() if counts[k]}
        late = ("attention backward (S^2 gradients)", grad_work)
    early = ("output layer and loss (fp32)", loss)
    name, value = max(early, late, key=lambda kv: kv[1])
    return {**parts, name: value}


def memory_parts(cfg: TransformerConfig, layout: TrainLayout) -> tuple[dict[str, float], dict[str, float]]:
    """Peak training memory per GPU by component (memory_per_gpu) and its activations by part
    (activation_bytes), in bytes, from one activation count."""
    acts = activation_bytes(cfg, layout)
    return {**state_bytes(cfg, layout), "activations": sum(acts.values())}, acts


def memory_per_gpu(cfg: TransformerConfig, layout: TrainLayout) -> dict[str, float]:
    """Peak training memory per GPU by component (weights, gradients, optimizer states,
    activations), in bytes."""
    return memory_parts(cfg, layout)[0]


MAX_KV_TOKENS = 1 << 24


def kv_cache_bytes(cfg: TransformerConfig, tokens: int, batch: int = 1, bytes_per: int = 2) -> int:
    """KV cache of `batch` sequences of `tokens` tokens: layers x 2 x KV heads x head dim x bytes."""
    check_int("tokens", tokens, 1, MAX_KV_TOKENS)
    check_int("batch", batch, 1, 1 << 20)
    check_int("bytes_per", bytes_per, 1, 8)
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * bytes_per * tokens * batch


def advice(cfg: TransformerConfig, layout: TrainLayout, capacity: float,
           total: float | None = None) -> list[str]:
    """What to change so the run fits in `capacity` bytes per GPU, each with its predicted total;
    when no single change fits, also a combination that does (or the closest one found).

    total: the layout's own sum of memory_per_gpu (bytes), when the caller has it already."""
    if total is None:
        total = _total(cfg, layout)
    if total <= capacity:
        return []
    out = []
    for text, new in _moves(cfg, layout):
        after = _total(cfg, new)
        if after < total:
            out.append(f"{text}: {after / 1e9:.1f} GB per GPU" + (" (fits)" if after <= capacity else ""))
    if not any(o.endswith("(fits)") for o in out):
        new = _combined(cfg, layout, capacity)
        after = _total(cfg, new)
        if new != layout and after < total:
            out.append(f"together, {_changes(layout, new)}: {after / 1e9:.1f} GB per GPU"
                       + (" (fits)" if after <= capacity else ""))
    return out


def _total(cfg: TransformerConfig, layout: TrainLayout) -> float:
    return sum(memory_per_gpu(cfg, layout).values())


def _moves(cfg: TransformerConfig, layout: TrainLayout) -> list[tuple[str, TrainLayout]]:
    """Single changes that may lower memory per GPU, the cheapest for the run first."""
    moves = []
    if not layout.checkpointing:
        moves.append(("turn on full activation checkpointing", _with(layout, checkpointing=True)))
    if layout.attention == "math":
        moves.append(("use a flash-style attention kernel", _with(layout, attention="flash")))
    if layout.zero < 3 and layout.gpus > 1:
        moves.append((f"ZeRO stage {layout.zero + 1}", _with(layout, zero=layout.zero + 1)))
    if layout.micro_batch > 1:
        moves.append((f"micro-batch {layout.micro_batch // 2} (accumulate gradients to keep the "
                      "global batch)", _with(layout, micro_batch=layout.micro_batch // 2)))
    if cfg.is_moe and layout.ep < cfg.num_experts and layout.ep * 2 <= layout.gpus \
            and cfg.num_experts % (layout.ep * 2) == 0:
        moves.append((f"expert parallelism over {layout.ep * 2} GPUs", _with(layout, ep=layout.ep * 2)))
    if layout.gpus * 2 <= _MAX_GPUS:
        moves.append((f"{layout.gpus * 2} GPUs" + ("" if layout.zero else " with ZeRO stage 1"),
                      _with(layout, gpus=layout.gpus * 2, zero=max(1, layout.zero))))
    return moves


_MAX_GPUS = 1 << 16  # where the combined search stops doubling GPUs


def _combined(cfg: TransformerConfig, layout: TrainLayout, capacity: float) -> TrainLayout:
    """Take the first single change that lowers memory by more than 1%, again and again, until
    the run fits or nothing does: cheap changes before more GPUs (which stop helping once only
    activations are left)."""
    now = _total(cfg, layout)
    while now > capacity:
        lower = next(((after, new) for _, new in _moves(cfg, layout)
                      if (after := _total(cfg, new)) < 0.99 * now), None)
        if lower is None:
            break
        now, layout = lower
    return layout


def _changes(old: TrainLayout, new: TrainLayout) -> str:
    """The fields `new` changes from `old`, in words."""
    words = {"checkpointing": lambda v: "full activation checkpointing",
             "attention": lambda v: f"{v} attention", "zero": lambda v: f"ZeRO stage {v}",
             "micro_batch": lambda v: f"micro-batch {v}",
             "ep": lambda v: f"expert parallelism over {v} GPUs", "gpus": lambda v: f"{v} GPUs"}
    return ", ".join(say(getattr(new, f)) for f, say in words.items()
                     if getattr(new, f) != getattr(old, f))


def _with(layout: TrainLayout, **changes: object) -> TrainLayout:
    from dataclasses import replace

    return replace(layout, **changes)
