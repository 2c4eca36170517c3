"""The routing lab's experiment: one workload, several routers, every metric; page and CLI share it.

LabSettings (plain, hashable) -> run_lab -> LabResult (pandas tables). Id workloads route ids
through the hash routers and their embeddings through the learned ones; hidden-state workloads
route the vectors through all (the hash router then uses its LSH).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from engine import routing_metrics as rm
from engine import workloads as wl
from engine.moe_router import (BalancedHashRouter, DeepSeekV3Router, ExpertChoiceRouter,
                               GShardRouter, HashRouter, Routing, SwitchRouter, TopKRouter,
                               expert_capacity, expert_utilization)
from engine.validation import check_bytes, check_choice, check_float, check_int

# Router key -> label shown in tables and legends.
ROUTERS: dict[str, str] = {
    "hash": "Hash",
    "hash_balanced": "Hash (balanced table)",
    "topk": "Top-k softmax",
    "switch": "Switch top-1",
    "gshard": "GShard top-2",
    "expert_choice": "Expert Choice",
    "deepseek": "DeepSeek-V3 bias",
}
NULL_LABEL = "uniform random (null)"
MAX_EXPERTS = 1024


@dataclass(frozen=True)
class LabSettings:
    """Everything that determines the lab's figures (the page keeps these in the URL)."""

    workload: str = "zipf"
    num_tokens: int = 65_536
    vocab_size: int = 32_000
    zipf_s: float = 1.0
    d_model: int = 64
    clusters: int = 8
    num_experts: int = 64
    top_k: int = 2
    capacity_factor: float = 1.25
    num_ranks: int = 8
    routers: tuple[str, ...] = ("hash", "hash_balanced", "topk", "switch", "gshard",
                                "expert_choice", "deepseek")
    deepseek_steps: int = 30
    bias_update_speed: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting; also refuse working sets over budget."""
        check_choice("workload", self.workload, wl.KINDS)
        t = check_int("num_tokens", self.num_tokens, 1000, wl.MAX_TOKENS)
        check_int("vocab_size", self.vocab_size, 2, wl.MAX_VOCAB)
        check_float("zipf_s", self.zipf_s, 0.0, 4.0)
        d = check_int("d_model", self.d_model, 2, 4096)
        check_int("clusters", self.clusters, 1, 4096)
        e = check_int("num_experts", self.num_experts, 2, MAX_EXPERTS)
        check_int("top_k", self.top_k, 1, min(8, e))
        check_float("capacity_factor", self.capacity_factor, 0.0, 64.0, lo_open=True)
        check_int("num_ranks", self.num_ranks, 1, e)
        check_int("deepseek_steps", self.deepseek_steps, 0, 500)
        check_float("bias_update_speed", self.bias_update_speed, 0.0, 1.0)
        check_int("seed", self.seed, 0, 2**31 - 1)
        if not self.routers:
            raise ValueError(f"routers must name at least one of {', '.join(ROUTERS)}")
        for r in self.routers:
            check_choice("routers", r, tuple(ROUTERS))
        check_bytes("these settings", estimate_bytes(self))


def estimate_bytes(s: LabSettings) -> float:
    """Peak working set of run_lab in bytes (an upper estimate, checked before allocating)."""
    t, e, k = s.num_tokens, s.num_experts, max(s.top_k, 2)
    hidden = 4.0 * t * s.d_model + 8.0 * t  # vectors (or embeddings) and ids
    # Gate logits, probabilities and their top-k / sort temporaries, all (T, E) or (E, cap).
    per_router = 16.0 * t * e + 32.0 * k * t * max(1.0, s.capacity_factor)
    return hidden + per_router + 8.0 * s.vocab_size * (s.d_model + 4)


@dataclass(frozen=True)
class LabResult:
    """Tables of one lab run: counts (router, expert, tokens, load/mean, load rank: 0 = busiest),
    metrics (one row per router plus the null baseline), ranks (router, rank, tokens) for the
    contiguous placement, balance (DeepSeek step, CV, MaxVio)."""

    counts: pd.DataFrame
    metrics: pd.DataFrame
    ranks: pd.DataFrame
    balance: pd.DataFrame
    notes: tuple[str, ...] = field(default=())


def _k_of(key: str, s: LabSettings) -> int:
    """The router's nominal k (Switch is top-1 and GShard top-2 whatever the setting)."""
    return {"switch": 1, "gshard": 2}.get(key, min(s.top_k, 2) if key.startswith("hash")
                                          else s.top_k)


def run_lab(s: LabSettings) -> LabResult:
    """Generate the workload, route it with every chosen router, and measure each routing."""
    s.validate()
    ids = None
    if s.workload in wl.ID_KINDS:
        ids = wl.token_ids(s.workload, s.num_tokens, s.vocab_size, s.zipf_s, s.seed)
        x = wl.embed(ids, s.vocab_size, s.d_model, s.seed)
    else:
        x = wl.hidden_states(s.workload, s.num_tokens, s.d_model, s.clusters, s.seed)
    e, notes = s.num_experts, []
    routings: dict[str, Routing] = {}
    balance = pd.DataFrame(columns=["step", "CV", "MaxVio"])
    for key in s.routers:
        k = _k_of(key, s)
        if key == "hash":
            routings[key] = HashRouter(e, k, s.seed)(ids if ids is not None else x)
        elif key == "hash_balanced":
            if ids is None:
                notes.append("Hash (balanced table) needs token ids: skipped for hidden states.")
                continue
            pmf = wl.id_pmf(s.workload, s.vocab_size, s.zipf_s, s.seed)
            routings[key] = BalancedHashRouter(e, k, s.seed, pmf)(ids)
        elif key == "deepseek":
            router = DeepSeekV3Router(e, k, s.d_model, s.seed, s.bias_update_speed)
            hist = router.balance(x, s.deepseek_steps)
            balance = pd.DataFrame([{"step": h.step, "CV": h.cv, "MaxVio": h.max_vio} for h in hist])
            routings[key] = router(x)
        else:
            cls = {"topk": TopKRouter, "switch": SwitchRouter, "gshard": GShardRouter,
                   "expert_choice": ExpertChoiceRouter}[key]
            extra = {} if key == "topk" else {"capacity_factor": s.capacity_factor}
            routings[key] = cls(e, k, s.d_model, s.seed, **extra)(x)

    rows, counts_rows, rank_rows = [], [], []
    for key, r in routings.items():
        label, k = ROUTERS[key], _k_of(key, s)
        rows.append({"router": label, **rm.summarize(r, k, s.capacity_factor, s.num_ranks)})
        counts = expert_utilization(r).cpu()
        mean = max(float(counts.double().mean()), 1e-12)
        # Position of each expert when sorted by load, busiest first (the "sorted" histogram).
        by_load = torch.empty(e, dtype=torch.int64)
        by_load[torch.argsort(counts, descending=True, stable=True)] = torch.arange(e)
        counts_rows.append(pd.DataFrame({
            "router": label, "expert": range(e), "tokens": counts.numpy(),
            "load/mean": counts.double().numpy() / mean, "load rank": by_load.numpy()}))
        loads = rm.per_rank_load(counts, s.num_ranks)
        rank_rows.append(pd.DataFrame({"router": label, "rank": range(s.num_ranks),
                                       "tokens": loads.long().numpy()}))
    rows.append({"router": NULL_LABEL, "k": s.top_k, "slots routed": s.top_k * s.num_tokens,
                 "CV": rm.null_cv(e, s.top_k, s.num_tokens)})
    metrics = pd.DataFrame(rows)
    return LabResult(
        counts=pd.concat(counts_rows, ignore_index=True) if counts_rows else
        pd.DataFrame(columns=["router", "expert", "tokens", "load/mean", "load rank"]),
        metrics=metrics,
        ranks=pd.concat(rank_rows, ignore_index=True) if rank_rows else
        pd.DataFrame(columns=["router", "rank", "tokens"]),
        balance=balance,
        notes=tuple(notes),
    )


def settings_dict(s: LabSettings) -> dict[str, object]:
    """The settings as a JSON-ready dict (for downloads and `--json`)."""
    d = asdict(s)
    d["routers"] = list(s.routers)
    d["capacity_slots"] = expert_capacity(s.capacity_factor, s.top_k, s.num_tokens, s.num_experts)
    return d
