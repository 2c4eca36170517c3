"""Mixture-of-experts routers behind one interface: `router(x) -> Routing`.

Token layout: routers flatten the batch shape, so T = B * S tokens in row-major order, and every
result is per token. The seed's API is kept: `HashRouter(num_experts=16)`, `router(x)`,
`load_balance_std(assign)` and `expert_utilization(assign)`.

Routers:
    HashRouter           token ids (Hash Layers, Roller et al. 2021) or hidden states (random-
                         hyperplane LSH); nothing learned.
    BalancedHashRouter   token ids through a table built from token frequencies (greedy, most
                         frequent ids first, each to the least-loaded experts).
    TopKRouter           Mixtral: softmax over E, top-k, renormalise.
    SwitchRouter         Switch Transformer: top-1, capacity ceil(C * T / E), overflow dropped.
    GShardRouter         GShard: top-2 with capacity ceil(C * 2T / E); first choices take slots
                         before any second choice.
    ExpertChoiceRouter   Expert Choice (Zhou et al. 2022): each expert takes its top
                         ceil(C * k * T / E) tokens; a token may get 0 or several experts.
    DeepSeekV3Router     DeepSeek-V3 auxiliary-loss-free balancing: sigmoid scores, a per-expert
                         bias used only for selection, nudged by +-gamma per step.
The learned routers use a seeded random gate projection (D, E) scaled by 1/sqrt(D): nothing is
trained, so they show what the routing rule does to a fixed score distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import lsh_triton
from engine.validation import check_bytes, check_float, check_int

MAX_EXPERTS = 1 << 15  # the id hash reduces 16-bit hash values to an expert (see _reduce)
_MAX_PAIR_BINS = 1 << 22  # _pair_result counts (expert, expert) pairs up to 32 MiB of bins


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
    counts: optional (E,) int64 tokens per expert, filled by routers that get it for free while
        routing; `expert_utilization` returns it instead of counting again. Treat as read-only.
    demand: optional (E,) int64 slots that asked for each expert before the router's own capacity
        drops (apply_capacity fills it); None when the router drops nothing. The Switch aux loss
        and the drop rate count these, as the Switch paper counts the choices before truncation.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    probs: torch.Tensor | None = None
    batch_shape: tuple[int, ...] = ()
    counts: torch.Tensor | None = None
    demand: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """T, the number of routed tokens."""
        return int(self.experts.shape[0])


def expert_utilization(assign: Routing) -> torch.Tensor:
    """Tokens per expert, shape (E,), zeros included (a token counts once per expert it reaches)."""
    if assign.counts is not None:
        return assign.counts
    # Shift by one so empty slots (-1) land in bin 0 and are cut off: no masked copy of experts.
    flat = assign.experts.reshape(-1) + 1
    return torch.bincount(flat, minlength=assign.num_experts + 1)[1:]


def relative_std(counts: torch.Tensor) -> float:
    """std / mean (population std) of a count vector, the CV; 0 if the counts are all 0.
    The one implementation: routing_metrics.cv adds input checks around it."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def load_balance_std(assign: Routing) -> float:
    """Relative std (std / mean, population std) of tokens per expert; 0 is perfect balance."""
    return relative_std(expert_utilization(assign))


def _check_hidden(x: object, d_model: int | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Validate hidden states (..., D); return them as (T, D) and the batch shape."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x (hidden states) must be a float tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x (hidden states) must have shape (..., D), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    if d_model is not None and x.shape[-1] != d_model:
        raise ValueError(f"x must have last dimension d_model = {d_model}, got {x.shape[-1]}")
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


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
    top, experts = top_k(logits, k)
    # Softmax over the k chosen logits written out: torch.softmax over a dim of size k pays a
    # per-row cost (4 ms for 64k rows on CPU, 4x this). top[:, :1] is the row max (sorted).
    e = (top - top[:, :1]).exp()
    weights = e / e.sum(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)
    return Routing(experts, weights, num_experts, probs, (int(logits.shape[0]),))


def expert_capacity(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int) -> int:
    """Slots per expert at capacity factor C: ceil(C * k * T / E) (Switch: k = 1; GShard: k = 2)."""
    c = check_float("capacity_factor", capacity_factor, 0.0, lo_open=True)
    k = check_int("top_k", top_k, 1)
    t = check_int("num_tokens", num_tokens, 1)
    e = check_int("num_experts", num_experts, 1)
    return math.ceil(c * k * t / e)


def apply_capacity(routing: Routing, capacity: int) -> Routing:
    """Drop assignments beyond `capacity` tokens per expert; slot 0 of every token fills first.

    Within a slot, earlier tokens win (GShard and Switch order). Dropped slots get expert -1 and
    weight 0; the surviving weights are not renormalised (as in both papers).
    """
    capacity = check_int("capacity", capacity, 0)
    e = routing.experts
    num_tokens, k = e.shape
    num_experts = routing.num_experts
    # Slot-major order: all first choices (in token order), then all second choices.
    flat = e.t().reshape(-1)
    keys = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(keys, stable=True)
    per_expert = torch.bincount(keys, minlength=num_experts + 1)
    starts = torch.cumsum(per_expert, 0) - per_expert
    rank_sorted = torch.arange(flat.numel(), device=e.device) - starts[keys[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    keep = (flat >= 0) & (rank < capacity)
    keep = keep.view(k, num_tokens).t()
    experts = torch.where(keep, e, -1)
    weights = torch.where(keep, routing.weights, 0.0)
    demand = per_expert[:num_experts]
    return Routing(experts, weights, num_experts, routing.probs, routing.batch_shape,
                   torch.clamp(demand, max=capacity), demand)


def _odd_keys(seed: int, n: int) -> list[int]:
    """`n` seeded random odd 32-bit multipliers (multiply-shift hashing needs odd multipliers)."""
    gen = torch.Generator().manual_seed(seed)
    return [int(v) | 1 for v in torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)]


def _signed64(v: int) -> int:
    """Reinterpret an unsigned 64-bit integer as int64 (torch scalars are signed)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _pair_result(lanes: torch.Tensor, num_experts: int, top_k: int,
                 batch_shape: tuple[int, ...]) -> Routing:
    """Routing from expert ids held as int32 lanes (T, 2) (modified in place): counts, collisions,
    weights. A token whose two slots name the same expert keeps slot 0 only (slot 1 = -1, weight 1).
    """
    num_tokens = lanes.shape[0]
    if top_k == 1:
        experts = lanes[:, :1].long()
        counts = torch.bincount(lanes[:, 0], minlength=num_experts)
        weights = torch.ones(num_tokens, 1, device=lanes.device)
        return Routing(experts, weights, num_experts, None, batch_shape, counts)
    collided = lanes[:, 0] == lanes[:, 1]
    lanes[:, 1].masked_fill_(collided, -1)
    experts = lanes.long()
    # Pair code e0 * (E + 1) + (e1 + 1) straight from the packed int64 e0 + e1 * 2^32 (e1 = -1
    # included): one multiply-add and one shift, in place (lanes are spent), then a single
    # bincount over E * (E + 1) pairs counts both slots, instead of a masked copy and a bincount
    # of all 2T slots. Fresh large buffers are few on purpose: page faults cost as much as a pass.
    code = lanes.view(torch.int64).view(-1)
    if num_experts * (num_experts + 1) <= _MAX_PAIR_BINS:
        code.mul_(_signed64(((num_experts + 1) << 32) | 1)).add_(1 << 32).bitwise_right_shift_(32)
        pairs = torch.bincount(code, minlength=num_experts * (num_experts + 1))
        pairs = pairs.view(num_experts, num_experts + 1)
        counts = pairs.sum(1) + pairs[:, 1:].sum(0)
    else:  # E (E + 1) pair bins would take more memory than the tokens: count the slots directly
        counts = torch.bincount(experts.reshape(-1) + 1, minlength=num_experts + 1)[1:]
    # Weights 1/(experts reached): (0.5, 0.5) or (1, 0), written as one int64 per token holding
    # the two float32 bit patterns, so one pass fills both columns, into the spent code buffer.
    half = int(torch.tensor([0.5, 0.5]).view(torch.int64))
    solo = int(torch.tensor([1.0, 0.0]).view(torch.int64))
    weights = code.fill_(half).masked_fill_(collided, solo).view(torch.float32).view(num_tokens, 2)
    return Routing(experts, weights, num_experts, None, batch_shape, counts)


class HashRouter:
    """Routes each token to at most `top_k` (1 or 2) experts by hashing; nothing is learned.

    Token ids (int, any shape): a fixed random hash of the id (Hash Layers, Roller et al. 2021).
    Hidden states (float, (..., D)): a locality-sensitive hash with random hyperplanes, so similar
    vectors share experts. With top_k=2 the two hashes are independent; when they collide the token
    has one expert and slot 1 is -1. Weights are 1 / (number of experts the token reached).
    The same id (or vector) gets the same experts whatever the batch shape.
    """

    def __init__(self, num_experts: int = 16, top_k: int = 2, seed: int = 0) -> None:
        self.num_experts = check_int("num_experts", num_experts, 1, MAX_EXPERTS)
        self.top_k = check_int("top_k", top_k, 1, 2)
        self.seed = check_int("seed", seed, 0)
        m0, m1, b_lo, b_hi = _odd_keys(self.seed, 4)
        # One int64 multiply-add hashes both slots: the low 32 bits of
        # id * (m1 * 2^32 + m0) + b are (m0 * id + b_lo) mod 2^32, a multiply-add-shift hash
        # (Dietzfelbinger 1996); the high 32 bits are m1 * id plus the carry, a second one.
        self._mult = _signed64((m1 << 32) | m0)
        self._add = _signed64((b_hi << 32) | b_lo)
        self._planes: dict[int, torch.Tensor] = {}  # by d, on the CPU in float32
        self._plane_copies: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route `x`: int token ids of any shape, or float hidden states (..., D)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError("x must not be empty")
        if x.is_floating_point():
            x2, batch_shape = _check_hidden(x)
            return self._lsh(x2, batch_shape)
        if x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            return self._hash_ids(x.reshape(-1), tuple(x.shape))
        raise ValueError(f"x must be integer token ids or float hidden states, got {x.dtype}")

    def _hash_ids(self, ids: torch.Tensor, batch_shape: tuple[int, ...]) -> Routing:
        packed = ids.long().mul(self._mult).add_(self._add)  # (T,) int64, a fresh buffer
        lanes = packed.view(torch.int32).view(-1, 2)  # little-endian: [:, 0] = low 32 bits
        _reduce(lanes, self.num_experts)
        return _pair_result(lanes, self.num_experts, self.top_k, batch_shape)

    def _lsh(self, x: torch.Tensor, batch_shape: tuple[int, ...]) -> Routing:
        # Each slot reads nbits signs of random projections as a binary code; similar vectors
        # fall on the same side of most hyperplanes and so share codes. For E not a power of
        # two, 4 more bits and a multiply-shift reduction give every expert 16 or more codes,
        # its share within 1/16 of the others' (code % E on ceil(log2 E) bits gave the low
        # experts twice the codes of the rest).
        e, nbits = self.num_experts, lsh_bits(self.num_experts)
        exact = nbits == (e - 1).bit_length()  # E a power of two (E >= 2): codes are experts
        d = x.shape[1]
        if d not in self._planes:
            gen = torch.Generator().manual_seed(self.seed + 1)
            planes = torch.randn(d, 2 * nbits, generator=gen)
            # Orthonormal planes (in blocks of d when there are more planes than dimensions):
            # isotropic vectors then give independent, fair sign bits and every code is equally
            # likely; raw Gaussian planes of d = 64 correlate by 0.1-0.3, and E = 64 experts got
            # between 0.3x and 2.4x the mean share of isotropic vectors.
            for i in range(0, planes.shape[1], d):
                planes[:, i:i + d] = torch.linalg.qr(planes[:, i:i + d]).Q
            self._planes[d] = planes
        copy = (d, x.device, x.dtype)
        if copy not in self._plane_copies:  # one per device and dtype, made once
            self._plane_copies[copy] = self._planes[d].to(x.device, x.dtype)
        planes = self._plane_copies[copy]
        # On CUDA one Triton pass over x instead of four torch passes over (T, 2 nbits).
        codes = (lsh_triton.lsh_codes if lsh_triton.available(x) else lsh_codes)(x, planes, nbits)
        # int64: code * E passes 2^31 for E > 8192.
        lanes = codes if exact else (codes.long() * e >> nbits).int()
        return _pair_result(lanes, e, self.top_k, batch_shape)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.topk(k, dim=-1) (values and indices, largest first). On CPU k <= 2 takes one or
    two max passes instead, about half topk's time (64k x 64, k = 2: 24 ms against 47 ms); a
    tie goes to the lower index. The two indices of a row always differ, as topk's do."""
    if k > 2 or scores.device.type != "cpu":
        return scores.topk(k, dim=-1)
    first, index = scores.max(dim=-1, keepdim=True)
    if k == 1:
        return first, index
    second, index2 = scores.scatter(-1, index, float("-inf")).max(dim=-1, keepdim=True)
    # A row with no finite score left after the first pass has its max, -inf, at the lowest
    # index, which can be the first pick's: take the next index then (its score is -inf too).
    index2 = torch.where(index2 == index, (index + 1) % scores.shape[-1], index2)
    return torch.cat([first, second], dim=-1), torch.cat([index, index2], dim=-1)


def lsh_codes(x: torch.Tensor, planes: torch.Tensor, nbits: int) -> torch.Tensor:
    """(T, 2) int32 codes in [0, 2^nbits) of hidden states x (T, D): code s reads the signs of
    x against planes[:, s * nbits:(s + 1) * nbits] (planes (D, 2 nbits) rounded to x's dtype)
    as bits 0 .. nbits - 1. engine.lsh_triton computes the same in one pass on CUDA."""
    signs = (x @ planes.to(x.dtype) > 0).to(torch.int32).view(-1, 2, nbits)
    weights = 1 << torch.arange(nbits, device=x.device, dtype=torch.int32)
    return (signs * weights).sum(dim=2, dtype=torch.int32)


def lsh_bits(num_experts: int) -> int:
    """Hyperplanes per hash slot of HashRouter's LSH: log2 E for E a power of two >= 2, else
    ceil(log2 E) + 4 (see HashRouter._lsh; E = 1 takes 4 bits and maps every code to 0)."""
    e = check_int("num_experts", num_experts, 1)
    bits = (e - 1).bit_length()
    return bits if e > 1 and e & (e - 1) == 0 else bits + 4


def _reduce(lanes: torch.Tensor, num_experts: int) -> torch.Tensor:
    """In place: 32-bit hash values (int32) -> experts in [0, E), from each hash's top 16 bits.

    e = floor(u * E / 2^16) with u = (top 16 bits as signed) + 2^15 in [0, 2^16) (Lemire's
    multiply-shift range reduction, no division; the offset keeps it non-negative in int32).
    For E a power of two this is exactly log2(E) hash bits; otherwise the bias is below E / 2^16.
    """
    return lanes.bitwise_right_shift_(16).add_(32768).mul_(num_experts).bitwise_right_shift_(16)


class BalancedHashRouter:
    """Hash routing from a token-frequency table: most frequent ids first, each to the least-loaded
    experts (greedy, in rounds of E ids); ids outside the table fall back to `HashRouter`.

    `frequencies`: (V,) non-negative counts or probabilities of ids 0..V-1 (e.g. from a training
    sample). Token ids only.
    """

    def __init__(self, num_experts: int, top_k: int, seed: int, frequencies: torch.Tensor) -> None:
        self._fallback = HashRouter(num_experts, top_k, seed)
        self.num_experts, self.top_k = self._fallback.num_experts, self._fallback.top_k
        if not isinstance(frequencies, torch.Tensor) or frequencies.dim() != 1 \
                or frequencies.numel() == 0:
            raise ValueError("frequencies must be a non-empty 1-D tensor of per-id counts")
        if not bool(frequencies.isfinite().all()):
            raise ValueError("frequencies must be finite")
        if bool((frequencies < 0).any()):
            raise ValueError("frequencies must be >= 0")
        self.table = _greedy_table(frequencies.double(), self.num_experts, self.top_k, seed)

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route integer token ids of any shape."""
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() \
                or x.dtype == torch.bool:
            raise ValueError("x must be integer token ids (balanced hashing needs ids, "
                             "not hidden states)")
        if x.numel() == 0:
            raise ValueError("x must not be empty")
        ids = x.reshape(-1).long()
        vocab = self.table.shape[0]
        known = (ids >= 0) & (ids < vocab)
        if self.table.device != ids.device:
            self.table = self.table.to(ids.device)
        lanes = self.table[ids.clamp(0, vocab - 1)]  # (T, 2) int32
        if not bool(known.all()):
            lanes = torch.where(known[:, None], lanes, self._fallback_lanes(ids))
        return _pair_result(lanes.contiguous(), self.num_experts, self.top_k, tuple(x.shape))

    def _fallback_lanes(self, ids: torch.Tensor) -> torch.Tensor:
        fb = self._fallback
        lanes = ids.mul(fb._mult).add_(fb._add).view(torch.int32).view(-1, 2)
        _reduce(lanes, self.num_experts)
        return lanes


def _greedy_table(freq: torch.Tensor, num_experts: int, top_k: int, seed: int,
                  greedy_rounds: int = 64) -> torch.Tensor:
    """(V, 2) int32 expert table: ids by decreasing frequency, in rounds of E items, the heaviest
    item of a round to the currently least-loaded expert (LPT scheduling, vectorised by rounds).

    After `greedy_rounds` rounds the remaining (light) items are dealt in one vectorised snake
    draft over the experts ordered by load (lightest first, then back), as the per-round re-sort
    changes little once items are small. With top_k = 2 each id is two adjacent items of the same
    weight; a round gives every expert at most one item, so both copies of an id land on different
    experts unless a round boundary splits them (odd E). Ties between equally loaded experts are
    broken by a seeded permutation, so the heaviest ids do not all land on the low expert ids
    (which contiguous placement would put on one rank).
    """
    vocab = freq.numel()
    items = torch.argsort(freq, descending=True, stable=True).repeat_interleave(top_k)
    weight = freq[items]
    n_items = items.numel()
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    load = torch.zeros(num_experts, dtype=torch.float64)  # indexed by position in perm
    expert_of_item = torch.empty(n_items, dtype=torch.int64)
    start = 0
    for _ in range(greedy_rounds):
        if start >= n_items:
            break
        stop = min(start + num_experts, n_items)
        lightest = torch.argsort(load, stable=True)[:stop - start]
        expert_of_item[start:stop] = perm[lightest]
        load.index_add_(0, lightest, weight[start:stop])
        start = stop
    if start < n_items:
        order = perm[torch.argsort(load, stable=True)]
        i = torch.arange(n_items - start)
        pos, rnd = i % num_experts, i // num_experts
        expert_of_item[start:] = order[torch.where(rnd % 2 == 0, pos, num_experts - 1 - pos)]
    table = torch.empty(vocab, 2, dtype=torch.int32)
    slots = expert_of_item.view(vocab, top_k).to(torch.int32)
    table[items.view(vocab, top_k)[:, 0]] = slots.expand(vocab, 2) if top_k == 1 else slots
    return table


class _GatedRouter:
    """Shared by the learned routers: a seeded random gate W (D, E), logits = x @ W."""

    min_k, max_k = 1, None

    def __init__(self, num_experts: int, top_k: int, d_model: int, seed: int = 0) -> None:
        self.num_experts = check_int("num_experts", num_experts, 1, MAX_EXPERTS)
        hi = self.num_experts if self.max_k is None else self.max_k
        self.top_k = check_int("top_k", top_k, self.min_k, hi)
        self.d_model = check_int("d_model", d_model, 1, 1 << 16)
        self.seed = check_int("seed", seed, 0)
        check_bytes("gate", 4.0 * self.d_model * self.num_experts)  # float32 (D, E)
        gen = torch.Generator().manual_seed(self.seed + 7919)
        # 1/sqrt(D) keeps logits O(1) for unit-variance inputs, as a trained gate's init would.
        self.gate = torch.randn(self.d_model, self.num_experts, generator=gen) / math.sqrt(d_model)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Gate logits (T, E) for hidden states x (..., D), and x's batch shape."""
        x2, batch_shape = _check_hidden(x, self.d_model)
        return x2 @ self.gate.to(device=x2.device, dtype=x2.dtype), batch_shape


class TopKRouter(_GatedRouter):
    """Mixtral routing: softmax over the E logits, top-k, renormalise (see topk_softmax_route)."""

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route hidden states x (..., D)."""
        logits, batch_shape = self.logits(x)
        r = topk_softmax_route(logits, self.top_k)
        return Routing(r.experts, r.weights, r.num_experts, r.probs, batch_shape)


class _CapacityRouter(_GatedRouter):
    """A gated router whose experts take at most ceil(C * k * T / E) tokens each."""

    def __init__(self, num_experts: int, top_k: int = 1, d_model: int = 64, seed: int = 0,
                 capacity_factor: float = 1.0) -> None:
        super().__init__(num_experts, top_k, d_model, seed)
        self.capacity_factor = check_float("capacity_factor", capacity_factor, 0.0, lo_open=True)


class SwitchRouter(_CapacityRouter):
    """Switch Transformer (Fedus et al. 2021): top-1, gate weight = its softmax probability,
    capacity ceil(C * T / E) per expert, overflow tokens dropped (expert -1) in token order."""

    max_k = 1

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route hidden states x (..., D)."""
        logits, batch_shape = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        weights, experts = top_k(probs, self.top_k)
        cap = expert_capacity(self.capacity_factor, self.top_k, experts.shape[0], self.num_experts)
        return apply_capacity(Routing(experts, weights, self.num_experts, probs, batch_shape), cap)


class GShardRouter(SwitchRouter):
    """GShard (Lepikhin et al. 2020): top-2, weights g1/(g1+g2) and g2/(g1+g2), capacity
    ceil(C * 2T / E) per expert; every token's first choice is placed before any second choice.
    (GShard's random dispatch of weak second choices is left out: routing here is deterministic.)
    """

    min_k = max_k = 2

    def __init__(self, num_experts: int, top_k: int = 2, d_model: int = 64, seed: int = 0,
                 capacity_factor: float = 1.0) -> None:
        super().__init__(num_experts, top_k, d_model, seed, capacity_factor)

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route hidden states x (..., D)."""
        logits, batch_shape = self.logits(x)
        r = topk_softmax_route(logits, self.top_k)
        cap = expert_capacity(self.capacity_factor, self.top_k, r.num_tokens, self.num_experts)
        r = Routing(r.experts, r.weights, r.num_experts, r.probs, batch_shape)
        return apply_capacity(r, cap)


class ExpertChoiceRouter(_CapacityRouter):
    """Expert Choice (Zhou et al. 2022): softmax over E per token, then each expert takes the
    ceil(C * k * T / E) tokens with its highest scores (at most T). Experts are perfectly loaded;
    a token may get 0 or several experts. experts/weights are (T, m), m the most experts any token
    got, padded with -1 / 0; weights are the chosen softmax scores (not renormalised)."""

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route hidden states x (..., D)."""
        logits, batch_shape = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        num_tokens, num_experts = probs.shape
        cap = min(num_tokens, expert_capacity(self.capacity_factor, self.top_k, num_tokens,
                                              num_experts))
        # (E, cap), unordered: the pairs are regrouped by token below. Contiguous rows and no
        # sorting make CPU topk 42 ms instead of 78 at 64k tokens x 64 experts.
        _, tokens = probs.t().contiguous().topk(cap, dim=1, sorted=False)
        # Mark the chosen (expert, token) pairs, then read them back token-major: nonzero() of the
        # (T, E) view lists pairs sorted by token, so no sort is needed to regroup them.
        chosen = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=probs.device)
        chosen.scatter_(1, tokens, True)
        tok, exp = chosen.t().nonzero(as_tuple=True)
        per_token = torch.bincount(tok, minlength=num_tokens)
        starts = torch.cumsum(per_token, 0) - per_token
        col = torch.arange(tok.numel(), device=tok.device) - starts[tok]
        width = max(1, int(per_token.max()))
        experts = torch.full((num_tokens, width), -1, dtype=torch.int64, device=tok.device)
        weights = torch.zeros(num_tokens, width, dtype=probs.dtype, device=tok.device)
        experts[tok, col] = exp
        weights[tok, col] = probs[tok, exp]
        counts = torch.full((num_experts,), cap, dtype=torch.int64, device=tok.device)
        return Routing(experts, weights, num_experts, probs, batch_shape, counts)


@dataclass(frozen=True)
class BalanceStep:
    """One bias update of DeepSeekV3Router: the load before the update (CV and MaxVio)."""

    step: int
    cv: float
    max_vio: float


class DeepSeekV3Router(_GatedRouter):
    """DeepSeek-V3 auxiliary-loss-free balancing (DeepSeek-AI 2024, sec. 2.1.2).

    Scores s = sigmoid(x @ W) (T, E); experts = top-k of s + b, where the per-expert bias b is used
    only for selection; weights = the chosen s renormalised to sum 1. `balance(x, steps)` runs
    `steps` updates b_i += gamma * sign(mean load - load_i), one per batch of tokens, and records
    the load at every step in `history`. (Node-limited routing and the scaling factor are left out.)
    """

    def __init__(self, num_experts: int, top_k: int = 2, d_model: int = 64, seed: int = 0,
                 bias_update_speed: float = 0.001) -> None:
        super().__init__(num_experts, top_k, d_model, seed)
        self.gamma = check_float("bias_update_speed", bias_update_speed, 0.0, 1.0)
        self.bias = torch.zeros(self.num_experts)
        self.history: list[BalanceStep] = []

    def _route_scores(self, scores: torch.Tensor, batch_shape: tuple[int, ...]) -> Routing:
        _, experts = top_k(scores + self.bias.to(scores), self.top_k)
        chosen = scores.gather(1, experts)
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        return Routing(experts, weights, self.num_experts, None, batch_shape, counts)

    def balance(self, x: torch.Tensor, steps: int, batch_tokens: int = 4096) -> list[BalanceStep]:
        """Run `steps` bias updates, each on the next `batch_tokens` tokens of x (..., D) (cycling,
        as training steps see new batches); returns the history: the batch's load before each
        update, steps + 1 entries (the last is measured after the final update)."""
        steps = check_int("steps", steps, 0, 10_000)
        batch_tokens = check_int("batch_tokens", batch_tokens, 1)
        logits, batch_shape = self.logits(x)
        scores = torch.sigmoid(logits)  # the gate is fixed, so the scores are computed once
        num_tokens = scores.shape[0]
        batch = min(batch_tokens, num_tokens)
        offsets = torch.arange(batch, device=scores.device)
        self.history = []
        for step in range(steps + 1):
            rows = (offsets + step * batch) % num_tokens
            counts = self._route_scores(scores[rows], (batch,)).counts.double()
            mean = counts.mean()
            self.history.append(BalanceStep(step, relative_std(counts),
                                            float(counts.max() / mean - 1)))
            if step < steps:
                self.bias += self.gamma * torch.sign(mean - counts).float().cpu()
        return self.history

    def __call__(self, x: torch.Tensor) -> Routing:
        """Route hidden states x (..., D) with the current bias."""
        logits, batch_shape = self.logits(x)
        return self._route_scores(torch.sigmoid(logits), batch_shape)
