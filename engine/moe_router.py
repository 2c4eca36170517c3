"""Mixture-of-experts routers behind one interface: `router(x) -> Routing`.

Token layout: routers flatten the batch shape, so T = B * S tokens in row-major order, and every
result is per token. The seed's API is kept: `HashRouter(num_experts=16)`, `router(x)`,
`load_balance_std(assign)` and `expert_utilization(assign)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.validation import check_int

# Odd 63-bit multipliers (from the splitmix64 constants) for the multiplicative hash of token ids.
_MIX = (0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB)


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to.

    experts: (T, k) int64 expert ids; -1 marks an empty slot (hash collision, dropped at capacity,
        or padding when tokens get different numbers of experts, as in Expert Choice).
    weights: (T, k) float32 gate weights, 0 where experts == -1.
    num_experts: E.
    probs: (T, E) float32 router probabilities, for routers that have them (else None); used by the
        Switch auxiliary loss.
    batch_shape: the leading shape of the input, e.g. (B, S), so results can be reshaped back.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    probs: torch.Tensor | None = None
    batch_shape: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """T, the number of routed tokens."""
        return int(self.experts.shape[0])


def expert_utilization(assign: Routing) -> torch.Tensor:
    """Tokens per expert, shape (E,), zeros included (a token counts once per expert it reaches)."""
    flat = assign.experts.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=assign.num_experts)


def load_balance_std(assign: Routing) -> float:
    """Relative standard deviation (std / mean, population std) of tokens per expert; 0 is perfect."""
    counts = expert_utilization(assign).double()
    mean = counts.mean()
    return float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0


class HashRouter:
    """Routes each token to at most `top_k` (1 or 2) experts by hashing; nothing is learned.

    Token ids (int, any shape): a fixed random hash of the id (Hash Layers, Roller et al. 2021).
    Hidden states (float, (..., D)): a locality-sensitive hash with random hyperplanes, so similar
    vectors share experts. With top_k=2 the two hashes are independent; when they collide the token
    has one expert and slot 1 is -1. Weights are 1 / (number of experts the token reached).
    """

    def __init__(self, num_experts: int = 16, top_k: int = 2, seed: int = 0) -> None:
        self.num_experts = check_int("num_experts", num_experts, 1, 1 << 20)
        self.top_k = check_int("top_k", top_k, 1, 2)
        self.seed = check_int("seed", seed, 0)
        gen = torch.Generator().manual_seed(self.seed)
        # Per-slot additive keys, so each slot is an independent hash of the same id.
        self._keys = torch.randint(0, 2**62, (self.top_k,), generator=gen).tolist()
        self._planes: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route `x`: int token ids of any shape, or float hidden states (..., D)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError("x must not be empty")
        if x.is_floating_point():
            if x.dim() < 2:
                raise ValueError(f"x (hidden states) must have shape (..., D), got {tuple(x.shape)}")
            batch_shape = tuple(x.shape[:-1])
            slots = self._lsh(x.reshape(-1, x.shape[-1]))
        elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            batch_shape = tuple(x.shape)
            slots = self._hash_ids(x.reshape(-1).long())
        else:
            raise ValueError(f"x must be integer token ids or float hidden states, got {x.dtype}")
        experts = torch.stack(slots, dim=1)
        if self.top_k == 2:
            experts[:, 1].masked_fill_(experts[:, 1] == experts[:, 0], -1)
        valid = experts >= 0
        weights = valid.float() / valid.sum(dim=1, keepdim=True).float()
        return Routing(experts, weights, self.num_experts, None, batch_shape)

    def _hash_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        # Multiply-shift hashing on wrapping int64: mix the id with a slot key, keep high bits.
        out = []
        for key in self._keys:
            h = (ids ^ key) * _MIX[0]
            h = (h ^ (h >> 31)) * _MIX[1]
            out.append(((h >> 33) & 0x7FFFFFFF) % self.num_experts)
        return out

    def _lsh(self, x: torch.Tensor) -> list[torch.Tensor]:
        nbits = max(1, (self.num_experts - 1).bit_length())
        d = x.shape[1]
        if d not in self._planes:
            gen = torch.Generator().manual_seed(self.seed + 1)
            self._planes[d] = torch.randn(d, self.top_k * nbits, generator=gen)
        planes = self._planes[d].to(device=x.device, dtype=x.dtype)
        bits = (x @ planes > 0).long().view(-1, self.top_k, nbits)
        codes = (bits << torch.arange(nbits, device=x.device)).sum(dim=2)
        return [codes[:, s] % self.num_experts for s in range(self.top_k)]


def topk_softmax_route(logits: torch.Tensor, k: int) -> Routing:
    """Mixtral's rule on gate logits (T, E): softmax over E, keep the top k, renormalise to sum 1.

    Differentiable: the weights are softmax(logits) restricted to the chosen experts and
    renormalised, which equals a softmax over the k chosen logits, so autograd reaches `logits`.
    Returns experts (T, k) int64, weights (T, k) in the logits' float dtype, probs (T, E).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a float tensor of shape (T, E), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if logits.shape[0] == 0:
        raise ValueError("logits must have at least one token (T >= 1)")
    num_experts = int(logits.shape[1])
    k = check_int("k", k, 1, num_experts)
    # top-k of the logits equals top-k of the softmax (monotone), and the renormalised weights are
    # a softmax over the k chosen logits: no (T, E) division or second pass over the probs.
    top, experts = logits.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return Routing(experts, weights, num_experts, probs, (int(logits.shape[0]),))
