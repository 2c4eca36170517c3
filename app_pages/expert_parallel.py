"""Expert parallelism: place experts on ranks, see load and all-to-all traffic, run a real dispatch."""

from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages._ui import bar_figure, download_buttons, guarded, line_figure
from engine.ep_dispatch import LaunchError, committed_results, launch
from engine.expert_parallel import (DTYPES, PLACEMENTS, ROUTERS, SWEEP_TOKENS, EPSettings, EPStats,
                                    ep_stats, hot_expert_sweep, rank_table, traffic_table)

HOT_SHARES = tuple(round(0.05 * i, 2) for i in range(11))
Q = {"bind": "query-params"}


@st.cache_data(show_spinner=False, max_entries=64)
def _stats(**fields) -> EPStats:
    return ep_stats(EPSettings(**fields))


@st.cache_data(show_spinner=False, max_entries=16)
def _sweep(**fields) -> list[dict]:
    return hot_expert_sweep(EPSettings(**fields), HOT_SHARES)


def ratios_first(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary columns with the configuration (with whether the dispatch ran from CUDA graphs) and
    the ratios first (every round's dispatch ratio beside the reported one, where there were
    rounds), the times after."""
    first = [c for c in ("tokens", "chunks", "lead_ms", "graph_share", "dispatch_ratio",
                         "dispatch_ratio_rounds", "combine_ratio", "layer_ratio") if c in summary]
    if "dispatch_ratio_rounds" in summary:  # a list per row: shown as short text
        summary = summary.assign(dispatch_ratio_rounds=summary["dispatch_ratio_rounds"].map(
            lambda v: " ".join(f"{x:.2f}" for x in v)))
    return summary[first + [c for c in summary if c not in first]]


st.title("Expert parallelism")
st.caption("E experts on R ranks, each rank holding its own tokens: what each rank computes, what "
           "crosses the network in the dispatch and the combine, and what one hot expert does to "
           "the slowest rank. Same numbers from a shell: `python -m engine dispatch --help`.")

c = st.columns(4)
experts = c[0].number_input("Experts", 2, 1024, 64, key="experts", **Q)
ranks = c[1].number_input("Ranks", 1, 256, 4, key="ranks", **Q)
top_k = c[2].number_input("Experts per token (k)", 1, 8, 2, key="k", **Q)
tokens = c[3].select_slider("Tokens per rank", [2**i for i in range(8, 17)], 4096, key="tokens", **Q)
c = st.columns(4)
d_model = c[0].select_slider("d_model", [2**i for i in range(6, 15)], 4096, key="d", **Q)
dtype = c[1].selectbox("Payload dtype", list(DTYPES), index=1, key="dtype", **Q)
router = c[2].selectbox("Router", list(ROUTERS), key="router", **Q,
                        help="hash: Hash Layers on token ids (k <= 2); topk: softmax top-k gate")
zipf = c[3].slider("Token skew (Zipf exponent)", 0.0, 2.0, 1.0, 0.1, key="zipf", **Q)
c = st.columns(4)
placement = c[0].radio("Placement", list(PLACEMENTS), key="place", **Q,
                       help="greedy: EPLB-style packing by load, with replicas of hot experts")
replicas = c[1].slider("Replicas of hot experts (greedy)", 0, 64, 0, key="rep", **Q)
hot = c[2].slider("Hot expert share", 0.0, 0.9, 0.0, 0.05, key="hot", **Q,
                  help="share of tokens whose first expert is forced to expert 0")
seed = c[3].number_input("Seed", 0, 2**31 - 1, 0, key="seed", **Q)

settings = EPSettings(experts=int(experts), ranks=int(ranks), top_k=int(top_k), tokens=int(tokens),
                      d_model=int(d_model), dtype=dtype, placement=placement, replicas=int(replicas),
                      router=router, zipf=float(zipf), hot_share=float(hot), seed=int(seed))
stats = guarded("ep_stats", lambda: _stats(**asdict(settings)))

if stats is not None:
    m = st.columns(4)
    m[0].metric("Balancedness (mean / max load)", f"{stats.balancedness:.3f}")
    m[1].metric("Slowest rank vs mean", f"{1 / stats.balancedness:.2f}x")
    m[2].metric("Pairs leaving their rank", f"{stats.leave_share:.1%}")
    m[3].metric("Off-rank MB per layer, each way", f"{stats.off_rank_bytes() / 1e6:,.1f}")

    left, right = st.columns(2)
    table = rank_table(stats)
    fig = bar_figure(table, "rank", "load_pairs", hover=("experts",),
                     labels={"load_pairs": "token-expert pairs computed", "rank": "rank"},
                     title=f"Load per rank ({stats.placement.name})")
    fig.add_hline(y=stats.mean_load, line_dash="dot", annotation_text="mean")
    left.plotly_chart(fig, key="ep_load")
    mb = [[b / 1e6 for b in row] for row in stats.dispatch_bytes()]
    # Colour from 0, so a few percent of difference between pairs does not look like a hot spot.
    heat = go.Figure(go.Heatmap(z=mb, colorscale="Viridis", colorbar={"title": "MB"}, zmin=0,
                                zmax=max(map(max, mb)) or 1.0,
                                hovertemplate="src %{y} -> dst %{x}: %{z:.2f} MB<extra></extra>"))
    heat.update_layout(title="Dispatch MB by rank pair (combine: the transpose)",
                       xaxis_title="destination rank", yaxis_title="source rank",
                       yaxis_autorange="reversed")
    right.plotly_chart(heat, key="ep_heat")
    st.dataframe(table, hide_index=True)
    download_buttons("ep_ranks", table, {"settings": asdict(settings),
                                         "placement": [list(s) for s in stats.placement.slots]})
    with st.expander("Rank-to-rank traffic table"):
        traffic = traffic_table(stats)
        st.dataframe(traffic, hide_index=True)
        download_buttons("ep_traffic", traffic, {"settings": asdict(settings)})

st.subheader("What a hot expert does to the slowest rank")
st.caption(f"Expert 0 gets a growing share of all tokens; every placement sees the same tokens "
           f"(at most {SWEEP_TOKENS:,} over all ranks, for speed). Greedy uses this batch's loads "
           "(an oracle) and the replicas set above.")
sweep = guarded("ep_sweep", lambda: _sweep(**asdict(settings)))
if sweep is not None:
    sweep_df = pd.DataFrame(sweep)
    fig = line_figure(sweep_df, "hot_share", "slowest_vs_mean", "placement", markers=True,
                      labels={"hot_share": "share of tokens on expert 0",
                              "slowest_vs_mean": "slowest rank load / mean load"})
    st.plotly_chart(fig, key="ep_sweep_fig")
    st.dataframe(sweep_df, hide_index=True)
    download_buttons("ep_hot_sweep", sweep_df, {"settings": asdict(settings)})

st.subheader("Measured: a real dispatch on this machine")
st.caption("torchrun starts N CPU processes (gloo); each routes its tokens, exchanges counts and "
           "rows with all_to_all_single, runs its experts and combines. The dispatch, the combine "
           "and the whole layer are each timed next to a plain all_to_all_single of the rows "
           "that cross ranks; ratio = plain time / phase time on the slowest rank. CPU times "
           "show the mechanics, not GPU speed.")
c = st.columns([1, 1, 2])
procs = c[0].number_input("Processes", 2, 4, 2, key="procs", **Q)
if c[1].button("Run the dispatch", key="run_dispatch", icon=":material/play_arrow:"):
    # Not through guarded(): a failed launch should show the workers' own last lines.
    try:
        with st.spinner(f"Running {procs} processes..."):
            st.session_state["ep_measured"] = launch(settings, int(procs), timeout_s=120)
    except ValueError as exc:
        st.error(str(exc), icon=":material/error:")
    except LaunchError as exc:
        st.error("The dispatch failed; its last output:", icon=":material/error:")
        st.code(str(exc))
measured = st.session_state.get("ep_measured")
if measured is not None:
    st.caption(f"{measured['world']} ranks, {measured['backend']}, {measured['device']}, "
               f"{measured['date']}, torch {measured['torch']}")
    per_rank = pd.DataFrame(measured["per_rank"]).drop(columns=["pairs_sent"])
    summary = ratios_first(pd.DataFrame(measured["summary"]))
    st.dataframe(summary, hide_index=True)
    st.dataframe(per_rank, hide_index=True)
    download_buttons("ep_measured", per_rank, {"summary": measured["summary"],
                                               "settings": measured["settings"]})

st.subheader("Committed GPU results")
results = committed_results()
if not results:
    st.caption("None committed yet: `benchmarks/bench_ep_nccl.py` writes them under "
               "benchmarks/results/.")
for doc in results:
    st.markdown(f"**{doc['device']}**, {doc['world']} ranks, {doc['backend']}, {doc['date']} "
                f"(torch {doc['torch']}, CUDA {doc.get('cuda')}, NCCL {doc.get('nccl')})")
    st.dataframe(ratios_first(pd.DataFrame(doc["summary"])), hide_index=True)
if results:
    st.caption("Ratios are plain all_to_all_single time (the rows that cross ranks) / phase time on "
               "the slowest rank; the target (>= 0.7) is dispatch_ratio. Each configuration ran in "
               "rounds; a row is the round with the median dispatch ratio, and "
               "dispatch_ratio_rounds lists every round's. lead_ms: GPU work queued before every "
               "timed call, so the host reaches it ahead of the GPU as in a model step (0: back to "
               "back, the host's own time exposed). overflow_share: share of calls with rows "
               "beyond the split sizes agreed from the last calls. graph_share: share of calls "
               "replayed from a CUDA graph (exchanges up to 256 MiB). "
               "benchmarks/results/README.md says where the time goes.")
