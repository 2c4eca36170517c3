"""MoE routing lab: the same generated tokens through hash and learned routers, and how balanced
each routing is. Thin: widgets -> LabSettings -> engine.routing_lab.run_lab -> figures and tables."""

from __future__ import annotations

import streamlit as st

from app_pages._ui import bar_figure, download_buttons, guarded, line_figure
from engine.routing_lab import (NULL_LABEL, ROUTERS, LabResult, LabSettings, route_one, run_lab,
                                settings_dict)
from engine.workloads import KINDS

QP = "query-params"
D = LabSettings()


@st.cache_data(show_spinner="Routing tokens...", max_entries=64)
def _one(settings: LabSettings, key: str) -> LabResult:
    """route_one, cached per router: run_lab passes for_router(settings, key), which drops the
    settings a router does not use, so adding a router or changing DeepSeek's steps reruns only
    that router."""
    return route_one(settings, key)


def _settings() -> LabSettings:
    """Read the widgets (all bound to the URL) into LabSettings."""
    c1, c2, c3, c4 = st.columns(4)
    workload = c1.selectbox("Workload", KINDS, index=KINDS.index(D.workload), key="wl", bind=QP,
                            help="uniform / zipf: token ids over a vocabulary (learned routers see "
                                 "their embeddings); gaussian / clustered: hidden states.")
    tokens = c2.number_input("Tokens T", 1, 1 << 23, D.num_tokens, step=1024, key="T", bind=QP,
                             help="1,000 to 4,194,304; large sizes are refused if they would not "
                                  "fit the memory budget.")
    experts = c3.number_input("Experts E", 1, 4096, D.num_experts, key="E", bind=QP)
    k = c4.number_input("Experts per token k", 1, 16, D.top_k, key="k", bind=QP,
                        help="Hash routers: 1 or 2. Switch is always top-1, GShard top-2.")
    c1, c2, c3, c4 = st.columns(4)
    capacity = c1.number_input("Capacity factor C", 0.0, 64.0, D.capacity_factor, step=0.25,
                               key="C", bind=QP, help="capacity per expert = ceil(C * k * T / E)")
    ranks = c2.number_input("Ranks R (expert parallel)", 1, 4096, D.num_ranks, key="R", bind=QP,
                            help="experts placed contiguously, E / R per rank")
    if workload in ("uniform", "zipf"):
        vocab = c3.number_input("Vocabulary V", 2, 1 << 21, D.vocab_size, step=1000, key="V",
                                bind=QP)
        zipf_s = c4.slider("Zipf exponent s", 0.0, 2.0, D.zipf_s, step=0.05, key="s", bind=QP,
                           disabled=workload != "zipf", help="text is close to s = 1")
        clusters = D.clusters
    else:
        vocab, zipf_s = D.vocab_size, D.zipf_s
        clusters = c3.number_input("Clusters", 1, 4096, D.clusters, key="c", bind=QP)
    # Plain keys as options (no format_func): the URL then carries short names, e.g. routers=topk.
    routers = st.multiselect("Routers", list(ROUTERS), default=list(D.routers), key="routers",
                             bind=QP, help="; ".join(f"{k}: {v}" for k, v in ROUTERS.items()))
    with st.expander("More settings"):
        c1, c2, c3, c4 = st.columns(4)
        d_model = c1.selectbox("Hidden size D", (16, 32, 64, 128, 256, 512, 1024),
                               index=2, key="d", bind=QP)
        steps = c2.slider("DeepSeek-V3 bias steps", 0, 200, D.deepseek_steps, key="steps",
                          bind=QP)
        speed = c3.select_slider("Bias update speed", (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03,
                                                       0.1), D.bias_update_speed, key="gamma",
                                 bind=QP)
        seed = c4.number_input("Seed", 0, 2**31 - 1, D.seed, key="seed", bind=QP)
    settings = LabSettings(workload=workload, num_tokens=int(tokens), vocab_size=int(vocab),
                           zipf_s=float(zipf_s), d_model=int(d_model), clusters=int(clusters),
                           num_experts=int(experts), top_k=int(k), capacity_factor=float(capacity),
                           num_ranks=int(ranks), routers=tuple(routers), deepseek_steps=int(steps),
                           bias_update_speed=float(speed), seed=int(seed))
    return settings


def _show(result: LabResult, settings: LabSettings) -> None:
    for note in result.notes:
        st.info(note, icon=":material/info:")
    st.subheader("Tokens per expert")
    order = st.radio("Order", ("sorted", "by id"), horizontal=True, key="order", bind=QP)
    x = "load rank" if order == "sorted" else "expert"
    # A line joins points in row order: order rows along the chosen x axis (display only).
    fig = line_figure(result.counts.sort_values(["router", x], kind="stable"), x, "load/mean", "router",
                      line_shape="hv", hover=("expert", "tokens"), order=list(result.metrics["router"]),
                      labels={"load rank": "experts, busiest first", "expert": "expert id",
                              "load/mean": "tokens / mean tokens per expert"})
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="perfect balance")
    fig.add_hline(y=settings.capacity_factor, line_dash="dash", line_color="firebrick",
                  annotation_text=f"capacity C = {settings.capacity_factor:g}")
    fig.update_layout(height=420, legend_title_text="")
    st.plotly_chart(fig, width="stretch")

    st.subheader("Balance metrics")
    st.caption(f"CV = std/mean of tokens per expert; MaxVio = max/mean - 1; drop rate at capacity "
               f"ceil(C k T / E), counting choices before a router's own drops; {NULL_LABEL}: "
               "CV = sqrt((E-1)/(kT)), what k T slots thrown uniformly at random would give. "
               "Switch aux loss = E sum f_i P_i (routers with probabilities). Rank balancedness = "
               "mean/max tokens per rank.")
    st.dataframe(result.metrics, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.4f")
                                for c in result.metrics.columns
                                if c not in ("router", "k", "slots routed")})
    extra = {"settings": settings_dict(settings)}
    download_buttons("routing_metrics", result.metrics, extra)
    download_buttons("routing_counts", result.counts, extra)

    c1, c2 = st.columns(2)
    with c1:
        st.subheader(f"Per-rank load (R = {settings.num_ranks})")
        fig = bar_figure(result.ranks, "rank", "tokens", "router", barmode="group")
        fig.update_layout(height=360, legend_title_text="")
        st.plotly_chart(fig, width="stretch")
    with c2:
        st.subheader("DeepSeek-V3 balance over steps")
        if result.balance.empty:
            st.caption("Add the DeepSeek-V3 router to see its bias balancing the load.")
        else:
            fig = line_figure(result.balance, "step", ["CV", "MaxVio"], markers=True,
                              labels={"value": "load imbalance (per step's batch)", "variable": ""})
            fig.update_layout(height=360)
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
# Keep the settings with the result: after bad input the last good pair is shown together.
shown = guarded("routing", lambda: (lab_settings, run_lab(lab_settings, route=_one)))
if shown is not None:
    _show(shown[1], shown[0])
