"""The routing lab's experiment: one workload, several routers, every metric; page and CLI share it.

LabSettings (plain, hashable) -> run_lab -> LabResult (pandas tables). Id workloads route ids
through the hash routers and their embeddings through the learned ones; hidden-state workloads
route the vectors through all (the hash router then uses its LSH).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import pandas as pd
import torch

from engine import routing_metrics as rm
from engine import workloads as wl
from engine.moe_router import (BalancedHashRouter, DeepSeekV3Router, ExpertChoiceRouter,
                               GShardRouter, HashRouter, SwitchRouter, TopKRouter,
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


_DEFAULT = LabSettings()
_COUNT_COLS = ["router", "expert", "tokens", "load/mean", "load rank"]
_RANK_COLS = ["router", "rank", "tokens"]
_BALANCE_COLS = ["step", "CV", "MaxVio"]


def _k_of(key: str, s: LabSettings) -> int:
    """The router's nominal k (Switch is top-1 and GShard top-2 whatever the setting)."""
    return {"switch": 1, "gshard": 2}.get(key, min(s.top_k, 2) if key.startswith("hash")
                                          else s.top_k)


@functools.lru_cache(maxsize=2)
def _workload(kind: str, num_tokens: int, vocab_size: int, zipf_s: float, d_model: int,
              clusters: int, seed: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(ids (T,) or None, hidden states (T, D)); memoised so the routers of one run share them.
    Routers only read their inputs, so sharing is safe."""
    if kind in wl.ID_KINDS:
        ids = wl.token_ids(kind, num_tokens, vocab_size, zipf_s, seed)
        return ids, wl.embed(ids, vocab_size, d_model, seed)
    return None, wl.hidden_states(kind, num_tokens, d_model, clusters, seed)


def for_router(s: LabSettings, key: str) -> LabSettings:
    """The settings that matter to router `key` alone: a stable cache key for one router's run."""
    check_choice("routers", key, tuple(ROUTERS))
    if key != "deepseek":
        s = replace(s, deepseek_steps=_DEFAULT.deepseek_steps,
                    bias_update_speed=_DEFAULT.bias_update_speed)
    return replace(s, routers=(key,))


def route_one(s: LabSettings, key: str) -> LabResult:
    """Route the workload with router `key` and measure it: that router's rows of every table."""
    s = for_router(s, key)
    s.validate()
    ids, x = _workload(s.workload, s.num_tokens, s.vocab_size, s.zipf_s, s.d_model, s.clusters,
                       s.seed)
    e, k, label = s.num_experts, _k_of(key, s), ROUTERS[key]
    balance = pd.DataFrame(columns=_BALANCE_COLS)
    if key == "hash":
        r = HashRouter(e, k, s.seed)(ids if ids is not None else x)
    elif key == "hash_balanced":
        if ids is None:
            return _empty(f"{label} needs token ids: skipped for hidden states.")
        r = BalancedHashRouter(e, k, s.seed, wl.id_pmf(s.workload, s.vocab_size, s.zipf_s,
                                                       s.seed))(ids)
    elif key == "deepseek":
        router = DeepSeekV3Router(e, k, s.d_model, s.seed, s.bias_update_speed)
        hist = router.balance(x, s.deepseek_steps)
        balance = pd.DataFrame([{"step": h.step, "CV": h.cv, "MaxVio": h.max_vio} for h in hist])
        r = router(x)
    else:
        cls = {"topk": TopKRouter, "switch": SwitchRouter, "gshard": GShardRouter,
               "expert_choice": ExpertChoiceRouter}[key]
        extra = {} if key == "topk" else {"capacity_factor": s.capacity_factor}
        r = cls(e, k, s.d_model, s.seed, **extra)(x)

    counts = expert_utilization(r).cpu()
    mean = max(float(counts.double().mean()), 1e-12)
    # Position of each expert when sorted by load, busiest first (the "sorted" histogram).
    by_load = torch.empty(e, dtype=torch.int64)
    by_load[torch.argsort(counts, descending=True, stable=True)] = torch.arange(e)
    loads = rm.per_rank_load(counts, s.num_ranks)
    return LabResult(
        counts=pd.DataFrame({"router": label, "expert": range(e), "tokens": counts.numpy(),
                             "load/mean": counts.double().numpy() / mean,
                             "load rank": by_load.numpy()}),
        metrics=pd.DataFrame([{"router": label,
                               **rm.summarize(r, k, s.capacity_factor, s.num_ranks)}]),
        ranks=pd.DataFrame({"router": label, "rank": range(s.num_ranks),
                            "tokens": loads.long().numpy()}),
        balance=balance,
    )


def _empty(note: str) -> LabResult:
    return LabResult(pd.DataFrame(columns=_COUNT_COLS), pd.DataFrame(),
                     pd.DataFrame(columns=_RANK_COLS), pd.DataFrame(columns=_BALANCE_COLS), (note,))


def combine(s: LabSettings, parts: list[LabResult]) -> LabResult:
    """One LabResult from per-router parts (in order), plus the null-baseline metrics row."""
    null = pd.DataFrame([{"router": NULL_LABEL, "k": s.top_k,
                          "slots routed": s.top_k * s.num_tokens,
                          "CV": rm.null_cv(s.num_experts, s.top_k, s.num_tokens)}])

    def cat(frames: list[pd.DataFrame], empty: pd.DataFrame) -> pd.DataFrame:
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else empty

    return LabResult(
        counts=cat([p.counts for p in parts], pd.DataFrame(columns=_COUNT_COLS)),
        metrics=cat([p.metrics for p in parts] + [null], null),
        ranks=cat([p.ranks for p in parts], pd.DataFrame(columns=_RANK_COLS)),
        balance=cat([p.balance for p in parts], pd.DataFrame(columns=_BALANCE_COLS)),
        notes=tuple(n for p in parts for n in p.notes),
    )


def run_lab(s: LabSettings, route: Callable[[LabSettings, str], LabResult] | None = None
            ) -> LabResult:
    """Generate the workload, route it with every chosen router, and measure each routing.

    route: makes one router's part from for_router(s, key) and key (default route_one; the page
    passes a cached route_one, so a change to one router's settings reruns only that router)."""
    s.validate()
    route = route or route_one
    return combine(s, [route(for_router(s, key), key) for key in s.routers])


def settings_dict(s: LabSettings) -> dict[str, object]:
    """The settings as a JSON-ready dict (for downloads and `--json`)."""
    d = asdict(s)
    d["routers"] = list(s.routers)
    d["capacity_slots"] = expert_capacity(s.capacity_factor, s.top_k, s.num_tokens, s.num_experts)
    return d
