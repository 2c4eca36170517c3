"""One expert-parallel layer's settings as plain values: fields and defaults (EPFields), limits,
router names.

Stdlib only, so `python -m engine dispatch --help` states them without importing torch;
engine.ep_settings.EPSettings adds the checks and the batches.
"""

from __future__ import annotations

from dataclasses import dataclass

# Engine routers by key (as in the routing lab); hash routes token ids, the gated ones a token
# feature. Switch and GShard apply their capacity per rank's batch (capacity factor 1).
ROUTERS = ("hash", "topk", "switch", "gshard", "expert_choice")
# Experts per token allowed by router; the others take 1 to MAX_TOP_K.
K_RANGE = {"hash": (1, 2), "switch": (1, 1), "gshard": (2, 2)}
# Limits of EPSettings, which the page's inputs share.
MAX_EXPERTS, MAX_RANKS, MAX_TOP_K, MAX_TOKENS = 4096, 1024, 8, 1 << 20
MAX_D_MODEL = 65536
MAX_ZIPF = 3.0
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class EPFields:
    """One expert-parallel layer: experts on ranks, tokens per rank, payload width and dtype."""

    experts: int = 64
    ranks: int = 4
    top_k: int = 2
    tokens: int = 4096  # per rank
    d_model: int = 4096
    dtype: str = "bf16"
    placement: str = "contiguous"
    replicas: int = 0  # extra physical experts for hot ones; greedy placement only
    router: str = "hash"
    zipf: float = 1.0  # exponent of the token-id distribution; 0 is uniform
    hot_share: float = 0.0  # share of tokens whose first slot is forced to expert 0
    seed: int = 0
