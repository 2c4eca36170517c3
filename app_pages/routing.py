"""MoE routing lab: the same generated tokens through hash and learned routers, and how balanced
each routing is. Thin: widgets -> LabSettings -> engine.routing_lab.run_lab -> figures and tables.
Input bounds and the names errors use come from the engine (LIMITS, PAGE_LABELS)."""

from __future__ import annotations

import time

import streamlit as st

from app_pages._ui import bar_figure, download_buttons, guarded, line_figure, table
from engine.routing_lab import (LIMITS, PAGE_LABELS, PRESETS, ROUTERS, LabResult, LabSettings,
                                route_one, run_lab, settings_dict)
from engine.workloads import ID_KINDS, KINDS

QP = "query-params"
D = LabSettings()
L = PAGE_LABELS
V3 = PRESETS["DeepSeek-V3"]
# Preset -> widget keys (the URL keys) it sets.
_V3_KEYS = {"E": V3["num_experts"], "k": V3["top_k"], "groups": V3["n_groups"],
            "tgroups": V3["topk_groups"], "scale": V3["route_scale"]}
_GSHARD = ("g/(g1+g2)", "1")


@st.cache_data(show_spinner=False, max_entries=64)
def _one(settings: LabSettings, key: str) -> LabResult:
    """route_one, cached per router: run_lab passes for_router(settings, key), which drops the
    settings a router does not use, so adding a router or changing DeepSeek's steps reruns only
    that router."""
    return route_one(settings, key)


def _num(col, name: str, key: str, default, **kw):
    """A number input bounded by the engine's LIMITS[name] and labelled as errors name it."""
    lo, hi = LIMITS[name]
    return col.number_input(L[name], lo, hi, default, key=key, bind=QP, **kw)


def _apply_v3() -> None:
    st.session_state.update(_V3_KEYS)


def _settings() -> LabSettings:
    """Read the widgets (all bound to the URL) into LabSettings."""
    c1, c2, c3, c4 = st.columns(4)
    workload = c1.selectbox(L["workload"], KINDS, index=KINDS.index(D.workload), key="wl",
                            bind=QP, help="uniform / zipf: token ids over a vocabulary (learned "
                                          "routers see their embeddings); gaussian / clustered: "
                                          "hidden states.")
    lo, hi = LIMITS["num_tokens"]
    tokens = _num(c2, "num_tokens", "T", D.num_tokens, step=1024,
                  help=f"{lo:,} to {hi:,}. The learned routers hold (T, E) scores: a large "
                       "T x E is refused with the memory it would need.")
    experts = _num(c3, "num_experts", "E", D.num_experts)
    k = _num(c4, "top_k", "k", D.top_k,
             help="Hash routers use at most 2; Switch is always top-1, GShard top-2.")
    c1, c2, c3, c4 = st.columns(4)
    capacity = _num(c1, "capacity_factor", "C", D.capacity_factor, step=0.25,
                    help="capacity per expert = ceil(C k T / E), exact for the decimal typed")
    ranks = _num(c2, "num_ranks", "R", D.num_ranks,
                 help="expert parallel: experts placed contiguously, E / R per rank (an R above "
                      "E places one expert per rank)")
    if workload in ID_KINDS:
        vocab = _num(c3, "vocab_size", "V", D.vocab_size, step=1000)
        lo, hi = LIMITS["zipf_s"]
        zipf_s = c4.slider(L["zipf_s"], lo, hi, D.zipf_s, step=0.05, key="s", bind=QP,
                           disabled=workload != "zipf", help="text is close to s = 1")
        clusters = D.clusters
    else:
        vocab, zipf_s = D.vocab_size, D.zipf_s
        clusters = _num(c3, "clusters", "c", D.clusters)
    # Plain keys as options (no format_func): the URL then carries short names, e.g. routers=topk.
    routers = st.multiselect(L["routers"], list(ROUTERS), default=list(D.routers), key="routers",
                             bind=QP, help="; ".join(f"{k}: {v}" for k, v in ROUTERS.items()))
    with st.expander("More settings: DeepSeek-V3, GShard, hidden size, seed"):
        st.button("DeepSeek-V3 preset", on_click=_apply_v3,
                  help=f"DeepSeek-V3's own router: E = {V3['num_experts']}, k = {V3['top_k']}, "
                       f"{V3['n_groups']} groups, top-{V3['topk_groups']} groups, routed "
                       f"scaling factor {V3['route_scale']}")
        c1, c2, c3, c4 = st.columns(4)
        groups = _num(c1, "n_groups", "groups", D.n_groups,
                      help="DeepSeek-V3 group-limited routing: experts in this many groups "
                           "(1: no limit; V3: 8)")
        tgroups = _num(c2, "topk_groups", "tgroups", D.topk_groups,
                       help="groups a token may use, chosen by the sum of each group's top two "
                            "scores (V3: 4)")
        scale = _num(c3, "route_scale", "scale", D.route_scale, step=0.5,
                     help="multiplies the renormalised DeepSeek-V3 weights (V3: 2.5)")
        renorm = c4.radio("GShard weight after a drop", _GSHARD, key="gs", bind=QP,
                          horizontal=True,
                          help="When capacity drops one of a token's two experts, the survivor "
                               "keeps g/(g1+g2) in GShard's Algorithm 1; DeepSpeed and fairseq "
                               "renormalise it to 1.")
        c1, c2, c3, c4 = st.columns(4)
        d_model = c1.selectbox(L["d_model"], (16, 32, 64, 128, 256, 512, 1024),
                               index=2, key="d", bind=QP)
        lo, hi = LIMITS["deepseek_steps"]
        steps = c2.slider(L["deepseek_steps"], lo, hi, D.deepseek_steps, key="steps", bind=QP)
        speed = c3.select_slider(L["bias_update_speed"], (0.0001, 0.0003, 0.001, 0.003, 0.01,
                                                          0.03, 0.1), D.bias_update_speed,
                                 key="gamma", bind=QP)
        seed = _num(c4, "seed", "seed", D.seed)
    if ranks > experts:  # lowering E below R is a natural step: not an error, but said
        st.info(f"{L['num_ranks']} = {ranks} is more than {L['num_experts']} = {experts}: the "
                f"per-rank load uses R = {experts}, one expert per rank.", icon=":material/info:")
        ranks = experts
    return LabSettings(workload=workload, num_tokens=int(tokens), vocab_size=int(vocab),
                       zipf_s=float(zipf_s), d_model=int(d_model), clusters=int(clusters),
                       num_experts=int(experts), top_k=int(k), capacity_factor=float(capacity),
                       num_ranks=int(ranks), routers=tuple(routers), deepseek_steps=int(steps),
                       bias_update_speed=float(speed), seed=int(seed), n_groups=int(groups),
                       topk_groups=int(tgroups), route_scale=float(scale),
                       gshard_renormalize=renorm == _GSHARD[1])


@st.fragment
def _histogram(result: LabResult, settings: LabSettings) -> None:
    """Tokens per expert; its order control reruns only this fragment."""
    st.subheader("Tokens per expert")
    order = st.radio("Order", ("sorted", "by id"), horizontal=True, key="order", bind=QP)
    x = "load rank" if order == "sorted" else "expert"
    counts = result.counts
    routers = list(dict.fromkeys(counts["router"]))
    # In units of each router's k T / E, the unit of its capacity ceil(C k T / E): a router that
    # drops at capacity tops out at C, which its own post-drop mean (load/mean) would hide.
    even = counts["router"].map(dict(zip(result.metrics["router"], result.metrics["k"]))) \
        * settings.num_tokens / settings.num_experts
    counts = counts.assign(load=(counts["tokens"] / even).round(4)).sort_values(x, kind="stable")
    capacity_factor = settings.capacity_factor
    # Horizontal lines across the plot at y (what fig.add_hline draws, without its validation cost),
    # named in the legend: a label on the plot lay over the curves near it.
    lines = [(1.0, "k T / E: every slot routed, evenly", "dot", "black"),
             (capacity_factor, f"capacity C = {capacity_factor:g}", "dash", "firebrick")]
    fig = line_figure(counts, x, "load", "router", line_shape="hv", hover=("expert", "tokens"),
                      order=routers, height=420, margin={"t": 30},
                      labels={"load rank": "experts, busiest first", "expert": "expert id", "router": "",
                              "load": "tokens / (k T / E)"},
                      shapes=[{"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "y0": y, "y1": y,
                               "line": {"dash": dash, "color": color}} for y, _, dash, color in lines],
                      # Legend entries only: no points to draw or hover.
                      extra=tuple({"type": "scatter", "x": [None], "y": [None], "mode": "lines",
                                   "name": text, "hoverinfo": "skip",
                                   "line": {"dash": dash, "color": color}}
                                  for _, text, dash, color in lines))
    st.plotly_chart(fig, width="stretch")


_METRIC_HELP = {
    "CV": "std / mean of tokens per expert (population std); 0 is perfect balance",
    "null CV": "CV of uniform random routing with this router's k and T: sqrt((E-1)/(kT)) for k "
               "independent slots (hash routers), sqrt((E-k)/(kT)) for k distinct experts "
               "(top-k, Switch, GShard, DeepSeek-V3); none for Expert Choice (loads fixed)",
    "drop rate at C": "slots over capacity ceil(C k T / E), counting choices before a router's "
                      "own drops",
    "aux loss": "each router's own auxiliary loss. Switch: E sum f_i P_i, f_i the share of "
                "top-1 choices before drops (1 at balance). GShard: DeepSpeed's top2gating "
                "l_aux, the same on first choices. Top-k: HF Mixtral load_balancing_loss_func, "
                "E sum_i (tokens choosing i among their k / T) P_i (k at balance). Hash, Expert "
                "Choice and DeepSeek-V3 (auxiliary-loss-free) have none",
    "rank balancedness": "mean / max tokens per rank",
}


# The first metrics table: how tokens spread over experts; the second holds the rest (slots routed,
# drops at capacity, unrouted tokens, the aux loss, rank balancedness).
_BALANCE_COLUMNS = ["k", "CV", "null CV", "max/mean", "MaxVio", "Gini", "norm. entropy"]


def _notes(result: LabResult) -> None:
    for note in result.notes:
        st.info(note, icon=":material/info:")


def _show(result: LabResult, settings: LabSettings) -> None:
    if result.metrics.empty:  # every chosen router was skipped: only their notes say why
        _notes(result)
        return
    _histogram(result, settings)
    st.caption("Each router's tokens per expert over k T / E, with its own k. Switch and GShard drop at "
               "capacity and top out at C; Expert Choice fills every expert to exactly C. Their metrics "
               "below count the tokens kept after those drops; the other routers drop nothing (their drop "
               "rate at C is what a capacity would drop).")
    routers = list(dict.fromkeys(result.metrics["router"]))

    st.subheader("Balance metrics")
    st.caption("Each router is compared with its own null, uniform random routing at its k: "
               "hash routers throw k independent slots, sqrt((E-1)/(kT)); routers that pick k "
               "distinct experts, sqrt((E-k)/(kT)). The aux loss is the one each router's paper "
               "or reference code defines (hover the column names). – marks a figure that does "
               "not apply, or is undefined because no token was routed.")
    metrics = result.metrics
    formats = dict.fromkeys([c for c in metrics.columns if c not in ("router", "k", "slots routed")],
                            "%.4f")
    # Two tables of at most eight columns: one of thirteen scrolls sideways on a laptop's screen.
    rest = [c for c in metrics.columns if c not in ("router", *_BALANCE_COLUMNS)]
    for columns in (_BALANCE_COLUMNS, rest):
        table(metrics[["router", *columns]], formats=formats, helps=_METRIC_HELP, hide_index=True,
              width="stretch")
    _notes(result)
    extra = {"settings": settings_dict(settings)}
    download_buttons("routing_metrics", metrics, extra)
    download_buttons("routing_counts", result.counts, extra)

    c1, c2 = st.columns(2)
    with c1:
        st.subheader(f"Per-rank load (R = {settings.num_ranks})")
        fig = bar_figure(result.ranks, "rank", "tokens", "router", barmode="group", order=routers,
                         labels={"router": ""}, height=360, margin={"t": 30})
        st.plotly_chart(fig, width="stretch")
    with c2:
        st.subheader("DeepSeek-V3 balance over steps")
        if result.balance.empty:
            st.caption("Add the DeepSeek-V3 router to see its bias balancing the load.")
        else:
            b = result.balance
            fig = line_figure(b.round(5), "step", ["CV", "MaxVio"], markers=True, height=360,
                              margin={"t": 30},
                              labels={"value": "load imbalance (per step's batch)", "variable": ""})
            st.plotly_chart(fig, width="stretch")
            st.caption(f"Each step routes the next batch of up to 4,096 tokens and nudges every "
                       f"expert's selection bias by ±{settings.bias_update_speed:g} towards the "
                       "mean load.")


st.title("MoE routing lab")
st.caption("Hash routing needs no training; the learned routers here (top-k, Switch, GShard, Expert "
           "Choice, DeepSeek-V3) use a **seeded random gate projection, not a trained one**: they "
           "show what each routing rule does to a fixed score distribution. Same tokens for all. "
           "Reproduce any figure with `python -m engine route` (see docs/load_balance.md).")
lab_settings = _settings()
progress = st.empty()
# A bar that comes and goes within a fast rerun only shifts the page under it (and makes the
# browser lay out every chart twice): it appears once a run has taken this long.
PROGRESS_AFTER_S = 0.5
started = time.perf_counter()


def _route_showing_progress(settings: LabSettings, key: str) -> LabResult:
    """_one, with a progress bar naming the router (a cold run at 1M tokens takes seconds)."""
    n = len(lab_settings.routers)
    i = lab_settings.routers.index(key)
    if time.perf_counter() - started > PROGRESS_AFTER_S:
        progress.progress(i / n, text=f"Routing {lab_settings.num_tokens:,} tokens: {ROUTERS[key]} "
                                      f"({i + 1} of {n})")
    return _one(settings, key)


# Keep the settings with the result: after bad input the last good pair is shown together.
shown = guarded("routing", lambda: (
    lab_settings, run_lab(lab_settings, route=_route_showing_progress, labels=PAGE_LABELS)))
progress.empty()
if shown is not None:
    _show(shown[1], shown[0])
