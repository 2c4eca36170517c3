"""Hash routers: nothing learned. Token ids go through a fixed random hash (Hash Layers, Roller
et al. 2021) or a frequency-balanced table; hidden states through random-hyperplane LSH.
Each token reaches k independent hash slots (k = 1 or 2), so the uniform null CV is
sqrt((E - 1) / (k T)) (routing_metrics.null_cv)."""

from __future__ import annotations

import torch

from engine import lsh_triton
from engine.routing_core import Routing, RouterMetrics, bincount, check_hidden
from engine.validation import check_int

MAX_EXPERTS = 1 << 15  # the id hash reduces 16-bit hash values to an expert (see _reduce)
_MAX_PAIR_BINS = 1 << 22  # _pair_result counts (expert, expert) pairs up to 32 MiB of bins


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
        counts = bincount(lanes[:, 0], num_experts)
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
        pairs = bincount(code, num_experts * (num_experts + 1))
        pairs = pairs.view(num_experts, num_experts + 1)
        counts = pairs.sum(1) + pairs[:, 1:].sum(0)
    else:  # E (E + 1) pair bins would take more memory than the tokens: count the slots directly
        counts = bincount(experts.reshape(-1) + 1, num_experts + 1)[1:]
    # Weights 1/(experts reached): (0.5, 0.5) or (1, 0), written as one int64 per token holding
    # the two float32 bit patterns, so one pass fills both columns, into the spent code buffer.
    half = int(torch.tensor([0.5, 0.5]).view(torch.int64))
    solo = int(torch.tensor([1.0, 0.0]).view(torch.int64))
    weights = code.fill_(half).masked_fill_(collided, solo).view(torch.float32).view(num_tokens, 2)
    return Routing(experts, weights, num_experts, None, batch_shape, counts)


class HashRouter(RouterMetrics):
    """Routes each token to at most `top_k` (1 or 2) experts by hashing; nothing is learned.

    Token ids (int, any shape): a fixed random hash of the id (Hash Layers, Roller et al. 2021).
    Hidden states (float, (..., D)): a locality-sensitive hash with random hyperplanes, so similar
    vectors share experts. With top_k=2 the two hashes are independent; when they collide the token
    has one expert and slot 1 is -1. Weights are 1 / (number of experts the token reached).
    The same id (or vector) gets the same experts whatever the batch shape.
    """

    null_model = "independent"  # k independent slots (routing_metrics.null_cv)

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
            x2, batch_shape = check_hidden(x)
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


class BalancedHashRouter(RouterMetrics):
    """Hash routing from a token-frequency table: most frequent ids first, each to the least-loaded
    experts (greedy, in rounds of E ids); ids outside the table fall back to `HashRouter`.

    `frequencies`: (V,) non-negative counts or probabilities of ids 0..V-1 (e.g. from a training
    sample). Token ids only.
    """

    null_model = "independent"

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
        # On CUDA the fallback hash is cheaper than asking whether it is needed (a host sync).
        if ids.is_cuda or not bool(known.all()):
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


