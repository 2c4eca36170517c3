"""Attention kernels: FA3, FA2, every SDPA backend and FlexAttention in TFLOP/s, here or from GPU runs."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from app_pages._ui import _environment, download_buttons, guarded
from engine.attention_bench import (BACKENDS, DTYPES, MODES, PRESETS, SweepResult, SweepSettings,
                                    committed_results, load_result, run_sweep, settings_for)
from engine.flash_attention3 import fa3_readiness

QP = "query-params"
SEQLENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT = SweepSettings(seqlens=PRESETS["quick"].seqlens)


@st.cache_data(show_spinner=False)
def _committed(path: str) -> SweepResult:
    return load_result(path)


def _banner() -> None:
    env = _environment()
    usable, why = fa3_readiness()
    text = (f"**This machine:** {env['device']} · torch {env['torch']} · CUDA {env['cuda']} · "
            f"**FA3:** {why if usable else 'not used: ' + why}")
    (st.success if usable else st.info)(text, icon=":material/memory:")


def _settings_from_widgets() -> SweepSettings:
    """The sweep the widgets describe: a preset, or custom shapes; backends apply to both."""
    gpu = _environment()["cuda"] != "none"
    names = [*PRESETS, "custom"]
    preset = st.selectbox("Preset", names, index=names.index("fa3-paper" if gpu else "quick"), key="preset",
                          bind=QP, help="fa3-paper: 16k tokens, hidden 2048, head dim 64/128/256, causal on "
                                        "and off, seqlen 512 to 16k (FA3 paper, figs. 5-6). quick: seconds on a CPU.")
    backends = st.multiselect("Backends", BACKENDS, default=list(DEFAULT.backends), key="backends", bind=QP,
                              help="sdpa-* force one torch SDPA backend; flex is FlexAttention (GPU); "
                                   "wrapper is engine.flash_attention3.attention() itself.")
    if preset != "custom":
        return settings_for(preset, backends=tuple(backends))
    c1, c2, c3 = st.columns(3)
    seqlens = c1.multiselect("Sequence lengths", SEQLENS, default=list(DEFAULT.seqlens), key="S", bind=QP)
    head_dims = c2.multiselect("Head dims", (16, 32, 64, 96, 128, 192, 256), default=[64], key="D", bind=QP)
    causal = c3.multiselect("Causal", ("off", "on"), default=["off", "on"], key="causal", bind=QP)
    tokens = c1.number_input("Tokens per batch", 16, 2**22, 1024, key="tokens", bind=QP,
                             help="batch = tokens // seqlen")
    hidden = c2.number_input("Hidden size", 8, 65536, 256, step=64, key="hidden", bind=QP,
                             help="heads = hidden // head dim")
    gqa = c3.multiselect("Query heads per kv head (GQA)", (1, 2, 4, 8, 16), default=[1], key="gqa", bind=QP)
    dtype = c1.selectbox("dtype", tuple(DTYPES), index=tuple(DTYPES).index("fp32"), key="dtype", bind=QP)
    mode = c2.radio("Direction", MODES, key="mode", bind=QP, horizontal=True)
    reps = c3.slider("Timed repetitions", 1, 50, 5, key="reps", bind=QP)
    return SweepSettings(seqlens=tuple(sorted(seqlens)), head_dims=tuple(sorted(head_dims)),
                         causal=tuple(c == "on" for c in causal), gqa=tuple(sorted(gqa)), dtypes=(dtype,),
                         tokens=int(tokens), hidden=int(hidden), backends=tuple(backends), mode=mode,
                         reps=int(reps), warmup=1)


def _run(settings: SweepSettings) -> SweepResult:
    with st.status("Timing attention kernels...", expanded=True) as status:
        bar = st.progress(0.0)
        result = run_sweep(settings, progress=lambda done, total, label: bar.progress(done / total, text=label))
        status.update(label=f"Done in {result.elapsed_s:.1f} s", state="complete", expanded=False)
    return result


def _show(result: SweepResult, name: str) -> None:
    env, table = result.env, result.table
    ceiling = ", ".join(f"{v:.3g} ({k})" for k, v in result.matmul_tflops.items())
    st.caption(f"Measured on **{env['device']}**, {result.created} · torch {env['torch']} · CUDA {env['cuda']} · "
               f"FA3 {env['fa3']} · matmul ceiling {ceiling} TFLOP/s · "
               f"sweep {result.elapsed_s:.1f} s · {result.settings.get('mode', 'fwd')}")
    ok = table[table["status"] == "ok"]
    if ok.empty:
        st.warning("No backend ran on these shapes; the table says why for each.")
    else:
        fig = px.line(ok, x="seqlen", y="tflops", color="backend", markers=True, log_x=True,
                      facet_col="head_dim", facet_row="causal", labels={"tflops": "TFLOP/s", "seqlen": "seqlen"},
                      hover_data=["batch", "heads", "kv_heads", "ms", "rel_err", "dtype"],
                      title="TFLOP/s against sequence length, per backend")
        ticks = sorted(ok["seqlen"].unique())
        fig.update_xaxes(tickvals=ticks, ticktext=[f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
        fig.update_layout(height=300 * len(ok["causal"].unique()) + 100)
        st.plotly_chart(fig, width="stretch")
    speed = result.speedups()
    st.subheader("FA3 speed-up over the best SDPA backend")
    if speed.empty:
        st.caption("Needs FA3 and at least one SDPA backend timed on the same shapes (FA3 runs on Hopper GPUs only).")
    else:
        st.dataframe(speed, hide_index=True, width="stretch",
                     column_config={"speedup": st.column_config.NumberColumn(format="%.2fx"),
                                    "fa3_tflops": st.column_config.NumberColumn(format="%.0f"),
                                    "best_sdpa_tflops": st.column_config.NumberColumn(format="%.0f")})
    st.subheader("All rows")
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"rel_err": st.column_config.NumberColumn("rel err vs fp32", format="%.1e"),
                                "tflops": st.column_config.NumberColumn(format="%.1f"),
                                "ms": st.column_config.NumberColumn(format="%.4f")})
    download_buttons(name, table, {"env": env, "created": result.created, "settings": result.settings,
                                   "matmul_tflops": result.matmul_tflops, "speedups": speed.to_dict(orient="records")})


st.title("Attention kernels")
st.markdown("FlashAttention-3 against every `scaled_dot_product_attention` backend. FLOPs = 4·B·H·S²·D "
            "(halved when causal, 3.5x with backward); error is ‖out − ref‖/‖ref‖ against fp32 SDPA-math "
            "on a slice. Reproduce from a shell: `python -m engine attention --preset fa3-paper`.")
_banner()
source = st.radio("Results", ("Run here", "Committed GPU results"), key="src", bind=QP, horizontal=True)

if source == "Committed GPU results":
    files = committed_results()
    if not files:
        st.info("No committed results under benchmarks/results/.")
    else:
        name = st.selectbox("Result file", list(files), key="file", bind=QP)
        res = guarded("attention_committed", lambda: _committed(str(files[name])))
        if res is not None:
            st.info(f"Measured on **{res.env['device']}** on {res.created[:10]}, not on this machine.",
                    icon=":material/history:")
            _show(res, name)
else:
    settings = _settings_from_widgets()
    if st.button("Run sweep", type="primary", icon=":material/play_arrow:"):
        res = guarded("attention_run", lambda: _run(settings))
        if res is not None:
            st.session_state["attention_result"] = res
    if _environment()["cuda"] == "none":
        st.caption("CPU run: only SDPA's flash (CPU kernel) and math backends run here; the GPU backends are "
                   "listed with the reason. Committed GPU results show the lent H100 and H200.")
    res = st.session_state.get("attention_result")
    if res is None:
        st.caption("Press **Run sweep** to time the kernels on this machine.")
    else:
        _show(res, "attention_sweep")
