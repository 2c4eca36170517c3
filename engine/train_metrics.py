"""The training lab's measurements: per-evaluation histories, final loads, expert specialisation,
the summary table and the plain-language reading of it.

Balance is measured on the validation split at every evaluation (the same tokens for every
router): per MoE layer, tokens per expert -> CV and MaxVio (engine.routing_metrics); drop rate =
share of routed slots a capacity rule dropped; unrouted = share of tokens that reached no expert
(Expert Choice, capacity drops); bias spread = max - min of DeepSeek's per-expert bias.
Results travel as plain dicts (RunHistory.as_dict, the CLI's --json, committed GPU files), and
the tables here read those dicts, so a committed result and a live one look the same.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from engine.routing_metrics import cv, max_vio
from engine.train_data import CLASSES, token_class
from engine.train_model import MoELM, lm_loss


@dataclass
class RunHistory:
    """One router's run at one seed: lists with one entry per evaluation (losses in nats)."""

    router: str
    seed: int
    total_params: int
    active_params: int
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)   # mean since the last evaluation
    val_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)     # mean unweighted aux loss, per layer sum
    tokens_per_s: list[float] = field(default_factory=list)  # training tokens / s since the last
    cv: list[float] = field(default_factory=list)           # mean over MoE layers
    max_vio: list[float] = field(default_factory=list)      # max over MoE layers
    cv_per_layer: list[list[float]] = field(default_factory=list)
    max_vio_per_layer: list[list[float]] = field(default_factory=list)
    drop_rate: list[float] = field(default_factory=list)
    unrouted: list[float] = field(default_factory=list)
    bias_spread: list[float] = field(default_factory=list)  # max over layers of max(b) - min(b)
    stopped: str | None = None
    train_seconds: float = 0.0
    final: dict[str, Any] | None = None

    def record(self, step: int, train_loss: float, aux: float, tokens_per_s: float,
               m: dict[str, Any]) -> None:
        """Append one evaluation (m from eval_metrics)."""
        self.step.append(step)
        self.train_loss.append(train_loss)
        self.val_loss.append(m["val_loss"])
        self.aux_loss.append(aux)
        self.tokens_per_s.append(tokens_per_s)
        cvs = [cv(c) for c in m["counts"]]
        vios = [max_vio(c) for c in m["counts"]]
        self.cv_per_layer.append(cvs)
        self.max_vio_per_layer.append(vios)
        self.cv.append(statistics.fmean(cvs) if cvs else math.nan)
        self.max_vio.append(max(vios) if vios else math.nan)
        routed = sum(float(c.sum()) for c in m["counts"])
        wanted = sum(float(d.sum()) for d in m["demand"])
        self.drop_rate.append(1 - routed / wanted if wanted else math.nan)
        self.unrouted.append(statistics.fmean(m["unrouted"]) if m["unrouted"] else math.nan)
        self.bias_spread.append(m["bias_spread"])

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (NaN stays NaN; the CLI turns it into null)."""
        return asdict(self)


def eval_metrics(model: MoELM, val: torch.Tensor) -> dict[str, Any]:
    """Validation loss over val (n, b, S) windows and each MoE layer's loads summed over them."""
    model.eval()
    routers = model.routers()
    counts = [0] * len(routers)
    demand = [0] * len(routers)
    unrouted = [0.0] * len(routers)
    loss = 0.0
    for ids in val:
        logits, _ = model(ids)
        loss += float(lm_loss(logits, ids))
        for j, r in enumerate(routers):
            loads = r.loads()
            counts[j] = counts[j] + loads["counts"].cpu()
            demand[j] = demand[j] + loads["demand"].cpu()
            unrouted[j] += float(loads["unrouted"]) / len(val)
    model.train()
    spread = [float(r.bias.max() - r.bias.min()) for r in routers if hasattr(r, "bias")]
    return {"val_loss": loss / len(val), "counts": counts, "demand": demand, "unrouted": unrouted,
            "bias_spread": max(spread) if spread else math.nan}


def specialisation(model: MoELM, val: torch.Tensor, strings: tuple[str, ...],
                   top: int = 6) -> dict[str, Any]:
    """Per MoE layer on the val windows: tokens per expert, token class x expert shares (each
    class's routed slots split over experts, rows sum to 1), each expert's most routed tokens."""
    model.eval()
    routers = model.routers()
    e = routers[0].rule.num_experts
    vocab = len(strings)
    mats = [torch.zeros(vocab * e, dtype=torch.float64) for _ in routers]
    for ids in val:
        model(ids)
        flat = ids.reshape(-1).cpu()
        for j, r in enumerate(routers):
            ex = r.last.experts.cpu()
            tok = flat.repeat_interleave(ex.shape[1])
            ex = ex.reshape(-1)
            keep = ex >= 0
            mats[j] += torch.bincount(tok[keep] * e + ex[keep], minlength=vocab * e).double()
    model.train()
    classes = torch.tensor([token_class(s) for s in strings])
    out: dict[str, Any] = {"classes": list(CLASSES), "loads": [], "class_expert": [],
                           "top_tokens": []}
    for m in mats:
        m = m.view(vocab, e)
        out["loads"].append(m.sum(0).tolist())
        ce = torch.zeros(len(CLASSES), e, dtype=torch.float64).index_add_(0, classes, m)
        out["class_expert"].append((ce / ce.sum(1, keepdim=True).clamp(min=1)).tolist())
        vals, idx = m.topk(min(top, vocab), dim=0)  # (top, E)
        out["top_tokens"].append([[strings[int(i)] for i, v in zip(idx[:, x], vals[:, x]) if v > 0]
                                  for x in range(e)])
    return out


def _final(run: dict[str, Any], key: str) -> float:
    vals = run[key]
    return float(vals[-1]) if vals and vals[-1] is not None else math.nan


def summary_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per router (seeds pooled): final validation loss mean and std over seeds,
    perplexity of the mean, final CV / MaxVio / drop rate, median tokens/s, parameters."""
    rows = []
    for router in dict.fromkeys(r["router"] for r in runs):
        rs = [r for r in runs if r["router"] == router]
        finals = [_final(r, "val_loss") for r in rs if not r["stopped"]]
        mean = statistics.fmean(finals) if finals else math.nan
        # Step 0 has no rate and the first interval includes warm-up: skip both if there is more.
        tps = [t for r in rs for t in (r["tokens_per_s"][2:] or r["tokens_per_s"][1:])
               if t is not None and math.isfinite(t)]
        rows.append({
            "router": router, "seeds": len(rs),
            "val loss": mean,
            "val loss std": statistics.stdev(finals) if len(finals) > 1 else math.nan,
            "perplexity": math.exp(mean) if finals else math.nan,
            "train loss": statistics.fmean(_final(r, "train_loss") for r in rs),
            "CV": statistics.fmean(_final(r, "cv") for r in rs),
            "MaxVio": statistics.fmean(_final(r, "max_vio") for r in rs),
            "drop rate": statistics.fmean(_final(r, "drop_rate") for r in rs),
            "unrouted": statistics.fmean(_final(r, "unrouted") for r in rs),
            "tokens/s": statistics.median(tps) if tps else math.nan,
            "total params": rs[0]["total_params"], "active params": rs[0]["active_params"],
            "stopped": "; ".join(r["stopped"] for r in rs if r["stopped"]),
        })
    return pd.DataFrame(rows)


def history_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table: one row per run and evaluation step."""
    keys = ("step", "train_loss", "val_loss", "aux_loss", "tokens_per_s", "cv", "max_vio",
            "drop_rate", "unrouted", "bias_spread")
    rows = [{"router": r["router"], "seed": r["seed"], **{k: r[k][i] for k in keys}}
            for r in runs for i in range(len(r["step"]))]
    return pd.DataFrame(rows, columns=["router", "seed", *keys])


def _pct(a: float, b: float) -> str:
    d = 100 * (a - b) / b
    return f"{abs(d):.1f}% {'above' if d > 0 else 'below'}"


def summary_text(table: pd.DataFrame, steps: int, train_tokens: int) -> str:
    """What the summary table shows, in plain words, with the caveat of scale and seeds."""
    ok = table.dropna(subset=["val loss"])
    if ok.empty:
        return "No run finished: every run stopped early (see the table)."
    loss = dict(zip(ok["router"], ok["val loss"]))
    best = min(loss, key=loss.get)
    parts = [f"Lowest final validation loss: {best} ({loss[best]:.3f} nats)."]
    if "hash" in loss and "topk" in loss:
        close = abs(loss["hash"] - loss["topk"]) / loss["topk"] < 0.01
        parts.append(f"Hash routing on token ids ends {_pct(loss['hash'], loss['topk'])} learned "
                     f"top-k's validation loss{' (within 1%)' if close else ''}.")
    if "dense" in loss:
        moe = {r: v for r, v in loss.items() if not r.startswith("dense")}
        if moe:
            m = min(moe, key=moe.get)
            parts.append(f"The best MoE router ({m}) ends {_pct(moe[m], loss['dense'])} the dense "
                         "FFN with the same active parameters per token.")
    seeds = int(table["seeds"].max())
    spread = table["val loss std"].dropna()
    noise = (f" Across {seeds} seeds the std of the final loss is up to {spread.max():.3f} nats: "
             "differences below about twice that are noise." if len(spread)
             else " With one seed there are no error bars: differences of a few hundredths of a "
                  "nat can flip with another seed.")
    parts.append(f"Caveat: {steps} steps of a small model on {train_tokens:,} training tokens."
                 + noise + " Routers can rank differently at larger scale and longer training.")
    return " ".join(parts)
