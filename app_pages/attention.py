"""Attention kernels: FA4, FA3, every SDPA backend and FlexAttention in TFLOP/s, from GPU runs or here."""

from __future__ import annotations

from dataclasses import replace

import plotly.express as px
import streamlit as st

from app_pages._ui import _environment, download_buttons, guarded
from app_pages._ui import table as ui_table  # `table` here is the results
from engine.attention_bench import SweepResult, committed_results, load_result, run_sweep
from engine.attention_masks import MASKS
from engine.attention_estimate import device_tflops, format_seconds, plan_run
from engine.attention_shapes import BACKENDS, DTYPES, MODES, PRESETS, SweepSettings, settings_for
from engine.attention_train import ModelShape, model_sweep_fields, training_view
from engine.flash_attention3 import fa3_readiness, fa4_readiness

QP = "query-params"
SEQLENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT = SweepSettings(seqlens=PRESETS["quick"].seqlens)
SOURCES = ("Committed GPU results", "Run here")
LABELS = {"paper-fwd": "FA3-paper shapes, forward", "paper-train": "FA3-paper shapes, forward + backward",
          "masks": "training masks, forward + backward"}


@st.cache_data(show_spinner=False)
def _committed(path: str) -> SweepResult:
    return load_result(path)


@st.cache_data(show_spinner=False)
def _rate(device: str, dtype: str) -> float:
    import torch

    return device_tflops(torch.device(device), dtype)


def _on_gpu() -> bool:
    return _environment()["cuda"] != "none"


def _banner() -> None:
    env = _environment()
    parts = []
    for name, (usable, why) in (("FA4", fa4_readiness()), ("FA3", fa3_readiness())):
        parts.append(f"**{name}:** {why if usable else 'not used: ' + why}")
    text = f"**This machine:** {env['device']} · torch {env['torch']} · CUDA {env['cuda']} · " + " · ".join(parts)
    (st.success if _on_gpu() else st.info)(text, icon=":material/memory:")


def measured_on(env: dict, created: str) -> str:
    """'measured on an NVIDIA H200, 2026-12-03' for a result's environment and creation time."""
    device = env["device"]
    article = "an" if device[:1].upper() in "AEIOUN" else "a"  # "an NVIDIA": en-vidia
    return f"measured on {article} {device}, {created[:10]}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _file_label(stem: str) -> str:
    """attention_sweep_h200_2026-12-03_paper-train -> 'H200, 2026-12-03: FA3-paper shapes, forward + backward'."""
    parts = stem.removeprefix("attention_sweep_").split("_")
    what = LABELS.get(parts[2], parts[2]) if len(parts) > 2 else "FA3-paper shapes, forward"
    return f"{parts[0].upper()}, {parts[1]}: {what}"


def _preset_backends() -> None:
    """A newly picked preset brings its own backends (custom keeps the current choice)."""
    preset = st.session_state.get("preset")
    if preset in PRESETS:
        st.session_state["backends"] = list(PRESETS[preset].backends)


def _settings_from_widgets() -> SweepSettings:
    """The sweep the widgets describe: a preset, or custom shapes; backends apply to both."""
    names = [*PRESETS, "custom"]
    preset = st.selectbox("Preset", names, index=names.index("fa3-paper" if _on_gpu() else "quick"), key="preset",
                          bind=QP, on_change=_preset_backends,
                          help="fa3-paper: 16k tokens, hidden 2048, head dim 64/128/256, causal on and off, "
                               "seqlen 512 to 16k (FA3 paper, figs. 5-6); fa3-paper-train: the same forward and "
                               "backward; masks: windows, packed documents, softcap; quick: seconds on a CPU.")
    backends = st.multiselect("Backends", BACKENDS, default=list(PRESETS.get(preset, DEFAULT).backends),
                              key="backends", bind=QP,
                              help="sdpa: SDPA's own choice; sdpa-* force one SDPA backend; sdpa-fa4: SDPA's flash "
                                   "backend with FA4 inside; flex: FlexAttention (GPU); wrapper: "
                                   "engine.flash_attention3.attention() itself.")
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
    masks = c3.multiselect("Masks (replace Causal)", MASKS, default=[], key="masks", bind=QP,
                           help="causal throughout: sliding windows of 1k/4k keys, packed documents with random "
                                "boundaries, Gemma-2 softcap 50. TFLOP/s count only the pairs a mask keeps.")
    return SweepSettings(seqlens=tuple(sorted(seqlens)), head_dims=tuple(sorted(head_dims)),
                         causal=tuple(c == "on" for c in causal), gqa=tuple(sorted(gqa)), dtypes=(dtype,),
                         tokens=int(tokens), hidden=int(hidden), backends=tuple(backends), mode=mode,
                         masks=tuple(masks), rep_ms=20.0, warmup_ms=5.0)


def _run(settings: SweepSettings, estimate: float) -> SweepResult:
    """Run with a progress bar; a click on Stop, or the page closing, ends it at the next row."""
    with st.status(f"Timing attention kernels (about {format_seconds(estimate)})...", expanded=True) as status:
        bar = st.progress(0.0)
        result = run_sweep(settings, progress=lambda done, total, label: bar.progress(
            done / total, text=f"{done}/{total} rows · {label}"))
        status.update(label=f"Done in {result.elapsed_s:.1f} s", state="complete", expanded=False)
    return result


def _chart(ok) -> None:
    facet_row = "mask" if (ok["mask"] != "none").any() else "causal"
    if ok["seqlen"].nunique() == 1:  # one sequence length (the mask set): bars per mask, not a line
        fig = px.bar(ok, x=facet_row, y="tflops", color="backend", barmode="group", facet_col="head_dim",
                     labels={"tflops": "TFLOP/s"}, hover_data=["seqlen", "batch", "heads", "ms", "rel_err"],
                     title=f"TFLOP/s per {facet_row} and backend, seqlen {ok['seqlen'].iloc[0]}")
        st.plotly_chart(fig, width="stretch")
        return
    fig = px.line(ok, x="seqlen", y="tflops", color="backend", markers=True, log_x=True,
                  facet_col="head_dim", facet_row=facet_row, labels={"tflops": "TFLOP/s", "seqlen": "seqlen"},
                  hover_data=["batch", "heads", "kv_heads", "ms", "rel_err", "sm_mhz", "power_w", "dtype"],
                  title="TFLOP/s against sequence length, per backend")
    ticks = sorted(ok["seqlen"].unique())
    fig.update_xaxes(tickvals=ticks, ticktext=[f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
    fig.update_layout(height=280 * ok[facet_row].nunique() + 120)
    st.plotly_chart(fig, width="stretch")


def _show(result: SweepResult, name: str, here: bool) -> None:
    env, table = result.env, result.table
    mode = result.settings.get("mode", "fwd")
    ceiling = ", ".join(f"{v:.3g} ({k})" for k, v in result.matmul_tflops.items())
    where = "Measured on this machine" if here else _sentence(measured_on(env, result.created))
    direction = "forward + backward" if mode == "fwd+bwd" else "forward"
    st.caption(f"{where} · torch {env['torch']} · CUDA {env['cuda']} · FA4 {env.get('fa4', 'not recorded')} · "
               f"FA3 {env['fa3']} · matmul ceiling {ceiling} TFLOP/s · {direction} · sweep {result.elapsed_s:.0f} s")
    ok = table[table["status"] == "ok"]
    if ok.empty:
        st.warning("No backend ran on these shapes; the table says why for each.")
    else:
        _chart(ok)
    for kernel in ("fa4", "fa3"):
        speed = result.speedups(kernel)
        if not speed.empty:
            st.subheader(f"{kernel.upper()} speed-up over the best SDPA backend")
            st.dataframe(speed, hide_index=True, width="stretch",
                         column_config={"speedup": st.column_config.NumberColumn(format="%.2fx"),
                                        f"{kernel}_tflops": st.column_config.NumberColumn(format="%.0f"),
                                        "best_sdpa_tflops": st.column_config.NumberColumn(format="%.0f")})
    if ok["vs_do_bench_pct"].notna().any():
        within = (ok["vs_do_bench_pct"].abs() <= 3).sum()
        st.caption(f"Timer cross-check: {within} of {len(ok)} rows within 3% of triton's do_bench (25 ms warm-up, "
                   "100 ms window, median) timing the same call in the same process; column "
                   "`vs_do_bench_pct`; `window_range_pct`: how far each timer's own windows differed among "
                   "themselves.")
    st.subheader("All rows")
    windows = result.settings.get("windows", 1)
    st.caption(f"ms: median at steady clocks (warm-up until the SM clock stops falling, then the median over {windows} "
               f"timed window{'s' if windows != 1 else ''} of >= 100 ms each on a GPU; window_range_pct: how far they "
               "differed); sm_mhz and power_w: SM clock and board power sampled while timing; host_ms: the host's time "
               "per call (near ms: the host set the pace); first_call_s: the first call's extra time "
               "(kernel compilation, autotuning), never inside a timing.")
    # Rows that did not run have no timings: "–" there (ui_table), not "None".
    ui_table(table.rename(columns={"rel_err": "rel err vs fp32", "dq_err": "dq rel err"}),
             {"rel err vs fp32": "%.1e", "dq rel err": "%.1e", "tflops": "%.4g", "ms": "%.4f"},
             hide_index=True, width="stretch")
    download_buttons(name, table, {"env": env, "created": result.created, "settings": result.settings,
                                   "matmul_tflops": result.matmul_tflops})
    if mode == "fwd+bwd" and (table["mask"] == "none").any():  # the view reads unmasked rows
        _training(result, here)


def _model_widgets(prefix: str) -> ModelShape:
    """Six number inputs for a model's attention shape (defaults: a Llama-3-8B-like layer at 8k tokens)."""
    c = st.columns(6)
    fields = [("Batch", "b", 1), ("Sequence length", "s", 8192), ("Heads", "h", 32), ("KV heads", "kv", 8),
              ("Head dim", "d", 128), ("Layers", "l", 32)]
    vals = [col.number_input(label, 1, 131072, default, key=prefix + key, bind=QP)
            for col, (label, key, default) in zip(c, fields)]
    return ModelShape(*(int(v) for v in vals))


def _training(result: SweepResult, here: bool) -> None:
    st.subheader("Training step: attention forward + backward for your model")
    model = _model_widgets("run-" if here else "t")
    view = guarded("attention_train_view", lambda: training_view(result.table, model))
    if view is None:
        return
    if view.empty:
        have = result.table[result.table["status"] == "ok"]
        st.info(f"No forward+backward row at seqlen {model.seqlen}, head dim {model.head_dim}, causal. This result "
                f"has seqlens {sorted(have['seqlen'].unique().tolist())} and head dims "
                f"{sorted(have['head_dim'].unique().tolist())}; or time your shape under Run here.")
        return
    best = view.iloc[0]
    st.metric(f"Fastest: {best['backend']}", f"{best['ms_per_step']:.1f} ms per step",
              f"{best['speedup_vs_default']:.2f}x SDPA's default choice", delta_color="off")
    st.dataframe(view, hide_index=True, width="stretch",
                 # Short headers, so the eight columns fit a laptop's width without scrolling.
                 column_config={"speedup_vs_default": st.column_config.NumberColumn(
                                    "speedup", format="%.2fx", help="against SDPA's default choice"),
                                "memory_vs_default": st.column_config.NumberColumn(
                                    "memory", format="%.2fx", help="against SDPA's default choice"),
                                "ms_per_step": st.column_config.NumberColumn("ms/step", format="%.1f"),
                                "ms_per_layer": st.column_config.NumberColumn("ms/layer", format="%.3f"),
                                "peak_mib_per_layer": st.column_config.NumberColumn(
                                    "peak MiB/layer", format="%.0f")})
    where = "this machine" if here else measured_on(result.env, result.created)
    st.caption(f"{model.layers} layers x one layer's forward+backward ({where}). "
               "Rows at another batch or head count are scaled by B·H (FLOPs and memory grow linearly in it); "
               "KV heads change only K/V traffic, not FLOPs. Default = `sdpa`, SDPA's own backend choice.")


def _run_here() -> None:
    import torch

    model_run = st.toggle("Time one model's shape (training step)", key="train_here", bind=QP)
    if model_run:
        model = _model_widgets("m")
        settings = guarded("attention_model", lambda: settings_for("fa3-paper-train", **model_sweep_fields(model)))
        if settings is None:
            return
    else:
        settings = _settings_from_widgets()
    device = torch.device("cuda" if _on_gpu() else "cpu")
    rate = _rate(device.type, settings.dtypes[0])
    plan = guarded("attention_estimate", lambda: plan_run(settings, device, tflops=rate))
    if plan is None:
        return
    estimate = plan.estimate_s
    c1, c2, c3 = st.columns([2, 3, 1])
    run = c1.button("Run sweep", type="primary", icon=":material/play_arrow:", disabled=plan.too_long)
    c3.button("Stop", icon=":material/stop:", help="Stops a running sweep at its next row.")
    if plan.too_long:
        small, small_s = plan.reduced, plan.reduced_s
        st.warning(f"This sweep would take about {format_seconds(estimate)} on this CPU (estimated from its shapes "
                   f"and a matmul timed here). Run it on a GPU, pick the quick preset, or run it at reduced size: "
                   f"tokens {small.tokens}, seqlens {', '.join(map(str, small.seqlens))}, hidden {small.hidden} "
                   f"(about {format_seconds(small_s)}).", icon=":material/timer:")
        if c2.button(f"Run at reduced size (about {format_seconds(small_s)})", icon=":material/compress:"):
            settings, estimate, run = small, small_s, True
    else:
        c2.caption(f"Estimated {format_seconds(estimate)} on this machine.")
    if st.session_state.pop("attention_running", False):  # the last run never finished: Stop, or a rerun
        st.info("The last run was stopped before it finished; nothing from it is shown.", icon=":material/stop:")
    if run:
        st.session_state["attention_running"] = True
        res = guarded("attention_run", lambda: _run(replace(settings, device=device.type), estimate))
        st.session_state["attention_running"] = False
        if res is not None:
            st.session_state["attention_result"] = res
    res = st.session_state.get("attention_result")
    if res is None:
        st.caption("Press **Run sweep** to time the kernels on this machine. On a CPU only SDPA's flash (CPU "
                   "kernel) and math backends run; the GPU backends are listed with the reason.")
    else:
        _show(res, "attention_sweep", here=True)


st.title("Attention kernels")
st.markdown("FlashAttention-4 and -3 against every `scaled_dot_product_attention` backend and FlexAttention, forward "
            "and forward + backward. FLOPs = 4·B·H·S²·D forward (halved when causal, as the FA papers count; "
            "backward 2.5x forward); mask rows count only the query-key pairs the mask keeps. Error is "
            "‖out − ref‖/‖ref‖ against fp32 on a slice. Reproduce from a shell: "
            "`python -m engine attention --preset fa3-paper`.")
_banner()
source = st.radio("Results", SOURCES, index=1 if _on_gpu() else 0, key="src", bind=QP, horizontal=True)

if source == SOURCES[0]:
    files = committed_results()
    if not files:
        st.info("No committed results under benchmarks/results/.")
    else:
        labels = {_file_label(stem): stem for stem in files}  # plain options: the URL carries the label
        name = labels[st.selectbox("Result", list(labels), key="file", bind=QP)]
        res = guarded("attention_committed", lambda: _committed(str(files[name])))
        if res is not None:
            st.info(f"{_sentence(measured_on(res.env, res.created))}, not on this machine. "
                    "**Run here** times this machine.", icon=":material/history:")
            _show(res, name, here=False)
else:
    _run_here()
