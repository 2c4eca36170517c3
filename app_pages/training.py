"""MoE training lab: train a small MoE language model once per router and compare the curves.
Thin: widgets (bound to the URL) -> TrainSettings -> engine.train_loop.train -> figures/tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
import torch

from app_pages._ui import download_buttons, guarded, line_figure, refused, table as show_table
from engine.commands.train import shell_command
from engine.train_data import TEXTS, TOKENIZERS, builtin_text, decode_upload, tokenize
from engine.attention_estimate import format_seconds
from engine.train_fields import BPE_VOCAB, LIMITS, ROUTERS
from engine.train_loop import TrainSettings, estimate_seconds, resolve_device, train
from engine.train_metrics import history_table

QP = "query-params"
D = TrainSettings()
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BALANCE = {"cv": "CV of tokens per expert (mean over layers)",
           "max_vio": "MaxVio (max over layers)", "drop_rate": "drop rate (capacity)",
           "unrouted": "tokens reaching no expert", "aux_loss": "aux loss (sum over layers)",
           "bias_spread": "DeepSeek bias spread (max - min)", "tokens_per_s": "training tokens/s"}


@st.cache_resource
def _store() -> dict:
    """Finished runs of this server, keyed by (settings, text hash): rerunning shows them at once."""
    return {}


def _settings() -> tuple[TrainSettings, str]:
    """Read the widgets into TrainSettings and the data choice ("pydoc", "stdlib", "upload")."""
    routers = st.multiselect("Routers", list(ROUTERS), default=list(D.routers), key="routers",
                             bind=QP, help="hash: token ids (Hash Layers); balanced_hash: a table "
                             "from token frequencies; topk: softmax top-k + load-balancing loss "
                             "(alpha); switch: top-1 with capacity + aux loss; expert_choice: each "
                             "expert picks its tokens from the whole batch (so it sees later "
                             "tokens: not causal, its loss is optimistic); deepseek: bias balancing, no aux loss; "
                             "dense: FFN of k x expert width (same active parameters); "
                             "dense_total: FFN of E x expert width (same total).")
    # Inputs aligned at the bottom: a label that wraps in its column must not push its box down.
    c = st.columns(6, vertical_alignment="bottom")
    experts = c[0].number_input("Experts E", *LIMITS["experts"], D.experts, key="E", bind=QP)
    k = c[1].number_input("Experts per token k", 1, LIMITS["experts"][1], D.k, key="k", bind=QP,
                          help="hash routers: 1 or 2; Switch is always top-1")
    layers = c[2].number_input("Layers", *LIMITS["layers"], D.layers, key="layers", bind=QP)
    d_model = c[3].number_input("d_model", *LIMITS["d_model"], D.d_model, step=16, key="d", bind=QP)
    steps = c[4].number_input("Steps", *LIMITS["steps"], D.steps, step=20, key="steps", bind=QP)
    batch = c[5].number_input("Batch (sequences)", *LIMITS["batch"], D.batch, key="batch", bind=QP)
    c = st.columns(6, vertical_alignment="bottom")
    seq_len = c[0].number_input("Sequence length", *LIMITS["seq_len"], D.seq_len, step=16, key="seq",
                                bind=QP)
    alpha = c[1].number_input("Aux loss weight alpha", *LIMITS["alpha"], D.alpha, step=0.005,
                              format="%.3f", key="alpha", bind=QP)
    capacity = c[2].number_input("Capacity factor C", *LIMITS["capacity"], D.capacity, step=0.25,
                                 key="C", bind=QP)
    gamma = c[3].number_input("DeepSeek-V3 bias update speed", *LIMITS["gamma"], D.gamma, step=0.005,
                              format="%.3f", key="gamma", bind=QP,
                              help="gamma: each expert's selection bias moves by +-gamma a step")
    lr = c[4].number_input("Learning rate", *LIMITS["lr"], D.lr, step=1e-3, format="%g", key="lr",
                           bind=QP)
    seeds = c[5].text_input("Seeds", "0", key="seeds", bind=QP, help="comma-separated, e.g. 0,1,2")
    with st.expander("Data and model details"):
        c = st.columns(6, vertical_alignment="bottom")
        data = c[0].selectbox("Data", TEXTS + ("upload",), key="data", bind=QP,
                              help="pydoc: the Python reference manual (ships with Python); "
                                   "stdlib: the standard library's sources (5 MB); upload: your "
                                   "UTF-8 .txt")
        tok = c[1].selectbox("Tokenizer", TOKENIZERS, key="tok", bind=QP)
        vocab = c[2].number_input("BPE vocabulary", *BPE_VOCAB, D.vocab, step=256, key="V",
                                  bind=QP)
        d_expert = c[3].number_input("Expert width", *LIMITS["d_expert"], D.d_expert, step=32, key="dff",
                                     bind=QP)
        every = c[4].number_input("MoE every n-th layer", 1, LIMITS["layers"][1], D.moe_every, key="every",
                                  bind=QP)
        pos = c[5].selectbox("Positions", ("rope", "learned"), key="pos", bind=QP)
    try:
        seed_list = tuple(int(v) for v in seeds.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"Seeds must be comma-separated integers, got {seeds!r}") from None
    s = TrainSettings(routers=tuple(routers), data=data, tokenizer=tok, vocab=int(vocab),
                      d_model=int(d_model), layers=int(layers), experts=int(experts), k=int(k),
                      d_expert=int(d_expert), moe_every=int(every), positions=pos,
                      steps=int(steps), batch=int(batch), seq_len=int(seq_len), lr=float(lr),
                      eval_every=min(LIMITS["eval_every"][1], max(1, int(steps) // 6)), alpha=float(alpha),
                      capacity=float(capacity), gamma=float(gamma), seeds=seed_list)
    return s, data


CPU_LIMIT_S = 600.0  # a run estimated longer on a CPU is refused: the app is shared


def _within_limit(s: TrainSettings, corpus) -> float:
    """The run's estimated seconds; ValueError with the estimate if a CPU run would pass CPU_LIMIT_S."""
    total, step = estimate_seconds(s, corpus)
    runs = len(s.routers) * len(s.seeds)
    if resolve_device(s.device).type == "cpu" and total > CPU_LIMIT_S:
        raise ValueError(f"This run would take about {format_seconds(total)} on this CPU "
                         f"({runs} run{'s' if runs > 1 else ''} of {s.steps:,} Steps at {1e3 * step:.0f} ms "
                         f"a step, timed now), over the page's {format_seconds(CPU_LIMIT_S)}: lower Steps, "
                         "Batch, Experts E or the routers, or run it from a shell (the command above)")
    return total


def _curves(history: pd.DataFrame, metric: str, height: int = 340):
    """metric against step per router (history_table's rows); over several seeds the mean with
    +- 1 std bars."""
    hist = history.dropna(subset=[metric])
    label = BALANCE.get(metric, metric.replace("_", " "))
    std = None
    if hist["seed"].nunique() > 1:
        hist = (hist.groupby(["router", "step"], sort=False)[metric].agg(["mean", "std"])
                .reset_index().rename(columns={"mean": metric}))
        label, std = f"{label} ± std", "std"  # points: mean over seeds (the page's caption)
    fig = line_figure(hist, "step", metric, "router", markers=True, error_y=std,
                      labels={metric: label, "router": ""}, height=height, margin={"t": 10, "b": 10})
    steps = sorted(hist["step"].unique())
    if metric.endswith("loss") and len(steps) > 2:  # the step-0 loss would flatten the rest
        top = hist.loc[hist["step"] == steps[1], metric].max()
        fig.update_yaxes(range=[hist[metric].min() * 0.97, top * 1.03])
    return fig


@st.fragment
def _balance(history: pd.DataFrame, name: str) -> None:
    """The balance chart; its metric control reruns only this fragment."""
    metric = st.selectbox("Balance metric", list(BALANCE), format_func=BALANCE.get, key=f"{name}_metric")
    if history[metric].notna().any():
        st.plotly_chart(_curves(history, metric), width="stretch", key=f"{name}_bal")
    else:
        st.caption("No run has this metric (dense runs have no experts).")


def _show(doc: dict, name: str) -> None:
    """Curves, summary, loads and specialisation of one result document (live or committed)."""
    runs = doc["runs"]
    history = history_table(runs)
    st.info(doc["summary_text"])
    if any(r["router"] == "expert_choice" for r in runs):
        st.warning("Expert Choice's loss is optimistic, not comparable with the others: each expert "
                   "picks its tokens from the whole batch, so a token's routing depends on later "
                   "tokens, which a causal language model must not see.")
    if history["seed"].nunique() > 1:
        st.caption(f"Curves: mean over {history['seed'].nunique()} seeds; bars: ± 1 std.")
    c1, c2 = st.columns(2)
    c1.markdown("**Validation loss (nats)**")
    c1.plotly_chart(_curves(history, "val_loss"), width="stretch", key=f"{name}_val")
    with c2:
        _balance(history, name)
    table = pd.DataFrame(doc["summary"])
    st.subheader("Summary")
    fmt = {c: "%.4f" for c in ("val loss", "val loss std", "train loss", "CV", "MaxVio",
                               "drop rate", "unrouted", "perplexity")}
    show_table(table, {**fmt, "tokens/s": "%.0f"}, hide_index=True, width="stretch")
    if doc.get("throughput"):
        st.caption("tokens/s above: during the sweep, with every run sharing the device. "
                   "Each model alone, side by side:")
        tp = pd.DataFrame(doc["throughput"])
        num = st.column_config.NumberColumn
        st.dataframe(tp, hide_index=True, height=38 + 35 * len(tp),
                     column_config={"batch_tokens": num("tokens/step"),
                                    "cuda_graphs": st.column_config.CheckboxColumn("CUDA graphs"),
                                    "ms_per_step": num("ms/step", format="%.2f"),
                                    "tokens_per_s": num("tokens/s", format="%.0f"),
                                    "vs_dense": num("x dense", format="%.2fx"),
                                    "total_params": num("total params"),
                                    "active_params": num("active params")})
    extra = {k: doc[k] for k in ("settings", "corpus", "environment", "date") if k in doc}
    download_buttons(f"{name}_summary", table, extra)
    download_buttons(f"{name}_history", history, extra)
    st.download_button("full result (JSON)", json.dumps(doc, default=str).encode(),
                       f"{name}.json", "application/json", key=f"{name}_doc", on_click="ignore")
    moe = [r for r in runs if r.get("final")]
    if moe:
        _tokens_went(moe, name)


@st.fragment
def _tokens_went(moe: list[dict], name: str) -> None:
    """Loads and specialisation of one run and layer; its two controls rerun only this fragment."""
    st.subheader("Where the tokens went (validation split, end of training)")
    c1, c2 = st.columns(2)
    labels = [f"{r['router']} (seed {r['seed']})" for r in moe]
    pick = moe[labels.index(c1.selectbox("Run", labels, key=f"{name}_run"))]
    final = pick["final"]
    layer = c2.selectbox("MoE layer", range(len(final["loads"])), key=f"{name}_layer")
    loads = pd.DataFrame([{"layer": i, "expert": e, "tokens": v}
                          for i, row in enumerate(final["loads"]) for e, v in enumerate(row)])
    fig = px.bar(loads, x="expert", y="tokens", facet_col="layer", facet_col_wrap=4)
    fig.update_layout(height=300, margin=dict(t=30, b=10))
    st.plotly_chart(fig, width="stretch", key=f"{name}_loads")
    c1, c2 = st.columns(2)
    heat = go.Figure({"data": [{"type": "heatmap", "z": final["class_expert"][layer], "y": final["classes"],
                                "colorscale": "Blues", "zmin": 0, "colorbar": {"title": {"text": "share"}},
                                "hovertemplate": "expert %{x}, %{y}: %{z:.3f}<extra></extra>"}],
                      "layout": {"height": 320, "margin": {"t": 10, "b": 10},
                                 "xaxis": {"title": {"text": "expert"}},
                                 "yaxis": {"title": {"text": "token class"}, "autorange": "reversed"}}})
    c1.markdown("**Token class x expert** (each class's routed slots; rows sum to 1)")
    c1.plotly_chart(heat, width="stretch", key=f"{name}_heat")
    c2.markdown("**Most routed tokens per expert**")
    c2.dataframe(pd.DataFrame({"expert": range(len(final["top_tokens"][layer])),
                               "tokens": [", ".join(repr(t) for t in toks)
                                          for toks in final["top_tokens"][layer]]}),
                 hide_index=True, height=320)


def _text(data: str) -> str:
    if data != "upload":
        return builtin_text(data)
    up = st.session_state.get("upload")
    if up is None:
        raise ValueError("Data is set to upload: choose a UTF-8 .txt file above")
    return decode_upload(up.getvalue(), f"upload {up.name}")


st.title("MoE training lab")
st.caption("A small decoder-only language model trained once per router, from the same "
           "initialisation, on the same batches, with the same AdamW schedule: the curves differ "
           "only by the routing rule.")
here, gpu = st.tabs(["Train here", "Committed GPU results"])
with here:
    parsed = guarded("training_settings", _settings)
    if parsed is not None:
        data = parsed[1] if parsed[1] != "upload" else "your.txt"
        st.caption(f"Same run from a shell: `{shell_command(parsed[0], data, torch.get_num_threads())}`")
    if st.session_state.get("data") == "upload":
        st.file_uploader("UTF-8 text (.txt, up to 5 MB)", type=["txt"], key="upload")
    run = st.button("Run", type="primary", disabled=parsed is None)
    store = _store()
    if parsed is not None:
        settings, data = parsed
        corpus = guarded("training_data",
                         lambda: tokenize(_text(data), settings.tokenizer, settings.vocab))
        key = (settings, corpus.text_sha if corpus is not None else None)
        if run and corpus is not None and key not in store:
            bar = st.progress(0.0, "timing one step to estimate the run")
            try:  # not guarded(): a refusal must not fall back to an earlier estimate
                estimate = _within_limit(settings, corpus)
                bar.progress(0.0, f"starting: about {format_seconds(estimate)} in all")
            except ValueError as exc:
                estimate = None
                st.error(str(exc))
            live = st.columns(2)
            slots = [live[0].empty(), live[1].empty()]

            updates = iter(range(10**9))  # each redraw of a slot is a new element: fresh keys

            def progress(frac: float, msg: str, runs: list) -> None:
                bar.progress(frac, msg)
                dicts, n = [r.as_dict() for r in runs], next(updates)
                history = history_table(dicts)
                slots[0].plotly_chart(_curves(history, "val_loss", 300), width="stretch",
                                      key=f"live_val_{n}")
                if any(r["router"] not in ("dense", "dense_total") for r in dicts):
                    slots[1].plotly_chart(_curves(history, "cv", 300), width="stretch",
                                          key=f"live_cv_{n}")

            doc = None if estimate is None else guarded(
                "training", lambda: train(settings, corpus, progress).as_dict())
            bar.empty()
            for slot in slots:
                slot.empty()
            if doc is not None and not refused("training"):  # not an earlier run's, shown after an error
                store[key] = doc
        if key in store:
            _show(store[key], "training")
        elif corpus is not None:
            st.caption(f"{corpus.train.numel():,} training and {corpus.val.numel():,} validation "
                       f"tokens. Press Run: the defaults (7 runs) take about two minutes on a "
                       "2-core CPU.")
with gpu:
    files = sorted(RESULTS.glob("train_*.json"))
    if not files:
        st.caption("No committed GPU results.")
    else:
        names = [p.stem for p in files]
        name = st.selectbox("Result", names, key="gpu_file", bind=QP)
        doc = json.loads((RESULTS / f"{name}.json").read_text())
        env, s = doc["environment"], doc["settings"]
        st.markdown(f"Measured on **{env['device']}**, {doc['date']} (torch {env['torch']}, "
                    f"{s['dtype']}). Model: d_model {s['d_model']}, {s['layers']} layers, "
                    f"E = {s['experts']}, k = {s['k']}, expert width {s['d_expert']}, MoE every "
                    f"{s['moe_every']} layer(s); {s['batch']} x {s['seq_len']} tokens per step; "
                    f"seeds {', '.join(map(str, s['seeds']))}; data {doc['corpus']['data']} "
                    f"({doc['corpus']['train_tokens']:,} training tokens, BPE "
                    f"{doc['corpus']['vocab']}). Compared at step {doc['compared_at_step']} of "
                    f"{s['steps']}.")
        if doc.get("note"):
            st.caption(doc["note"])
        if "expert_choice" not in s["routers"]:
            st.caption("Expert Choice is not in this run: each expert picks its tokens from the "
                       "whole batch, so a token's routing depends on later tokens, which a causal "
                       "language model must not see (its loss would be optimistic).")
        _show(doc, "gpu")
