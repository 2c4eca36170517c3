"""The routing lab's experiment: one workload, several routers, every metric; page and CLI share it.

LabSettings (plain, hashable) -> run_lab -> LabResult (pandas tables). Id workloads route ids
through the hash routers and their embeddings through the learned ones; hidden-state workloads
route the vectors through all (the hash router then uses its LSH). The learned routers of one
run share one seeded gate, so its logits and softmax are computed once (_gate_outputs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace

import pandas as pd
import torch

from engine import routing_metrics as rm
from engine import workloads as wl
from engine.moe_router import (DEEPSEEK_V3, BalancedHashRouter, DeepSeekV3Router,
                               ExpertChoiceRouter, GShardRouter, HashRouter, Routing, SwitchRouter,
                               TopKRouter, expert_capacity, expert_utilization, lsh_bits,
                               router_probs)
from engine.routing_deepseek import check_groups
from engine.validation import CAPACITY_FACTOR, check_bytes, check_choice, check_float, check_int

# Router key -> label shown in tables and legends.
ROUTERS: dict[str, str] = {
    "hash": "Hash",
    "balanced_hash": "Hash (balanced table)",
    "topk": "Top-k softmax",
    "switch": "Switch top-1",
    "gshard": "GShard top-2",
    "expert_choice": "Expert Choice",
    "deepseek": "DeepSeek-V3 bias",
}
HASH_ROUTERS = ("hash", "balanced_hash")
_CLASSES = {"hash": HashRouter, "balanced_hash": BalancedHashRouter, "topk": TopKRouter,
            "switch": SwitchRouter, "gshard": GShardRouter, "expert_choice": ExpertChoiceRouter,
            "deepseek": DeepSeekV3Router}
# Each router's auxiliary loss, by the paper / reference code that defines it (routing_metrics).
AUX_LOSS = {"topk": "mixtral", "switch": "switch", "gshard": "gshard"}
NULL_LABEL = "null CV"  # the metrics column holding each router's own uniform null
MAX_EXPERTS = 1024

# The one source of the lab's input ranges: LabSettings.validate checks them and the page's
# widgets take their bounds from here.
LIMITS: dict[str, tuple[float, float]] = {
    "num_tokens": (1000, wl.MAX_TOKENS), "vocab_size": (2, wl.MAX_VOCAB), "zipf_s": (0.0, 2.0),
    "d_model": (2, 4096), "clusters": (1, 4096), "num_experts": (2, MAX_EXPERTS),
    "top_k": (1, 8), "capacity_factor": CAPACITY_FACTOR, "num_ranks": (1, MAX_EXPERTS),
    "deepseek_steps": (0, 500), "bias_update_speed": (0.0, 1.0), "seed": (0, 2**31 - 1),
    "n_groups": (1, MAX_EXPERTS), "topk_groups": (1, MAX_EXPERTS), "route_scale": (0.01, 100.0),
}
# What the user typed, by the name a check reports: the page's labels and the CLI's flags.
PAGE_LABELS = {
    "workload": "Workload", "num_tokens": "Tokens T", "vocab_size": "Vocabulary V",
    "zipf_s": "Zipf exponent s", "d_model": "Hidden size D", "clusters": "Clusters",
    "num_experts": "Experts E", "top_k": "Experts per token k",
    "capacity_factor": "Capacity factor C", "num_ranks": "Ranks R", "routers": "Routers",
    "deepseek_steps": "DeepSeek-V3 bias steps", "bias_update_speed": "DeepSeek-V3 bias update speed",
    "seed": "Seed", "n_groups": "Expert groups", "topk_groups": "Groups per token",
    "route_scale": "Routed scaling factor",
}
CLI_FLAGS = {
    "workload": "--workload", "num_tokens": "--tokens", "vocab_size": "--vocab",
    "zipf_s": "--zipf-s", "d_model": "--d-model", "clusters": "--clusters",
    "num_experts": "--experts", "top_k": "--k", "capacity_factor": "--capacity-factor",
    "num_ranks": "--ranks", "routers": "--routers", "deepseek_steps": "--ds-steps",
    "bias_update_speed": "--ds-speed", "seed": "--seed", "n_groups": "--ds-groups",
    "topk_groups": "--ds-topk-groups", "route_scale": "--ds-scale",
}
# Named settings: DeepSeek-V3's own router (256 experts, 8 groups, top-4 groups, k 8, scale 2.5).
PRESETS: dict[str, dict[str, object]] = {"DeepSeek-V3": dict(DEEPSEEK_V3)}


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
    routers: tuple[str, ...] = ("hash", "balanced_hash", "topk", "switch", "gshard",
                                "expert_choice", "deepseek")
    deepseek_steps: int = 30
    bias_update_speed: float = 0.01
    seed: int = 0
    n_groups: int = 1  # DeepSeek-V3 group-limited routing (1: off)
    topk_groups: int = 1
    route_scale: float = 1.0
    gshard_renormalize: bool = False  # GShard survivor after a drop: g/(g1+g2) or 1 (DeepSpeed)

    def validate(self, labels: Mapping[str, str] | None = None) -> None:
        """Raise ValueError naming the first bad setting (as `labels` call it: PAGE_LABELS,
        CLI_FLAGS); also refuse working sets over the memory budget."""
        try:
            self._validate()
        except ValueError as exc:
            name, _, rest = str(exc).partition(" ")
            if labels and name in labels:
                raise ValueError(f"{labels[name]} {rest}") from None
            raise

    def _validate(self) -> None:
        check_choice("workload", self.workload, wl.KINDS)
        ints = {k: getattr(self, k) for k in ("num_tokens", "vocab_size", "d_model", "clusters",
                                              "num_experts", "deepseek_steps", "seed")}
        for name, value in ints.items():
            check_int(name, value, *LIMITS[name])
        for name in ("zipf_s", "capacity_factor", "bias_update_speed"):
            check_float(name, getattr(self, name), *LIMITS[name])
        e = self.num_experts
        check_int("top_k", self.top_k, 1, min(int(LIMITS["top_k"][1]), e))
        check_int("num_ranks", self.num_ranks, 1, e)
        if not self.routers:
            raise ValueError(f"routers must name at least one of {', '.join(ROUTERS)}")
        for r in self.routers:
            check_choice("routers", r, tuple(ROUTERS))
        if "deepseek" in self.routers:
            check_groups(e, self.top_k, self.n_groups, self.topk_groups)
            check_float("route_scale", self.route_scale, *LIMITS["route_scale"])
        check_bytes("these settings", estimate_bytes(self))


def estimate_bytes(s: LabSettings) -> float:
    """Peak working set of run_lab in bytes (an upper estimate, checked before allocating): a
    hash-only run never allocates the (T, E) gate scores of the learned routers."""
    t, e, d = s.num_tokens, s.num_experts, s.d_model
    gated = any(r not in HASH_ROUTERS for r in s.routers)
    ids = s.workload in wl.ID_KINDS
    total = 40.0 * t + 24.0 * s.vocab_size  # ids, sampling and hash temporaries; pmf and table
    if gated or not ids:
        total += 4.0 * t * d + (4.0 * s.vocab_size * d if ids else 0.0)  # vectors (embeddings)
    if not ids:  # LSH: projections and sign bits, 2 slots of lsh_bits(E) planes
        total += 16.0 * t * lsh_bits(e)
    if gated:  # shared logits + softmax, one router's (T, E) temporaries, its top-k / capacity
        total += 8.0 * t * e + 12.0 * t * e + 32.0 * max(s.top_k, 2) * t * s.capacity_factor
    return total


@dataclass(frozen=True)
class LabResult:
    """Tables of one lab run: counts (router, expert, tokens, load/mean, load rank: 0 = busiest),
    metrics (one row per router, with its own null CV and aux loss), ranks (router, rank, tokens)
    for the contiguous placement, balance (DeepSeek step, CV, MaxVio)."""

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
    """The router's nominal k (Switch is top-1, GShard top-2, hash at most 2)."""
    return {"switch": 1, "gshard": 2}.get(key, min(s.top_k, 2) if key in HASH_ROUTERS
                                          else s.top_k)


@functools.lru_cache(maxsize=2)
def _ids(kind: str, num_tokens: int, vocab_size: int, zipf_s: float, seed: int) -> torch.Tensor:
    """Token ids (T,), memoised so the routers of one run share them (routers only read them)."""
    return wl.token_ids(kind, num_tokens, vocab_size, zipf_s, seed)


@functools.lru_cache(maxsize=2)
def _hidden(kind: str, num_tokens: int, vocab_size: int, zipf_s: float, d_model: int,
            clusters: int, seed: int) -> torch.Tensor:
    """Hidden states (T, D): the ids' embeddings, or generated vectors; memoised."""
    if kind in wl.ID_KINDS:
        return wl.embed(_ids(kind, num_tokens, vocab_size, zipf_s, seed), vocab_size, d_model,
                        seed)
    return wl.hidden_states(kind, num_tokens, d_model, clusters, seed)


@functools.lru_cache(maxsize=1)
def _gate_outputs(kind: str, num_tokens: int, vocab_size: int, zipf_s: float, d_model: int,
                  clusters: int, seed: int, num_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, E) and their float32 softmax under the learned routers' shared gate (every
    gated router seeds the same W from (D, E, seed)); one entry, so at most one (T, E) pair."""
    x = _hidden(kind, num_tokens, vocab_size, zipf_s, d_model, clusters, seed)
    logits = TopKRouter(num_experts, 1, d_model, seed).logits(x)[0]
    return logits, router_probs(logits)


def for_router(s: LabSettings, key: str) -> LabSettings:
    """The settings that matter to router `key` alone: a stable cache key for one router's run."""
    check_choice("routers", key, tuple(ROUTERS))
    if key != "deepseek":
        s = replace(s, deepseek_steps=_DEFAULT.deepseek_steps,
                    bias_update_speed=_DEFAULT.bias_update_speed, n_groups=_DEFAULT.n_groups,
                    topk_groups=_DEFAULT.topk_groups, route_scale=_DEFAULT.route_scale)
    if key != "gshard":
        s = replace(s, gshard_renormalize=_DEFAULT.gshard_renormalize)
    return replace(s, routers=(key,))


def _route(s: LabSettings, key: str) -> tuple[Routing | None, pd.DataFrame, tuple[str, ...]]:
    """Route the workload with router `key`: (Routing, DeepSeek balance table, notes)."""
    e, k, label = s.num_experts, _k_of(key, s), ROUTERS[key]
    work = (s.workload, s.num_tokens, s.vocab_size, s.zipf_s)
    ids = _ids(*work, s.seed) if s.workload in wl.ID_KINDS else None
    balance = pd.DataFrame(columns=_BALANCE_COLS)
    if key == "hash":
        x = ids if ids is not None else _hidden(*work, s.d_model, s.clusters, s.seed)
        return HashRouter(e, k, s.seed)(x), balance, ()
    if key == "balanced_hash":
        if ids is None:
            return None, balance, (f"{label} needs token ids: skipped for hidden states.",)
        pmf = wl.id_pmf(s.workload, s.vocab_size, s.zipf_s, s.seed)
        return BalancedHashRouter(e, k, s.seed, pmf)(ids), balance, ()
    logits, probs = _gate_outputs(*work, s.d_model, s.clusters, s.seed, e)
    batch = (s.num_tokens,)
    if key == "deepseek":
        router = DeepSeekV3Router(e, k, s.d_model, s.seed, s.bias_update_speed, s.n_groups,
                                  s.topk_groups, s.route_scale)
        scores = torch.sigmoid(logits)  # one pass, for the bias steps and the final routing
        hist = router.balance_scores(scores, s.deepseek_steps)
        balance = pd.DataFrame([{"step": h.step, "CV": h.cv, "MaxVio": h.max_vio} for h in hist])
        return router.route_scores(scores, batch), balance, ()
    if key == "topk":
        return TopKRouter(e, k, s.d_model, s.seed).route_logits(logits, batch, probs), balance, ()
    if key == "gshard":
        r = GShardRouter(e, k, s.d_model, s.seed, s.capacity_factor,
                         s.gshard_renormalize).route_logits(logits, batch, probs)
        return r, balance, (_gshard_note(r, s.gshard_renormalize),)
    router = _CLASSES[key](e, k, s.d_model, s.seed, s.capacity_factor)
    return router.route_logits(logits, batch, probs), balance, ()


def _gshard_note(r: Routing, renormalized: bool) -> str:
    """What GShard's capacity did to the tokens that kept one of their two experts."""
    one = (r.experts >= 0).sum(dim=1) == 1
    share = float(one.double().mean())
    if not bool(one.any()):
        return "GShard top-2: no token lost one of its two experts to capacity."
    mean_w = float(r.weights[one].sum(dim=1).double().mean())
    rule = ("has its weight renormalised to 1, as in DeepSpeed and fairseq" if renormalized else
            "keeps its weight g/(g1+g2), as in GShard's Algorithm 1 (DeepSpeed and fairseq "
            "renormalise it to 1)")
    return (f"GShard top-2: {share:.1%} of tokens lost one of their two experts to capacity; the "
            f"surviving expert {rule}: mean weight {mean_w:.3f}.")


def route_one(s: LabSettings, key: str) -> LabResult:
    """Route the workload with router `key` and measure it: that router's rows of every table."""
    s = for_router(s, key)
    s.validate()
    r, balance, notes = _route(s, key)
    if r is None:
        return _empty(notes[0])
    e, k, label = s.num_experts, _k_of(key, s), ROUTERS[key]
    counts = expert_utilization(r).cpu()
    total = int(counts.sum())
    if total == 0:
        notes += (f"{label}: no token reached an expert, so its balance metrics are undefined "
                  "(shown as —, not as perfect balance).",)
    mean = float(counts.double().mean())
    # Position of each expert when sorted by load, busiest first (the "sorted" histogram).
    by_load = torch.empty(e, dtype=torch.int64)
    by_load[torch.argsort(counts, descending=True, stable=True)] = torch.arange(e)
    loads = rm.per_rank_load(counts, s.num_ranks)
    metrics = rm.summarize(r, k, s.capacity_factor, s.num_ranks, aux_loss=AUX_LOSS.get(key),
                           null_model=_CLASSES[key].null_model)
    return LabResult(
        counts=pd.DataFrame({"router": label, "expert": range(e), "tokens": counts.numpy(),
                             "load/mean": counts.double().numpy() / mean if total else math.nan,
                             "load rank": by_load.numpy()}),
        metrics=pd.DataFrame([{"router": label, **metrics}]),
        ranks=pd.DataFrame({"router": label, "rank": range(s.num_ranks),
                            "tokens": loads.long().numpy()}),
        balance=balance,
        notes=notes,
    )


def _empty(note: str) -> LabResult:
    return LabResult(pd.DataFrame(columns=_COUNT_COLS), pd.DataFrame(),
                     pd.DataFrame(columns=_RANK_COLS), pd.DataFrame(columns=_BALANCE_COLS), (note,))


def combine(parts: list[LabResult]) -> LabResult:
    """One LabResult from per-router parts, in order."""

    def cat(frames: list[pd.DataFrame], empty: pd.DataFrame) -> pd.DataFrame:
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else empty

    return LabResult(
        counts=cat([p.counts for p in parts], pd.DataFrame(columns=_COUNT_COLS)),
        metrics=cat([p.metrics for p in parts], pd.DataFrame()),
        ranks=cat([p.ranks for p in parts], pd.DataFrame(columns=_RANK_COLS)),
        balance=cat([p.balance for p in parts], pd.DataFrame(columns=_BALANCE_COLS)),
        notes=tuple(n for p in parts for n in p.notes),
    )


def run_lab(s: LabSettings, route: Callable[[LabSettings, str], LabResult] | None = None,
            labels: Mapping[str, str] | None = None) -> LabResult:
    """Generate the workload, route it with every chosen router, and measure each routing.

    route: makes one router's part from for_router(s, key) and key (default route_one; the page
    passes a cached route_one, so a change to one router's settings reruns only that router).
    labels: how errors name the settings (PAGE_LABELS, CLI_FLAGS; default the field names)."""
    s.validate(labels)
    route = route or route_one
    return combine([route(for_router(s, key), key) for key in s.routers])


def settings_dict(s: LabSettings) -> dict[str, object]:
    """The settings as a JSON-ready dict (for downloads and `--json`)."""
    d = asdict(s)
    d["routers"] = list(s.routers)
    d["capacity_slots"] = expert_capacity(s.capacity_factor, s.top_k, s.num_tokens, s.num_experts)
    return d
