"""Masks people train decoders with, each causal: sliding windows, packed documents, softcap.

- "causal": query i sees keys 0..i.
- "window-<w>" (e.g. "window-1k", "window-4096"): query i sees keys i-w..i, Mistral/FA's
  window_size (w, 0).
- "documents": packed sequences; each batch row is cut into documents at random boundaries
  (seeded, about one per 1024 tokens, at least two) and query i sees keys of its own document up to i.
- "softcap": causal, scores become 50 * tanh(scores / 50) (Gemma 2's attention softcap).

`kept_pairs` counts the (query, key) pairs a mask keeps, exactly, so TFLOP/s counts only work
that is not masked.
"""

from __future__ import annotations

import torch

from engine.validation import check_int

MASKS = ("causal", "window-1k", "window-4k", "documents", "softcap")
SOFTCAP = 50.0
DOC_TOKENS = 1024  # mean document length of the "documents" mask


def window_of(mask: str) -> int | None:
    """The window w of "window-<w>" ("1k" = 1024), None for other masks; ValueError if malformed."""
    if not mask.startswith("window-"):
        return None
    text = mask.removeprefix("window-").lower()
    scale = 1024 if text.endswith("k") else 1
    try:
        w = int(text.removesuffix("k")) * scale
    except ValueError:
        raise ValueError(f"mask window must be an integer like window-1024 or window-4k, got {mask!r}") from None
    return check_int("mask window", w, 1, 131072)


def check_mask(mask: str) -> str:
    """Return `mask` if it names a mask (see MASKS; any window-<w> with w >= 1), else ValueError."""
    if mask in MASKS or window_of(mask) is not None:
        return mask
    raise ValueError(f"mask must be one of {', '.join(MASKS)} or window-<w>, got {mask!r}")


def mask_unfit(mask: str, seqlen: int) -> str | None:
    """Why `mask` makes no sense at `seqlen` (a window reaching past the sequence), else None."""
    w = window_of(mask)
    if w is not None and w >= seqlen - 1:
        return f"window {w} covers the whole sequence ({seqlen} tokens): the same as the causal row"
    return None


def doc_lengths(seqlen: int, batch: int, seed: int) -> list[list[int]]:
    """Per batch row, the lengths of its documents (random cuts, one per DOC_TOKENS tokens, >= 2 documents)."""
    gen = torch.Generator().manual_seed(seed)
    cuts_per_row = max(2, seqlen // DOC_TOKENS) - 1
    rows = []
    for _ in range(batch):
        cuts = sorted(torch.randperm(seqlen - 1, generator=gen)[:cuts_per_row].add(1).tolist())
        edges = [0, *cuts, seqlen]
        rows.append([b - a for a, b in zip(edges, edges[1:])])
    return rows


def kept_pairs(mask: str, seqlen: int, batch: int, seed: int = 0) -> int:
    """(query, key) pairs the mask keeps, summed over the batch (per head)."""
    causal = seqlen * (seqlen + 1) // 2
    w = window_of(mask)
    if w is not None:  # query i keeps min(i, w) + 1 keys
        w = min(w, seqlen - 1)
        return batch * (causal - (seqlen - 1 - w) * (seqlen - w) // 2)
    if mask == "documents":
        return sum(n * (n + 1) // 2 for row in doc_lengths(seqlen, batch, seed) for n in row)
    return batch * causal


def document_ids(seqlen: int, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    """(B, S) int32: the document each token belongs to (doc_lengths' documents)."""
    rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in doc_lengths(seqlen, batch, seed)]
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def dense_mask(mask: str, q_pos: torch.Tensor, k_pos: torch.Tensor, doc: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Boolean keep-mask (..., len(q_pos), len(k_pos)) for query/key positions; doc: (B, S) ids."""
    qi, ki = q_pos[:, None], k_pos[None, :]
    keep = ki <= qi
    w = window_of(mask)
    if w is not None:
        keep = keep & (qi - ki <= w)
    if mask == "documents":
        keep = keep & (doc[:, q_pos][:, :, None] == doc[:, k_pos][:, None, :])
    return keep


def flex_mods(mask: str, doc: torch.Tensor | None):
    """FlexAttention (mask_mod, score_mod) for `mask`; score_mod is None except for softcap."""
    w = window_of(mask)

    def causal(b, h, qi, ki):
        return qi >= ki

    if w is not None:
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki <= w)
    elif mask == "documents":
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc[b, qi] == doc[b, ki])
    else:
        mask_mod = causal
    if mask != "softcap":
        return mask_mod, None

    def softcap(score, b, h, qi, ki):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    return mask_mod, softcap


def cu_seqlens(seqlen: int, batch: int, seed: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Cumulative document offsets over the flattened (B*S) tokens, int32, and the longest document."""
    lengths = [n for row in doc_lengths(seqlen, batch, seed) for n in row]
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    return cu, max(lengths)
