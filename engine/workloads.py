"""Seeded token workloads for the routing lab: token ids and hidden states.

Token ids: uniform or Zipf(s) over a vocabulary of V ids. Real text is Zipf-like (the r-th most
frequent word has frequency proportional to r^-s, s close to 1), which is what makes hash routing
unbalanced: one very frequent id sends all its tokens to the same experts. The rank -> id map is a
seeded permutation, so frequent ids are not simply the small ones.
Hidden states (T, D) float32: Gaussian N(0, I), or clustered: a mixture of c Gaussians with unit
centres and per-cluster noise, so similar tokens exist (what an LSH router keys on).
Id workloads also give hidden states for the learned routers: a seeded embedding table (V, D),
so a frequent id is a frequent vector, as in a model's first layer.
"""

from __future__ import annotations

import torch

from engine.validation import check_bytes, check_choice, check_float, check_int

ID_KINDS = ("uniform", "zipf")
HIDDEN_KINDS = ("gaussian", "clustered")
KINDS = ID_KINDS + HIDDEN_KINDS
MAX_TOKENS = 1 << 22  # 4M tokens
MAX_VOCAB = 1 << 21


def zipf_pmf(vocab_size: int, s: float) -> torch.Tensor:
    """Zipf probabilities (V,) float64 of frequency ranks 1..V: p_r = r^-s / sum_j j^-s."""
    v = check_int("vocab_size", vocab_size, 1, MAX_VOCAB)
    s = check_float("zipf_s", s, 0.0, 4.0)
    w = torch.arange(1, v + 1, dtype=torch.float64).pow(-s)
    return w / w.sum()


def id_pmf(kind: str, vocab_size: int, s: float = 1.0, seed: int = 0) -> torch.Tensor:
    """The probability of each token id 0..V-1 (V,) float64 under workload `kind`."""
    check_choice("workload", kind, ID_KINDS)
    v = check_int("vocab_size", vocab_size, 1, MAX_VOCAB)
    if kind == "uniform":
        return torch.full((v,), 1.0 / v, dtype=torch.float64)
    pmf = torch.empty(v, dtype=torch.float64)
    pmf[_rank_to_id(v, seed)] = zipf_pmf(v, s)
    return pmf


def _rank_to_id(vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
    return torch.randperm(vocab_size, generator=gen)


def token_ids(kind: str, num_tokens: int, vocab_size: int, s: float = 1.0,
              seed: int = 0) -> torch.Tensor:
    """Token ids (T,) int64 in [0, V): uniform, or Zipf(s) by inverse-CDF sampling."""
    check_choice("workload", kind, ID_KINDS)
    t = check_int("num_tokens", num_tokens, 1, MAX_TOKENS)
    v = check_int("vocab_size", vocab_size, 1, MAX_VOCAB)
    check_bytes("token ids", 16.0 * t + 16.0 * v)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0) + 1)
    if kind == "uniform":
        return torch.randint(0, v, (t,), generator=gen)
    cdf = torch.cumsum(zipf_pmf(v, s), 0)
    u = torch.rand(t, generator=gen, dtype=torch.float64) * cdf[-1]
    ranks = torch.searchsorted(cdf, u, right=True).clamp_(max=v - 1)
    return _rank_to_id(v, seed)[ranks]


def embed(ids: torch.Tensor, vocab_size: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """Hidden states (T, D) float32 for ids (T,): rows of a seeded N(0, 1) table (V, D)."""
    v = check_int("vocab_size", vocab_size, 1, MAX_VOCAB)
    d = check_int("d_model", d_model, 1, 4096)
    check_bytes("embedding", 4.0 * (v + ids.numel()) * d)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0) + 2)
    table = torch.randn(v, d, generator=gen)
    return table[ids]


def hidden_states(kind: str, num_tokens: int, d_model: int, clusters: int = 8,
                  seed: int = 0) -> torch.Tensor:
    """Hidden states (T, D) float32: N(0, I), or a mixture of `clusters` Gaussians.

    Clustered: centres N(0, I); each token picks a cluster uniformly and adds N(0, 0.5^2 I)
    noise, so tokens of one cluster are close (cosine ~0.9) and clusters are far apart.
    """
    check_choice("workload", kind, HIDDEN_KINDS)
    t = check_int("num_tokens", num_tokens, 1, MAX_TOKENS)
    d = check_int("d_model", d_model, 1, 4096)
    c = check_int("clusters", clusters, 1, 4096)
    check_bytes("hidden states", 8.0 * t * d)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0) + 3)
    if kind == "gaussian":
        return torch.randn(t, d, generator=gen)
    centres = torch.randn(c, d, generator=gen)
    which = torch.randint(0, c, (t,), generator=gen)
    return centres[which].add_(torch.randn(t, d, generator=gen), alpha=0.5)
