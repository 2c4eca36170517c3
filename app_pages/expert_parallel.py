"""Expert parallelism: place experts on ranks, see load and all-to-all traffic, run a real dispatch."""

from collections.abc import Callable
from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages._ui import bar_figure, download_buttons, guarded, line_figure
from engine.ep_dispatch import committed_results, launch
from engine.ep_launch import LaunchError
from engine.ep_sweep import NVLINK_GBPS, committed_sweeps
from engine.ep_training import BENCH_ARGS, committed_training, launch_check
from engine.expert_parallel import (DTYPES, MAX_EXPERTS, MAX_RANKS, MAX_TOP_K, MAX_ZIPF, PLACEMENTS,
                                    ROUTERS, SWEEP_TOKENS, EPSettings, EPStats, ep_stats, hot_expert_sweep,
                                    rank_table, traffic_table)

HOT_SHARES = tuple(round(0.05 * i, 2) for i in range(11))
Q = {"bind": "query-params"}


@st.cache_data(show_spinner=False, max_entries=64)
def _stats(**fields) -> EPStats:
    return ep_stats(EPSettings(**fields))


@st.cache_data(show_spinner=False, max_entries=16)
def _sweep(**fields) -> list[dict]:
    return hot_expert_sweep(EPSettings(**fields), HOT_SHARES)


DISPATCH_TARGET = 0.7  # plain all_to_all_single time / dispatch time on the slowest rank
MEETS = f"dispatch >= {DISPATCH_TARGET}"


def ratios_first(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary columns with the configuration (with whether the dispatch ran from CUDA graphs) and
    the ratios first (whether the dispatch meets its target, then every round's dispatch ratio
    beside the reported one, where there were rounds), the times after."""
    if "dispatch_ratio" in summary:
        summary = summary.assign(**{MEETS: summary["dispatch_ratio"].map(
            lambda r: "yes" if r >= DISPATCH_TARGET else "below")})
    first = [c for c in ("tokens", "chunks", "lead_ms", "graph_share", "dispatch_ratio", MEETS,
                         "dispatch_ratio_rounds", "combine_ratio", "layer_ratio") if c in summary]
    if "dispatch_ratio_rounds" in summary:  # a list per row: shown as short text
        summary = summary.assign(dispatch_ratio_rounds=summary["dispatch_ratio_rounds"].map(
            lambda v: " ".join(f"{x:.2f}" for x in v)))
    return summary[first + [c for c in summary if c not in first]]


def run_job(state_key: str, what: str, spinner: str, job: Callable[[], dict]) -> None:
    """Run a torchrun job into st.session_state[state_key]. Not through guarded(): a failed job
    shows the workers' own last lines."""
    try:
        with st.spinner(spinner):
            st.session_state[state_key] = job()
    except ValueError as exc:
        st.error(str(exc), icon=":material/error:")
    except LaunchError as exc:
        st.error(f"The {what} failed; its last output:", icon=":material/error:")
        st.code(str(exc))


st.title("Expert parallelism")
st.caption("E experts on R ranks, each rank holding its own tokens: what each rank computes, what "
           "crosses the network in the dispatch and the combine, and what one hot expert does to "
           "the slowest rank. Same numbers from a shell: `python -m engine dispatch --help`.")

c = st.columns(4)
experts = c[0].number_input("Experts E", 1, MAX_EXPERTS, 64, key="experts", **Q)
ranks = c[1].number_input("Ranks R", 1, MAX_RANKS, 4, key="ranks", **Q)
top_k = c[2].number_input("Experts per token k", 1, MAX_TOP_K, 2, key="k", **Q)
tokens = c[3].select_slider("Tokens per rank", [2**i for i in range(8, 17)], 4096, key="tokens", **Q)
c = st.columns(4)
d_model = c[0].select_slider("d_model", [2**i for i in range(6, 15)], 4096, key="d", **Q)
dtype = c[1].selectbox("Payload dtype", list(DTYPES), index=1, key="dtype", **Q)
router = c[2].selectbox("Router", list(ROUTERS), key="router", **Q,
                        help="hash: Hash Layers on token ids (k <= 2); topk: softmax top-k gate")
zipf = c[3].slider("Zipf exponent s", 0.0, MAX_ZIPF, 1.0, 0.1, key="zipf", **Q)
c = st.columns(4)
placement = c[0].radio("Placement", list(PLACEMENTS), key="place", **Q,
                       help="greedy: EPLB-style packing by load, with replicas of hot experts")
replicas = c[1].slider("Replicas of hot experts (greedy)", 0, 64, 0, key="rep", **Q)
hot = c[2].slider("Hot expert share", 0.0, 1.0, 0.0, 0.05, key="hot", **Q,
                  help="share of tokens whose first expert is forced to expert 0")
seed = c[3].number_input("Seed", 0, 2**31 - 1, 0, key="seed", **Q)

settings = EPSettings(experts=int(experts), ranks=int(ranks), top_k=int(top_k), tokens=int(tokens),
                      d_model=int(d_model), dtype=dtype, placement=placement, replicas=int(replicas),
                      router=router, zipf=float(zipf), hot_share=float(hot), seed=int(seed))
# Checked once: both computations below take the same settings, and a bad field is one message.
# On a refusal guarded() returns the last valid settings, whose results stay shown.
checked = guarded("ep_settings", settings.validated)
stats = guarded("ep_stats", lambda: _stats(**asdict(checked))) if checked else None

if stats is not None:
    m = st.columns(4)
    m[0].metric("Balancedness (mean / max load)", f"{stats.balancedness:.3f}")
    m[1].metric("Slowest rank vs mean", f"{1 / stats.balancedness:.2f}x")
    m[2].metric("Pairs leaving their rank", f"{stats.leave_share:.1%}")
    m[3].metric("Off-rank MB, all ranks", f"{stats.off_rank_bytes() / 1e6:,.1f}",
                help="one layer's dispatch: the bytes that leave their rank, summed over every "
                     "rank (the heatmap's cells); the combine sends as many back")

    left, right = st.columns(2)
    table = rank_table(stats)
    fig = bar_figure(table, "rank", "load_pairs", hover=("experts",),
                     labels={"load_pairs": "token-expert pairs computed", "rank": "rank"},
                     title=f"Load per rank ({stats.placement.name})")
    # Beside the plot, not over it: the last rank's bar may rise above the line.
    fig.add_hline(y=stats.mean_load, line_dash="dot", annotation_text="mean", annotation_position="right")
    fig.update_layout(margin_r=48)
    left.plotly_chart(fig, key="ep_load")
    # Off-rank pairs only, as in the metric above (their cells add up to it): the diagonal is blank.
    mb = stats.off_rank_mb()
    # Colour from 0, so a few percent of difference between pairs does not look like a hot spot.
    heat = go.Figure(go.Heatmap(z=mb, colorscale="Viridis", colorbar={"title": "MB"}, zmin=0,
                                zmax=max((v for row in mb for v in row if v is not None),
                                         default=0.0) or 1.0,
                                hovertemplate="src %{y} -> dst %{x}: %{z:.2f} MB<extra></extra>"))
    heat.update_layout(title="Off-rank dispatch MB by rank pair<br><sup>same rank: blank (never "
                             "sent); combine: the transpose</sup>",
                       xaxis_title="destination rank", yaxis_title="source rank",
                       yaxis_autorange="reversed")
    right.plotly_chart(heat, key="ep_heat")
    st.dataframe(table, hide_index=True)
    download_buttons("ep_ranks", table, {"settings": asdict(checked),
                                         "placement": [list(s) for s in stats.placement.slots]})
    with st.expander("Rank-to-rank traffic table"):
        traffic = traffic_table(stats)
        st.dataframe(traffic, hide_index=True)
        download_buttons("ep_traffic", traffic, {"settings": asdict(checked)})

st.subheader("What a hot expert does to the slowest rank")
st.caption(f"Expert 0 gets a growing share of all tokens; every placement sees the same tokens "
           f"(at most {SWEEP_TOKENS:,} over all ranks, for speed). Greedy uses this batch's loads "
           "(an oracle) and the replicas set above.")
sweep = guarded("ep_sweep", lambda: _sweep(**asdict(checked))) if checked else None
if sweep is not None:
    sweep_df = pd.DataFrame(sweep)
    fig = line_figure(sweep_df, "hot_share", "slowest_vs_mean", "placement", markers=True,
                      labels={"hot_share": "share of tokens on expert 0",
                              "slowest_vs_mean": "slowest rank load / mean load"})
    st.plotly_chart(fig, key="ep_sweep_fig")
    st.dataframe(sweep_df, hide_index=True)
    download_buttons("ep_hot_sweep", sweep_df, {"settings": asdict(checked)})

st.subheader("Measured: a real dispatch on this machine")
st.caption("torchrun starts N CPU processes (gloo); each routes its tokens, exchanges counts and "
           "rows with all_to_all_single, runs its experts and combines. The dispatch, the combine "
           "and the whole layer are each timed next to a plain all_to_all_single of the rows "
           "that cross ranks; ratio = plain time / phase time on the slowest rank. CPU times "
           "show the mechanics, not GPU speed.")
c = st.columns([1, 1, 2])
procs = c[0].number_input("Processes", 2, 4, 2, key="procs", **Q)
if c[1].button("Run the dispatch", key="run_dispatch", icon=":material/play_arrow:"):
    run_job("ep_measured", "dispatch", f"Running {procs} processes...",
            lambda: launch(settings, int(procs), timeout_s=120))
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
    table = ratios_first(pd.DataFrame(doc["summary"]))
    st.dataframe(table, hide_index=True)
    st.caption(f"{(table[MEETS] == 'yes').sum()} of {len(table)} rows meet the dispatch target.")
if results:
    st.caption("Ratios are plain all_to_all_single time (the rows that cross ranks) / phase time on "
               f"the slowest rank; the target ({MEETS}) is dispatch_ratio. Each configuration ran in "
               "rounds; a row is the round with the median dispatch ratio, and "
               "dispatch_ratio_rounds lists every round's. lead_ms: GPU work queued before every "
               "timed call, so the host reaches it ahead of the GPU as in a model step (0: back to "
               "back, the host's own time exposed). overflow_share: share of calls with rows "
               "beyond the split sizes agreed from the last calls. graph_share: share of calls "
               "replayed from a CUDA graph (exchanges up to 256 MiB). "
               "benchmarks/results/README.md says where the time goes.")

st.subheader("Bandwidth against the wire")
st.caption("Bus bandwidth (the bytes that leave each GPU per second; for an even all-to-all "
           "(R - 1) / R of the payload) against the bytes each rank sends, for NCCL's even "
           "all-to-all, the plain all_to_all_single of the layer's off-rank rows, and the "
           "dispatch and combine, on a DeepSeek-V3-like layer (256 experts, k 8, d_model 7168, "
           f"bf16). The dotted line is NVLink 4's {NVLINK_GBPS:.0f} GB/s per direction (H100, "
           "H200). The slowest rank counts.")
sweeps = committed_sweeps()
if not sweeps:
    st.info("No bandwidth sweep is committed yet: it needs a machine with 2 or more GPUs. It is "
            "made by `NCCL_NVLS_ENABLE=0 python -m torch.distributed.run --standalone "
            "--nproc-per-node 4 benchmarks/bench_ep_sweep.py --decode --out benchmarks/results` "
            "(and again with 2 processes).", icon=":material/info:")
for i, doc in enumerate(sweeps):
    st.markdown(f"**{doc['device']}**, {doc['world']} ranks, {doc['backend']}, {doc['date']} "
                f"(torch {doc['torch']}, CUDA {doc.get('cuda')}, NCCL {doc.get('nccl')})")
    table = pd.DataFrame(doc["sweep"])
    sweep_rows = table[table["case"] == "sweep"]
    names = {"even": "NCCL all-to-all (even)", "plain_dispatch": "plain all_to_all_single",
             "dispatch": "dispatch", "combine": "combine"}
    long = sweep_rows.melt(id_vars=["payload_MB"], value_vars=[f"{n}_busbw_GBps" for n in names],
                           var_name="exchange", value_name="bus_GBps")
    long["exchange"] = long["exchange"].str.removesuffix("_busbw_GBps").map(names)
    fig = line_figure(long, "payload_MB", "bus_GBps", "exchange", markers=True, xaxis_type="log",
                      labels={"payload_MB": "MB sent per rank", "bus_GBps": "bus bandwidth, GB/s"})
    fig.add_hline(y=doc["nvlink_GBps"], line_dash="dot", annotation_text="NVLink per direction")
    st.plotly_chart(fig, key=f"ep_wire_{i}")
    first = ["payload_MB", "tokens"] + [f"{n}_busbw_GBps" for n in names] + \
        ["dispatch_ratio", "combine_ratio"]
    st.dataframe(sweep_rows[first + [c for c in sweep_rows if c not in first + ["case"]]],
                 hide_index=True)
    decode = table[table["case"] == "decode"]
    if len(decode):
        ours = [{"source": f"this layer, {doc['device']}", "setting": f"{doc['world']} ranks, "
                 "bf16 both ways", "dispatch_us": 1e3 * decode["dispatch_ms"].iloc[0],
                 "combine_us": 1e3 * decode["combine_ms"].iloc[0]}]
        st.markdown("Decoding: 128 tokens per rank, d_model 7168, k 8, 256 experts; published "
                    "figures for scale (other machines, other rank counts)")
        st.dataframe(pd.DataFrame(ours + doc["published"])[
            ["source", "dispatch_us", "combine_us", "setting"]], hide_index=True)

st.subheader("Training with experts on several ranks")
st.caption("The training lab's model with every MoE layer's experts split over R ranks "
           "(dispatch and combine of this layer, with their backward: the reverse exchange), the "
           "rest data-parallel. Routers see their rank's tokens only, so a load-balancing loss is "
           "computed per rank's batch.")
runs = committed_training()
if not runs:
    st.info("No multi-GPU training run is committed yet. It is made by `NCCL_NVLS_ENABLE=0 "
            "python -m torch.distributed.run --standalone --nproc-per-node 4 "
            f"benchmarks/bench_ep_train.py {BENCH_ARGS} --out benchmarks/results` (and again "
            "with 2 processes).", icon=":material/info:")
for i, doc in enumerate(runs):
    st.markdown(f"**{doc['device']}**, {doc['world']} ranks, {doc['backend']}, {doc['date']}, "
                f"{doc['dtype']}, {doc['batch_per_rank']} sequences of {doc['model']['seq_len']} "
                f"tokens per rank (torch {doc['torch']})")
    m = st.columns(3)
    m[0].metric("Expert-parallel tokens/s", f"{doc['ep_tokens_per_s']:,.0f}")
    m[1].metric("Same model on one device", f"{doc['one_device_tokens_per_s']:,.0f}")
    m[2].metric("Speed-up over one device", f"{doc['speedup_vs_one_device']:.2f}x")
    phases = {k.removesuffix("_ms"): v for k, v in doc["slowest_rank_phases_ms"].items()
              if k not in ("one_device_step_ms", "ep_step_ms")}
    fig = bar_figure(pd.DataFrame({"phase": list(phases), "ms": list(phases.values())}), "phase", "ms",
                     labels={"ms": "ms per step (slowest rank)"},
                     title=f"Where a step of {doc['slowest_rank_phases_ms']['ep_step_ms']:.1f} ms goes")
    st.plotly_chart(fig, key=f"ep_train_{i}")

st.markdown("Check on this machine: 2 CPU processes (gloo) train a small model for 3 steps, each "
            "beside the single-process model on both ranks' tokens (from a shell: "
            "`python -m engine dispatch --train-check`).")
if st.button("Run the check", key="run_train_check", icon=":material/play_arrow:"):
    run_job("ep_train_check", "check", "Training on 2 processes...",
            lambda: launch_check(2, steps=3, timeout_s=150))
check = st.session_state.get("ep_train_check")
if check is not None:
    st.caption(f"{check['world']} ranks, {check['backend']}, {check['device']}, {check['date']}: "
               f"largest loss difference {check['max_loss_abs_err']:.1e}, largest gradient "
               f"difference {check['max_grad_abs_err']:.1e} (gradients up to "
               f"{check['max_grad_abs']:.2f})")
    st.dataframe(pd.DataFrame([r for rank in check["per_rank"] for r in rank["rows"]]),
                 hide_index=True)
