"""MoE vs dense cost: parameters, FLOPs per token with the 6ND check, "Will it fit?" (memory per
GPU, time to train), predicted beside measured training steps, measured FFN blocks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages._ui import _environment, bar_figure, download_buttons, guarded, last_good, refused
from engine.cost_memory import ATTENTION_KINDS, MAX_KV_TOKENS, OPTIMIZERS, PRECISIONS, TrainLayout
from engine.cost_model import FFN_TYPES, PRESETS, ROUTERS, ConfigError, TransformerConfig
from engine.cost_report import DEFAULTS, fit_text, mfu_text, sizing, time_text, training_time
from engine.cost_time import GPUS, GpuSpec
from engine.validation import CAPACITY_FACTOR, relabel

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cost_memory_h200_2026-12-03.json"
# (config field, URL key, label, kind); kind "int" is a number_input, a tuple a selectbox.
FIELDS = [
    ("d_model", "d", "d_model", "int"), ("n_layers", "layers", "layers", "int"),
    ("n_heads", "heads", "heads", "int"), ("n_kv_heads", "kv", "KV heads", "int"),
    ("d_ff", "dff", "d_ff (per expert)", "int"), ("vocab", "vocab", "vocabulary", "int"),
    ("seq_len", "seq", "sequence length", "int"), ("ffn", "ffn", "FFN", FFN_TYPES),
    ("num_experts", "experts", "Experts E (0 = dense)", "int"), ("top_k", "k", "Experts per token k", "int"),
    ("shared_experts", "shared", "shared experts", "int"),
    ("moe_every", "every", "MoE every n-th layer", "int"),
    ("router", "router", "router", ROUTERS), ("tied_embeddings", "tied", "tied embeddings", "bool"),
]
_L = TrainLayout()
LAYOUT_FIELDS = [  # (layout field, URL key, label, kind, default)
    ("precision", "prec", "precision", PRECISIONS, _L.precision),
    ("optimizer", "opt", "optimizer", OPTIMIZERS, _L.optimizer),
    ("zero", "zero", "ZeRO stage", "int", DEFAULTS["zero"]), ("gpus", "gpus", "GPUs N", "int", DEFAULTS["gpus"]),
    ("ep", "ep", "Ranks R (expert-parallel)", "int", DEFAULTS["ep"]),
    ("micro_batch", "mb", "micro-batch (sequences)", "int", _L.micro_batch),
    ("checkpointing", "ckpt", "full checkpointing", "bool", DEFAULTS["checkpointing"]),
    ("attention", "attn", "attention kernel", ATTENTION_KINDS, _L.attention),
    ("capacity_factor", "cf", "Capacity factor C", "float", _L.capacity_factor),
]
# Engine argument names -> the labels the user sees, for error messages.
LABELS = {**{f: f'"{label}"' for f, _, label, _ in FIELDS},
          **{f: f'"{label}"' for f, _, label, _, _ in LAYOUT_FIELDS},
          "MFU": '"MFU"', "price per GPU-hour": '"Price per GPU-hour"', "GPUs": '"GPUs N"',
          "tokens": '"KV cache at tokens"', "training FLOPs": '"Training tokens D"'}


def _load_preset() -> None:
    cfg = PRESETS[st.session_state["preset"]]
    for field, key, _, _ in FIELDS:
        st.session_state[key] = getattr(cfg, field)


@st.cache_data(show_spinner=False, max_entries=256)
def _cost(values: tuple, layout: tuple, tokens: float, gpu: GpuSpec, causal: bool,
          kv_tokens: int | None) -> dict:
    return sizing(TransformerConfig(**dict(values)), TrainLayout(**dict(layout)), tokens, gpu, causal,
                  kv_tokens)


def _time(values: dict, layout: dict, tokens: float, gpu: GpuSpec, mfu: float, price: float,
          causal: bool, gpu_name: str, mfu_named: str) -> str:
    """The time-to-train sentence, whole: shown again after a refusal, it keeps its own GPU and MFU."""
    return time_text(training_time(TransformerConfig(**values), TrainLayout(**layout), tokens, gpu, mfu,
                                   price, causal), gpu_name, mfu_named)


@st.cache_data(show_spinner=False)
def _committed() -> dict | None:
    """The committed H200 measurements, compared with the current model, and their MFU."""
    if not RESULTS.exists():
        return None
    from engine.cost_measure import compare_runs, extra_ms, run_from_dict
    from engine.cost_time import mfu_of_step

    doc = json.loads(RESULTS.read_text())
    calib = next(r for r in doc["runs"] if r["name"] == doc["calibration"])
    cfg, layout = run_from_dict(calib)
    rows = pd.DataFrame(compare_runs(doc["runs"], doc["calibration"], extra_ms(doc.get("moe_blocks", {}))))
    for col in ("predicted peak bytes", "measured peak bytes"):
        rows[col.replace("bytes", "GB")] = rows.pop(col) / 1e9
    for col in ("predicted step ms", "time error %"):  # text: no "None" where nothing is predicted
        rows[col] = rows[col].map(lambda v: "n/a" if v is None or v != v else f"{v:.2f}")
    notes = RESULTS.with_suffix(".notes.json")
    return {"rows": rows[["run", "measured peak GB", "predicted peak GB", "memory error %",
                          "measured step ms", "predicted step ms", "time error %", "verdict",
                          "experts", "seq_len", "micro_batch", "checkpointing", "attention",
                          "precision"]],
            "env": doc["environment"], "calibration": doc["calibration"],
            "mfu": mfu_of_step(cfg, layout, calib["measured"]["step_ms"], GPUS["H200 141 GB"].peak_flops),
            "notes": json.loads(notes.read_text()) if notes.exists() else {}}


def _sci(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    # Display only: the grid cannot format numbers >= 1e21; downloads keep the numbers.
    return table.assign(**{c: table[c].map("{:.4e}".format) for c in columns})


def _dense_fixed(label: str, key: str) -> int:
    """A MoE-only setting of a dense model (E = 0): shown greyed at 1, the value that counts, under
    its own key, so the value typed for the MoE model comes back when E is set again."""
    return st.number_input(label, value=1, key=f"{key}_dense", disabled=True,
                           help="used by MoE configs only (a dense model: E = 0)")


st.title("MoE vs dense cost")
st.caption("Parameters and matmul FLOPs per token from the config (engine.cost_model), memory per "
           "GPU and time to train (engine.cost_memory, engine.cost_time), checked against measured "
           "training steps, and real PyTorch FFN blocks timed at matched active FLOPs. Attention "
           "FLOPs of this causal decoder count half the S² score and value products (as the "
           "attention lab does), unless you tick the full count below. Same figures from a shell: "
           "`python -m engine cost --preset ...`.")

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
            if field == "top_k" and not values["num_experts"]:
                values[field] = _dense_fixed(label, key)
            elif kind == "int":
                values[field] = st.number_input(label, value=default, step=1, key=key,
                                                bind="query-params")
            elif kind == "bool":
                values[field] = st.checkbox(label, value=default, key=key, bind="query-params")
            else:
                values[field] = st.selectbox(label, kind, index=kind.index(default), key=key,
                                             bind="query-params")
            slots[field] = st.empty()
tokens = st.number_input("Training tokens D (for total FLOPs)", value=DEFAULTS["tokens"], min_value=1.0,
                         format="%.3e", key="D", bind="query-params")
full_attn = st.checkbox("Count the full S² attention terms (default: halved, as a causal kernel "
                        "computes and as the attention lab counts)", value=False, key="fullattn",
                        bind="query-params")

st.markdown("**Training layout (per GPU)**")
lc = st.columns(4)
gpu_name = lc[0].selectbox("GPU", (*GPUS, "user-defined"), index=list(GPUS).index(DEFAULTS["gpu"]),
                           key="gpu", bind="query-params")
if gpu_name == "user-defined":
    gpu_mem = lc[1].number_input("GPU memory (GB)", value=96.0, min_value=1.0, max_value=4096.0,
                                 key="gpumem", bind="query-params")
    gpu_tf = lc[2].number_input("Peak TFLOP/s (bf16 dense)", value=500.0, min_value=1.0,
                                max_value=100000.0, key="gputf", bind="query-params")
    gpu = GpuSpec(gpu_mem * 1e9, gpu_tf * 1e12)
else:
    gpu = GPUS[gpu_name]
lay: dict[str, object] = {}
lc = st.columns(4)
for i, (field, key, label, kind, default) in enumerate(LAYOUT_FIELDS):
    with lc[i % 4]:
        if field == "ep" and not values["num_experts"]:  # a dense model has no experts to place
            lay[field] = _dense_fixed(label, key)
        elif kind == "int":
            lay[field] = st.number_input(label, value=default, step=1, key=key, bind="query-params")
        elif kind == "float":  # the capacity factor, in every lab's range
            lay[field] = st.number_input(label, *CAPACITY_FACTOR, default, step=0.25, key=key,
                                         bind="query-params")
        elif kind == "bool":
            lay[field] = st.checkbox(label, value=default, key=key, bind="query-params")
        else:
            lay[field] = st.selectbox(label, kind, index=kind.index(default), key=key,
                                      bind="query-params")
tc = st.columns(4)
committed = _committed()
mfu_sources = ["typed"] + (["measured on an NVIDIA H200 (committed)"] if committed else [])
mfu_src = tc[0].selectbox("MFU from", mfu_sources, key="mfusrc", bind="query-params")
mfu = tc[1].number_input("MFU (typed)", value=DEFAULTS["mfu"], step=0.05, key="mfu",
                         bind="query-params", disabled=mfu_src != "typed")
price = tc[2].number_input("Price per GPU-hour (USD)", value=DEFAULTS["price"], step=0.5,
                           key="price", bind="query-params")
kv_tokens = tc[3].number_input("KV cache at tokens (0 = off)", 0, MAX_KV_TOKENS, 0, step=1024,
                               key="kvtok", bind="query-params")
if mfu_src != "typed" and committed:
    mfu = committed["mfu"]

config_error = None
try:
    TransformerConfig(**values)
except ConfigError as exc:  # shown beside its field, once; the figures below stay the last good
    config_error = exc
    slots[exc.field].error(relabel(str(exc), LABELS), icon=":material/error:")
if config_error is None:
    result = guarded("cost", lambda: _cost(tuple(values.items()), tuple(lay.items()), float(tokens),
                                           gpu, not full_attn, int(kv_tokens) or None), LABELS)
else:
    result = last_good("cost")
    if result is not None:
        st.caption("Showing the last valid result.")

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

    st.subheader("Will it fit?")
    mem, fit = result["memory"], result["memory_per_gpu"]
    fig = go.Figure([go.Bar(y=["per GPU"], x=[b / 1e9], name=c, orientation="h",
                            hovertemplate=f"{c}: %{{x:.1f}} GB<extra></extra>")
                     for c, b in zip(mem["component"], mem["bytes"])])
    fig.add_vline(x=fit["gpu_bytes"] / 1e9, line_dash="dash", line_color="red",
                  annotation_text=f"GPU memory {fit['gpu_bytes'] / 1e9:.0f} GB",
                  annotation_position="top")
    fig.update_layout(barmode="stack", height=220, margin=dict(t=30, b=10), xaxis_title="GB per GPU",
                      legend=dict(orientation="h", y=-0.5, traceorder="normal"))
    st.plotly_chart(fig, width="stretch")
    # The same sentences as `python -m engine cost` prints (engine.cost_report).
    if fit["fits"]:
        st.success(fit_text(fit), icon=":material/check_circle:")
    else:
        st.warning(fit_text(fit), icon=":material/warning:")
    # MFU and price change only this line: a bad one is refused here, and every figure above stays.
    where = (f"on an NVIDIA H200, {committed['env']['date'][:10]} ({committed['calibration']})"
             if mfu_src != "typed" else None)
    named = mfu_text(mfu, where)
    sentence = (guarded("cost_time", lambda: _time(values, lay, float(tokens), gpu, float(mfu),
                                                   float(price), not full_attn, gpu_name, named),
                        LABELS)
                if config_error is None and not refused("cost") else last_good("cost_time"))
    if sentence is not None:
        st.markdown(sentence.replace("$", "\\$"))  # dollars, not LaTeX
    with st.expander("Memory by component and activation parts (bytes per GPU)"):
        c1, c2 = st.columns(2)
        c1.dataframe(mem, hide_index=True,
                     column_config={"bytes": st.column_config.NumberColumn(format="localized")})
        c2.dataframe(result["activations"], hide_index=True,
                     column_config={"bytes": st.column_config.NumberColumn(format="localized")})
        st.caption("Weights, gradients and optimizer states after ZeRO and expert sharding; "
                   "activations as Korthikanti et al. 2022 count them (Section 4.1), without dropout, "
                   "with the MoE terms derived the same way (engine/cost_memory.py says how); the peak "
                   "is the larger of the loss's backward and the last layer's backward.")
        download_buttons("cost_memory", mem, {"config": values, "layout": lay})

    st.subheader("Parameters by component")
    long = result["parameters"].melt(id_vars="component", var_name="count", value_name="parameters")
    fig = bar_figure(long, "count", "parameters", "component", barmode="stack",
                     labels={"count": "", "parameters": "parameters"})
    fig.update_layout(height=380, margin=dict(t=10, b=10))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(result["parameters"], hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="localized")
                                for c in ("total", "active")})
    download_buttons("cost_params", result["parameters"], {"config": values})

    st.subheader("FLOPs per token (matmuls, forward) and the 6ND check")
    st.dataframe(_sci(result["FLOPs"], ["FLOPs for D tokens"]), hide_index=True, height="content",
                 column_config={"FLOPs per token": st.column_config.NumberColumn(format="localized")})
    download_buttons("cost_flops", result["FLOPs"], {"config": values, "tokens": tokens})

    if "MoE / dense" in result:
        st.subheader("MoE / dense ratios")
        st.caption("Dense baselines: the same d_ff (the MoE model without experts), and d_ff widened "
                   "to equal the MoE's active or total parameters.")
        num, text = st.column_config.NumberColumn, st.column_config.TextColumn
        # Short headers (the full names in the download): eight columns fit without scrolling.
        st.dataframe(_sci(result["MoE / dense"], ["MoE training FLOPs", "dense training FLOPs"]),
                     hide_index=True,
                     column_config={"dense baseline": text("baseline"), "dense d_ff": num("d_ff"),
                                    "dense params": num("params", format="localized"),
                                    **{c: num(c.removesuffix(" ratio") + " x", format="%.3f",
                                              help="MoE / dense")
                                       for c in ("total params ratio", "active params ratio",
                                                 "forward FLOPs ratio")},
                                    **{f"{m} training FLOPs": text(f"{m} FLOPs",
                                                                   help="training FLOPs for D tokens")
                                       for m in ("MoE", "dense")}})
        download_buttons("cost_compare", result["MoE / dense"], {"config": values, "tokens": tokens})

st.subheader("Predicted beside measured")
if committed:
    st.caption(f"Real training steps (engine.moe_block.TinyTransformer, bf16 AdamW, fp32 loss) on "
               f"{committed['env']['device']}, {committed['env']['date'][:10]}, torch "
               f"{committed['env']['torch']}. Peak memory: torch.cuda.max_memory_allocated against "
               f"the memory model. Step time: predicted from the '{committed['calibration']}' run "
               f"(its MFU, {committed['mfu']:.1%}, carried over by hardware FLOPs). Targets: memory "
               "within 10%, time within 15%.")
    st.dataframe(committed["rows"], hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in
                                ("predicted peak GB", "measured peak GB", "memory error %",
                                 "measured step ms")})
    for run, note in committed["notes"].items():
        st.caption(f"**{run}**: {note}")
st.markdown("**Measure on this machine**: real training steps of the configuration above "
            "(scaled down to fit here unless unticked), peak memory and step time beside the model.")
mc = st.columns(4)
scaled = mc[0].checkbox("scale to this machine", value=True, key="mscale",
                        help="d_model 256, 4 heads, 2 layers, sequence 256, vocabulary at most 8000; "
                             "d_ff, experts and top-k ratios kept")
m_prec = mc[1].selectbox("measured precision", ("fp32", "bf16"), key="mprec")
if mc[2].button("Measure", icon=":material/speed:", key="measure"):
    from engine.cost_measure import estimated_step_s, measure_step, predicted_vs_measured, scaled_copy

    def _measure() -> dict:
        cfg = TransformerConfig(**values)
        cfg = scaled_copy(cfg) if scaled else cfg
        layout = TrainLayout(**{**lay, "precision": m_prec, "gpus": 1, "zero": 0, "ep": 1,
                                "capacity_factor": 1.0})
        device = "cpu" if _environment()["cuda"] == "none" else "cuda"
        est = estimated_step_s(cfg, layout, device)  # None on a GPU
        # An upper figure: CPU_FLOPS are rates seen under load (2.4-5.5x under a quiet machine's).
        bar = st.progress(0.0, f"up to about {est:.0f} s per step here" if est else "measuring")
        m = measure_step(cfg, layout, device, 0.5, 1.0,
                         progress=lambda f, msg: bar.progress(f, msg))
        bar.empty()
        prev = st.session_state.get("cost_measured")
        pred_ms = None
        if prev is not None and prev["layout"].precision == layout.precision:
            from engine.cost_time import predict_step_ms

            pred_ms = predict_step_ms(cfg, layout, prev["cfg"], prev["layout"], prev["m"].step_ms)
        return {"cfg": cfg, "layout": layout, "m": m,
                "row": predicted_vs_measured(cfg, layout, m, pred_ms)}

    st.session_state["cost_measured"] = guarded("cost_measure", _measure) or st.session_state.get(
        "cost_measured")
measured = st.session_state.get("cost_measured")
if measured is not None:
    row, mm = measured["row"], measured["m"]
    c = st.columns(5)
    c[0].metric("Peak memory, measured", f"{mm.peak_bytes / 1e6:,.1f} MB")
    c[1].metric("Peak memory, predicted", f"{row['predicted peak bytes'] / 1e6:,.1f} MB")
    c[2].metric("Memory error", f"{row['memory error %']:+.1f}%")
    c[3].metric("Step time, measured", f"{mm.step_ms:,.1f} ms")
    c[4].metric("Step time error", "n/a" if row["time error %"] is None else f"{row['time error %']:+.1f}%",
                help="Predicted from your previous measured run on this machine; measure twice.")
    st.caption(f"Measured with {mm.memory_method}, {mm.steps} timed steps; config d_model "
               f"{measured['cfg'].d_model}, {measured['cfg'].n_layers} layers, sequence "
               f"{measured['cfg'].seq_len}, {measured['layout'].precision}. The step time is predicted "
               "from the previous measured run on this machine (its MFU carried over). On a CPU, "
               "RMSNorm runs unfused and keeps fp32 copies the GPU model does not count.")

st.subheader("Measured: dense FFN against MoE blocks")
st.caption("The config's FFN at a CPU-sized d_model (same d_ff / d_model), dense width k x d_ff so "
           "FLOPs per token match. Interleaved rounds; medians. Runs on this server's CPU.")
b = st.columns(3)
bench_d = b[0].number_input("block d_model", value=512, min_value=16, max_value=4096, step=64,
                            key="bd", bind="query-params")
bench_tokens = b[1].number_input("tokens", value=4096, min_value=64, max_value=65536, step=1024,
                                 key="bt", bind="query-params")
reps = b[2].number_input("rounds", value=3, min_value=1, max_value=20, key="reps", bind="query-params")
if st.button("Run timing", icon=":material/timer:", key="runtiming"):
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
