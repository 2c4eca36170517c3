"""The training-step view: attention time per step, forward and backward, for a model's shape.

From forward+backward rows (measured here or committed): per backend, one layer's time at the
model's (batch, seqlen, heads, head dim), times the layer count. A row at exactly that shape is
used as measured; otherwise the nearest row with the same seqlen, head dim and masking is scaled
by B*H_q (attention FLOPs and memory grow linearly in it at fixed seqlen and head dim). K/V heads
change only K/V traffic, not FLOPs: rows are matched without them, and the view says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from engine.validation import check_int

DEFAULT_SDPA = "sdpa"  # SDPA's own backend choice: what a model calling F.scaled_dot_product_attention gets


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a decoder: batch, seqlen, query heads, kv heads, head dim, layers."""

    batch: int = 1
    seqlen: int = 8192
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 32
    causal: bool = True

    def checked(self) -> "ModelShape":
        """Self if every field is in range, else ValueError naming the field as the page labels it."""
        check_int("Batch", self.batch, 1, 4096)
        check_int("Sequence length", self.seqlen, 16, 131072)
        check_int("Heads", self.heads, 1, 1024)
        check_int("KV heads", self.kv_heads, 1, self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"KV heads must divide Heads ({self.heads}), got {self.kv_heads}")
        check_int("Head dim", self.head_dim, 8, 256)
        check_int("Layers", self.layers, 1, 1000)
        return self


def training_view(table: pd.DataFrame, model: ModelShape) -> pd.DataFrame:
    """Per backend: ms per layer and per step (fwd+bwd), peak extra MiB per layer, speed-up and
    memory against SDPA's default choice, and whether the row was measured at this shape or scaled.

    `table` holds forward+backward rows (attention_bench columns). Empty if no row matches the
    model's seqlen, head dim and causality.
    """
    model = model.checked()
    ok = table[(table["status"] == "ok") & (table["seqlen"] == model.seqlen) & (table["head_dim"] == model.head_dim)
               & (table["causal"] == model.causal) & (table["mask"].fillna("none") == "none")]
    cols = ["backend", "ms_per_layer", "ms_per_step", "peak_mib_per_layer", "speedup_vs_default",
            "memory_vs_default", "best", "source"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    work = model.batch * model.heads
    rows = []
    for backend, group in ok.groupby("backend", sort=False):
        row_work = group["batch"] * group["heads"]
        r = group.loc[(row_work - work).abs().idxmin()]
        scale = work / (r["batch"] * r["heads"])
        same = r["batch"] == model.batch and r["heads"] == model.heads
        source = "measured at this B and H" if same else f"x{scale:.3g} from B={r['batch']}, H={r['heads']}"
        rows.append({"backend": backend, "ms_per_layer": r["ms"] * scale,
                     "peak_mib_per_layer": r["peak_extra_mib"] * scale,
                     "source": source})
    view = pd.DataFrame(rows)
    view["ms_per_step"] = view["ms_per_layer"] * model.layers
    default = view[view["backend"] == DEFAULT_SDPA]
    base_ms = default["ms_per_layer"].iloc[0] if not default.empty else float("nan")
    base_mib = default["peak_mib_per_layer"].iloc[0] if not default.empty else float("nan")
    view["speedup_vs_default"] = base_ms / view["ms_per_layer"]
    view["memory_vs_default"] = view["peak_mib_per_layer"] / base_mib
    view["best"] = view["ms_per_layer"] == view["ms_per_layer"].min()
    return view.sort_values("ms_per_layer").reset_index(drop=True)[cols]


def model_sweep_fields(model: ModelShape) -> dict:
    """SweepSettings fields that time exactly this model's attention shape, forward and backward."""
    model = model.checked()
    return {"seqlens": (model.seqlen,), "head_dims": (model.head_dim,), "causal": (model.causal,),
            "gqa": (model.heads // model.kv_heads,), "tokens": model.batch * model.seqlen,
            "hidden": model.heads * model.head_dim, "mode": "fwd+bwd", "masks": ()}
