"""MoE vs dense cost: parameters by component, FLOPs per token with the 6ND check, measured blocks."""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

from app_pages._ui import bar_figure, download_buttons, guarded
from engine.cost_model import (FFN_TYPES, PRESETS, ROUTERS, ConfigError, TransformerConfig, compare,
                               estimate, flops_table, params_table, summary)

# (config field, URL key, label, kind); kind "int" is a number_input, a tuple a selectbox.
FIELDS = [
    ("d_model", "d", "d_model", "int"), ("n_layers", "layers", "layers", "int"),
    ("n_heads", "heads", "heads", "int"), ("n_kv_heads", "kv", "KV heads", "int"),
    ("d_ff", "dff", "d_ff (per expert)", "int"), ("vocab", "vocab", "vocabulary", "int"),
    ("seq_len", "seq", "sequence length", "int"), ("ffn", "ffn", "FFN", FFN_TYPES),
    ("num_experts", "experts", "experts E (0 = dense)", "int"), ("top_k", "k", "top-k", "int"),
    ("shared_experts", "shared", "shared experts", "int"),
    ("moe_every", "every", "MoE every n-th layer", "int"),
    ("router", "router", "router", ROUTERS), ("tied_embeddings", "tied", "tied embeddings", "bool"),
]


def _load_preset() -> None:
    cfg = PRESETS[st.session_state["preset"]]
    for field, key, _, _ in FIELDS:
        st.session_state[key] = getattr(cfg, field)


@st.cache_data(show_spinner=False, max_entries=256)
def _cost(values: tuple[tuple[str, object], ...], tokens: float) -> dict:
    est = estimate(TransformerConfig(**dict(values)))
    return {"params": params_table(est), "flops": flops_table(est, tokens), "summary": summary(est),
            "compare": compare(est.config, tokens) if est.config.is_moe else None}


def _sci(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    # Display only: the grid cannot format numbers >= 1e21; downloads keep the numbers.
    return table.assign(**{c: table[c].map("{:.4e}".format) for c in columns})


st.title("MoE vs dense cost")
st.caption("Parameters and matmul FLOPs per token from the config (engine.cost_model), and real "
           "PyTorch FFN blocks timed at matched active FLOPs (engine.moe_block). "
           "Same figures from a shell: `python -m engine cost --preset ...`.")

preset = st.selectbox("Preset", tuple(PRESETS), key="preset", bind="query-params",
                      on_change=_load_preset, help="Loads the preset's fields; edit any field below.")
# Field defaults are the chosen preset's values, so the URL holds only the fields edited after it.
base = PRESETS[preset]
values: dict[str, object] = {}
slots = {}
for title, group in (("Transformer", FIELDS[:8] + FIELDS[13:]), ("Mixture of experts", FIELDS[8:13])):
    st.markdown(f"**{title}**")
    cols = st.columns(4)
    for i, (field, key, label, kind) in enumerate(group):
        with cols[i % 4]:
            default = getattr(base, field)
            if kind == "int":
                values[field] = st.number_input(label, value=default, step=1, key=key,
                                                bind="query-params")
            elif kind == "bool":
                values[field] = st.checkbox(label, value=default, key=key, bind="query-params")
            else:
                values[field] = st.selectbox(label, kind, index=kind.index(default), key=key,
                                             bind="query-params")
            slots[field] = st.empty()
tokens = st.number_input("Training tokens D (for total FLOPs)", value=1e12, min_value=1.0,
                         format="%.3e", key="D", bind="query-params")

try:
    TransformerConfig(**values)
except ConfigError as exc:  # shown beside the field; guarded() below keeps the last good figures
    slots[exc.field].error(str(exc), icon=":material/error:")
result = guarded("cost", lambda: _cost(tuple(values.items()), float(tokens)))

if result is not None:
    s = result["summary"]
    m = st.columns(5)
    m[0].metric("Total params", f"{s['total_params'] / 1e9:.3f} B")
    m[1].metric("Active params", f"{s['active_params'] / 1e9:.3f} B")
    m[2].metric("Forward GFLOP / token", f"{s['forward_flops_per_token'] / 1e9:.2f}")
    m[3].metric("Training GFLOP / token", f"{s['train_flops_per_token'] / 1e9:.2f}")
    m[4].metric("Training / 6N", f"{s['train_over_6n']:.3f}",
                help="3 x forward matmul FLOPs over 6 x active params: above 1 from the attention "
                     "score and value terms, below 1 from the embedding lookup (not a matmul).")

    st.subheader("Parameters by component")
    long = result["params"].melt(id_vars="component", var_name="count", value_name="parameters")
    fig = bar_figure(long, "count", "parameters", "component", barmode="stack",
                     labels={"count": "", "parameters": "parameters"})
    fig.update_layout(height=380, margin=dict(t=10, b=10))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(result["params"], hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="localized")
                                for c in ("total", "active")})
    download_buttons("cost_params", result["params"], {"config": values})

    st.subheader("FLOPs per token (matmuls, forward) and the 6ND check")
    st.dataframe(_sci(result["flops"], ["FLOPs for D tokens"]), hide_index=True, height="content",
                 column_config={"FLOPs per token": st.column_config.NumberColumn(format="localized")})
    download_buttons("cost_flops", result["flops"], {"config": values, "tokens": tokens})

    if result["compare"] is not None:
        st.subheader("MoE / dense ratios")
        st.caption("Dense baselines: the same d_ff (the MoE model without experts), and d_ff widened "
                   "to equal the MoE's active or total parameters.")
        st.dataframe(_sci(result["compare"], ["MoE training FLOPs", "dense training FLOPs"]),
                     hide_index=True,
                     column_config={"dense params": st.column_config.NumberColumn(format="localized")})
        download_buttons("cost_compare", result["compare"], {"config": values, "tokens": tokens})

st.subheader("Measured: dense FFN against MoE blocks")
st.caption("The config's FFN at a CPU-sized d_model (same d_ff / d_model), dense width k x d_ff so "
           "FLOPs per token match. Interleaved rounds; medians. Runs on this server's CPU.")
b = st.columns(3)
bench_d = b[0].number_input("block d_model", value=512, min_value=16, max_value=4096, step=64,
                            key="bd", bind="query-params")
bench_tokens = b[1].number_input("tokens", value=4096, min_value=64, max_value=65536, step=1024,
                                 key="bt", bind="query-params")
reps = b[2].number_input("rounds", value=3, min_value=1, max_value=20, key="reps", bind="query-params")
if st.button("Run timing", icon=":material/timer:"):
    from engine.moe_block import BlockBenchSettings, time_blocks

    bar = st.progress(0.0, "starting")

    def _timed() -> pd.DataFrame:
        cfg = TransformerConfig(**values)
        s = BlockBenchSettings.from_config(cfg, int(bench_d), int(bench_tokens), int(reps))
        rows = time_blocks(s, lambda f, msg: bar.progress(f, msg))
        return pd.DataFrame([dataclasses.asdict(r) for r in rows])

    st.session_state["cost_timing"] = guarded("cost_timing", _timed)
    bar.empty()
timing = st.session_state.get("cost_timing")
if timing is not None:
    long = timing.melt(id_vars="block", value_vars=["forward_ms", "fwd_bwd_ms"], var_name="pass",
                       value_name="ms")
    fig = bar_figure(long, "block", "ms", "pass", barmode="group", text_format=".1f")
    fig.update_layout(height=340, margin=dict(t=10, b=10))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(timing, hide_index=True)
    download_buttons("cost_timing", timing)
