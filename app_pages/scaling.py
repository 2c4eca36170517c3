"""Scaling breakpoints: is there a knee in this scaling curve, where, and how sure are we?"""

from __future__ import annotations

import html
from dataclasses import asdict

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages._ui import download_buttons, guarded, last_good, refused
from app_pages._ui import table as show_table  # `table` here is the data
from engine.scaling_breakpoint import MAX_SEED
from engine.scaling_data import (DATASETS, MAX_UPLOAD_BYTES, Filter, SyntheticSpec, detection_curve,
                                 generate_synthetic, load_dataset, parse_csv, select_xy)
from engine.scaling_forms import FORMS, smooth_rivals
from engine.scaling_intervals import DEFAULT_METHOD, METHOD_NAMES, METHODS
from engine.scaling_lab import LOSSES, PAGE_LABELS, FitSettings, LabResult, analyse, other_forms

Q = {"bind": "query-params"}
NONE = "(none)"
SOURCES = {"bnsl_4digit": "BNSL 4-digit addition", "chinchilla": "Chinchilla runs (Epoch extraction)",
           "synthetic": "Synthetic (known knee)", "upload": "Upload a CSV"}
NOISE_LEVELS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
COLORS = {"power": "#7f7f7f", "saturating": "#17becf", "bnsl": "#9467bd"}


@st.cache_data(show_spinner=False, max_entries=16)
def _table(source: str, csv: bytes | None, syn: dict | None) -> pd.DataFrame:
    if source == "upload":
        return parse_csv(csv or b"")
    if source == "synthetic":
        return generate_synthetic(SyntheticSpec(**syn))
    return load_dataset(source)


@st.cache_data(show_spinner="Fitting...", max_entries=32)
def _lab(source: str, csv: bytes | None, syn: dict | None, x: str, y: str, flt: tuple | None,
         nd: tuple[str, str] | None, split: str | None, fit: dict) -> LabResult:
    table = _table(source, csv, syn)
    filters = (Filter.parse(*flt),) if flt else ()
    return analyse(select_xy(table, x, y, filters, nd, split), FitSettings(**fit), forms=False)


# Cached apart from the fit: the other forms do not depend on seed, loss or interval settings.
@st.cache_data(show_spinner="Fitting other forms...", max_entries=32)
def _forms(source: str, csv: bytes | None, syn: dict | None, x: str, y: str, flt: tuple | None,
           nd: tuple[str, str] | None, split: str | None, fit: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = _table(source, csv, syn)
    filters = (Filter.parse(*flt),) if flt else ()
    return other_forms(select_xy(table, x, y, filters, nd, split), FitSettings(**fit))


@st.cache_data(show_spinner="Simulating detection...", max_entries=16)
def _detection(syn: dict, min_segment: int) -> pd.DataFrame:
    return detection_curve(SyntheticSpec(**syn), NOISE_LEVELS, 200, min_segment)


def _reset_columns() -> None:
    """A new data source has other columns: drop the old column choices so its defaults apply."""
    for key in ("x", "y", "fcol", "frange", "hold", "split", "ncol", "dcol", "target"):
        st.session_state.pop(key, None)


def _short(value: float, digits: int) -> str:
    """`value` to `digits` significant digits, exponents written short: 9.125e7, not 9.125e+07."""
    mantissa, e, exp = f"{value:.{digits}g}".partition("e")
    return mantissa + (f"e{int(exp)}" if e else "")


def _pick(label: str, options: list[str], default: str | None, key: str, col=st) -> str:
    index = options.index(default) if default in options else 0
    return col.selectbox(label, options, index=index, key=key, **Q)


st.title("Scaling breakpoints")
st.caption("Is there really a knee in this scaling curve, and where? Exact global least-squares fit of "
           "a two-segment power law in log-log space (repeated sizes welcome: every row is fitted), "
           "intervals checked for coverage across designs, a test that accounts for the searched "
           "breakpoint, and other scaling forms on the same points. Same numbers from a shell: "
           "`python -m engine fit --help`.")

# ---------------------------------------------------------------- data
c = st.columns([3, 1])
# No format_func on bound radios: the URL carries the displayed label, so options stay short.
source = c[0].radio("Data", list(SOURCES), captions=list(SOURCES.values()), horizontal=True, key="src",
                     on_change=_reset_columns, **Q)
seed = c[1].number_input("Seed", 0, MAX_SEED, 0, key="seed", **Q, help="noise, resamples, simulations")
csv_bytes, syn = None, None
source_name = SOURCES[source]
no_file = False
if source == "upload":
    up = st.file_uploader(f"CSV with a header row (at most {MAX_UPLOAD_BYTES // 2**20} MiB)", type="csv",
                          key="csv")
    # Replacing a file passes through a run without one: an earlier upload's results stay on
    # screen (marked as such) rather than the page going blank for a moment. The notice has its
    # slot on every run: an element inserted only then would shift every element below it, and
    # the browser would redraw the charts' places with other elements until the next run.
    no_file = up is None
    notice = st.empty()
    if no_file and not str(st.session_state.get("_scaling_source", "")).startswith("upload"):
        notice.info("Upload a CSV with a size column and a loss column, or pick a bundled table.")
        st.stop()
    if not no_file:
        csv_bytes = up.getvalue()
        source_name = f"upload {up.name!r}"
elif source == "synthetic":
    c = st.columns(5)
    syn = asdict(SyntheticSpec(
        n_points=int(c[0].slider("Points", 6, 200, 30, key="n", **Q)),
        breakpoint=10 ** c[1].slider("Knee (log10 size)", 7.2, 10.8, 9.0, 0.1, key="knee", **Q),
        slope_before=c[2].slider("Slope before", -1.0, 0.5, -0.08, 0.01, key="s1", **Q),
        slope_after=c[3].slider("Slope after", -1.0, 0.5, -0.14, 0.01, key="s2", **Q),
        noise=c[4].select_slider("Noise (std of ln loss)", (0.0,) + NOISE_LEVELS, 0.01, key="noise", **Q),
        seed=int(seed)))

table = last_good("scaling_table") if no_file else \
    guarded("scaling_table", lambda: _table(source, csv_bytes, syn), PAGE_LABELS)
if table is None:
    st.stop()
ds = DATASETS.get(source)
cols = [str(c) for c in table.columns]
c = st.columns(4)
# Uploads and synthetic data: first column is the size, second the loss, unless chosen otherwise.
x_col = _pick("Size column (x)", cols, ds.x if ds else cols[0], "x", c[0])
y_col = _pick("Loss column (y)", cols, ds.y if ds else cols[min(1, len(cols) - 1)], "y", c[1])
f_col = _pick("Filter column", [NONE] + cols, NONE, "fcol", c[2])
f_range = c[3].text_input("Filter range: low, high", "", key="frange", **Q,
                       help="two numbers separated by a comma, either may be empty, e.g. 8e18,1.2e19")

with st.expander("Fit settings", expanded=False):
    c = st.columns(4)
    min_seg = c[0].number_input("Min points per segment", 2, 50, 2, key="m", **Q)
    continuous = c[1].checkbox("Continuous at the knee", True, key="cont", **Q)
    n_boot = c[2].select_slider("Bootstrap resamples", (200, 500, 1000, 2000), 1000, key="boot", **Q)
    level = c[3].select_slider("Interval level", (0.8, 0.9, 0.95, 0.99), 0.95, key="lvl", **Q)
    c = st.columns(4)
    method = c[0].selectbox("Interval method", METHODS, METHODS.index(DEFAULT_METHOD), key="ci", **Q,
                            help="; ".join(f"{k}: {v}" for k, v in METHOD_NAMES.items())
                            + f". Default {DEFAULT_METHOD}: the best coverage of the 95 % interval "
                            "across small, weak and end-of-range knees at reasonable width "
                            "(benchmarks/bench_breakpoint_ci.py).")
    compare = c[1].checkbox("Compare interval methods", False, key="cmp", **Q)
    loss = c[2].radio("Loss on ln(loss)", LOSSES, key="loss", **Q, horizontal=True,
                      help="huber: down-weights outliers (heavy-tailed noise); intervals then "
                      "treat the final weights as known")
    c = st.columns(4)
    holdout = c[0].radio("Fit on", ("none", "split", "first_k"), key="hold", **Q,
                         index=1 if ds and ds.split else 0,
                         captions=("all rows", "the split column's 'train' rows", "the k smallest sizes"))
    split_col = _pick("Split column", [NONE] + cols, ds.split if ds else NONE, "split", c[1])
    first_k = c[2].number_input("k", 4, 100_000, 10, key="k", **Q)
    c = st.columns(4)
    n_col = _pick("Params column for L(N, D)", [NONE] + cols, ds.nd[0] if ds and ds.nd else NONE, "ncol", c[0])
    d_col = _pick("Tokens column for L(N, D)", [NONE] + cols, ds.nd[1] if ds and ds.nd else NONE, "dcol", c[1])
    forms = c[2].multiselect("Other forms", list(FORMS), list(FORMS), key="forms", **Q)
    target = c[3].number_input("Extrapolate to size", value=None, min_value=0.0, format="%g", key="target",
                               **Q, help="empty: no extrapolation")

flt = None
if f_col != NONE:
    lo, _, hi = f_range.partition(",")
    flt = (f_col, lo, hi)
elif f_range.strip():
    st.info("The filter range applies once a Filter column is chosen.", icon=":material/info:")
fit = asdict(FitSettings(min_segment=int(min_seg), continuous=bool(continuous), n_boot=int(n_boot),
                         level=float(level), seed=int(seed), holdout=holdout, first_k=int(first_k),
                         target=float(target) if target else None, forms=tuple(forms), method=method,
                         compare=bool(compare), loss=loss))
nd = (n_col, d_col) if NONE not in (n_col, d_col) else None
split = split_col if holdout == "split" and split_col != NONE else None
# After a refused upload, keep showing the last fit rather than parsing (and refusing) it again,
# marked as the earlier table's: the uploader already shows the new file's name.
stale = no_file or refused("scaling_table")
res: LabResult | None = last_good("scaling_lab") if stale else \
    guarded("scaling_lab", lambda: _lab(source, csv_bytes, syn, x_col, y_col, flt, nd, split, fit),
            PAGE_LABELS)
if res is None:
    st.stop()
stale = stale or refused("scaling_lab")
if not stale:
    st.session_state["_scaling_source"] = source_name
shown = st.session_state.get("_scaling_source", "an earlier table")
earlier_slot = st.empty()  # on every run, for the reason given at the uploader
if stale and shown != source_name:
    earlier_slot.warning(f"The results below are those of the earlier table ({shown})"
               + ("." if no_file else f", not of {source_name}, which was refused."),
               icon=":material/history:")

form_keys = ("min_segment", "holdout", "first_k", "target", "forms")
forms_res = last_good("scaling_forms") if stale else guarded("scaling_forms", lambda: _forms(
    source, csv_bytes, syn, x_col, y_col, flt, nd, split, {k: fit[k] for k in form_keys}), PAGE_LABELS)
form_table, form_curves = forms_res if forms_res is not None else (pd.DataFrame(), pd.DataFrame())

# ---------------------------------------------------------------- headline
m, t = res.model, res.test
iv = res.intervals
lo, hi = iv.breakpoint
k = st.columns(5)
k[0].metric("Breakpoint", _short(m.breakpoint, 3), help=f"{iv.level:.0%} interval: {METHOD_NAMES[iv.method]}")
k[0].caption(f"{iv.level:.0%} CI {_short(lo, 4)} to {_short(hi, 4)} ({iv.method})")
for col, name, value, (a, b) in ((k[1], "Slope before", m.slope_before, iv.slope_before),
                                 (k[2], "Slope after", m.slope_after, iv.slope_after)):
    col.metric(name, f"{value:.3f}", help="d ln(loss) / d ln(size)")
    col.caption(f"CI {a:.3f} to {b:.3f}")
# No simulated sup-F reached the observed one: the p-value is the Monte Carlo floor 1 / (n_sim + 1).
floor = t.n_sim and t.supf_pvalue <= 1 / (t.n_sim + 1)
k[3].metric("sup-F p-value", f"{'≤ ' if floor else ''}{t.supf_pvalue:.3g}", help="Monte Carlo p-value of 'no break' that "
            "accounts for the breakpoint being searched (Davies-type); naive F-test p "
            f"{t.f_pvalue:.2g}")
k[4].metric("BIC(broken) - BIC(single)", f"{t.delta_bic:.1f}", help="negative favours a break")
verdict = t.supported(0.05)
earlier = f"Last valid result ({shown}): " if stale else ""
rivals = smooth_rivals(form_table) if verdict else []
bend = "; ".join(f"{f} {d:+.1f}" for f, d in rivals)
(st.info if stale else st.warning if rivals or not verdict else st.success)(
    earlier + ("A break is supported: sup-F rejects a single power law at 5 % and BIC prefers the break."
               if verdict else "No convincing break: a single power law is not rejected, or BIC prefers it.")
    + (f" But a smooth bend fits about as well or better (BIC against the break: {bend}): the data "
       "show curvature, not necessarily a sharp knee." if rivals else ""))
if iv.note:
    st.caption(f"The breakpoint interval {iv.note}.")

# ---------------------------------------------------------------- figures
def _label_at(fig: go.Figure, x: float, text: str, xanchor: str = "left", y: float = 1.0) -> None:
    """A label at height y (1: the plot's top) at data x on a log x axis. Plotly places an annotation
    on a log axis at log10 of its x (add_vline's and add_vrect's own labels pass x as is, off the plot)."""
    fig.add_annotation(x=float(np.log10(x)), xref="x", y=y, yref="paper", text=text, showarrow=False,
                       xanchor=xanchor, yanchor="top",
                       xshift=4 if xanchor == "left" else -4)  # off a line drawn at that x


pts, cur = res.points, res.curve
fig = go.Figure()
fig.add_vrect(x0=lo, x1=hi, fillcolor="orange", opacity=0.15, line_width=0)
_label_at(fig, lo, f"breakpoint CI ({iv.method})")
fig.add_trace(go.Scatter(x=cur["x"], y=cur["pi_high"], line_width=0, showlegend=False, hoverinfo="skip"))
fig.add_trace(go.Scatter(x=cur["x"], y=cur["pi_low"], line_width=0, fill="tonexty",
                         fillcolor="rgba(31,119,180,0.12)", name=f"{iv.level:.0%} prediction band"))
fig.add_trace(go.Scatter(x=cur["x"], y=cur["ci_high"], line_width=0, showlegend=False, hoverinfo="skip"))
fig.add_trace(go.Scatter(x=cur["x"], y=cur["ci_low"], line_width=0, fill="tonexty",
                         fillcolor="rgba(31,119,180,0.3)", name=f"{iv.level:.0%} confidence band"))
fig.add_trace(go.Scatter(x=cur["x"], y=cur["broken_fit"], name="two-segment fit", line_color="#1f77b4"))
for name, color in COLORS.items():
    if name in form_curves:
        fig.add_trace(go.Scatter(x=form_curves["x"], y=form_curves[name], name=name, line=dict(color=color, dash="dot"),
                                 visible="legendonly"))
for train, label, sym in ((True, "fitted points", "circle"), (False, "held-out points", "x")):
    p = pts[pts["train"] == train]
    if len(p):
        fig.add_trace(go.Scatter(x=p["x"], y=p["y"], mode="markers", name=label, marker_symbol=sym,
                                 marker_color="black" if train else "#d62728",
                                 customdata=p["line"], hovertemplate="line %{customdata}: %{x:.4g}, %{y:.4g}"))
if not res.extrapolation.empty:
    e = res.extrapolation.iloc[0]
    fig.add_trace(go.Scatter(x=[e["target"]], y=[e["predicted_loss"]], mode="markers", name="extrapolation",
                             marker=dict(symbol="star", size=14, color="#2ca02c"),
                             error_y=dict(type="data", symmetric=False,
                                          array=[e["pi_high"] - e["predicted_loss"]],
                                          arrayminus=[e["predicted_loss"] - e["pi_low"]])))
if syn is not None:
    fig.add_vline(x=syn["breakpoint"], line_dash="dash", line_color="green")
    _label_at(fig, syn["breakpoint"], "true knee", xanchor="right", y=0.94)  # below the interval's label
# Column names may come from an upload: escaped, as plotly draws <b>, <a href> ... in titles.
fig.update_xaxes(type="log", title=html.escape(x_col))
fig.update_yaxes(type="log", title=html.escape(y_col))
# The legend goes below the x-axis title, not over it.
fig.update_layout(title="Log-log fit with the breakpoint interval", height=560,
                  legend=dict(orientation="h", yanchor="top", y=-0.2, x=0), margin_b=120)
st.plotly_chart(fig, key="scaling_fit")

left, right = st.columns(2)
resid = go.Figure(go.Scatter(x=pts["x"], y=pts["residual"], mode="markers",
                             marker_color=np.where(pts["train"], "black", "#d62728")))
resid.add_hline(y=0, line_dash="dot")
resid.add_vline(x=m.breakpoint, line_dash="dash", line_color="orange")
resid.update_xaxes(type="log", title=html.escape(x_col))
resid.update_layout(title="Residuals, ln(loss) - ln(fit)", yaxis_title="log residual", height=360)
left.plotly_chart(resid, key="scaling_resid")
hist = go.Figure(go.Histogram(x=res.boot.breakpoints, nbinsx=40, marker_color="orange"))
hist.update_xaxes(title=f"bootstrap breakpoints ({res.boot.n_valid} resamples)")
hist.update_layout(title="Where the resamples put the knee", height=360)
right.plotly_chart(hist, key="scaling_boot")

# ---------------------------------------------------------------- tables
st.subheader("Two-segment fit")
st.caption(f"Intervals: {METHOD_NAMES[iv.method]}" + (" (default)" if iv.method == DEFAULT_METHOD else "")
           + ". Other methods: Fit settings, Interval method.")
# Sizes reach 1e20 (Chinchilla's FLOPs): one %g format per column (table() writes it as text).
SIG = "%.6g"
show_table(res.summary, formats=dict.fromkeys(("estimate", "low", "high"), SIG), hide_index=True,
           key="scaling_summary")
if compare:
    show_table(res.methods, formats=dict.fromkeys(("breakpoint_low", "breakpoint_high"), SIG),
               hide_index=True, key="scaling_methods")
download_buttons("scaling_fit_summary", res.summary, {"model": m.summary, "settings": fit, "x": x_col,
                                                      "y": y_col})
st.subheader("Other forms on the same points")
st.caption("RMSLE is the root mean squared error of natural-log loss; hold-out rows are extrapolated.")
# Short numbers and headers, so the fit column fits beside them without scrolling.
num = st.column_config.NumberColumn
show_table(form_table, formats={"bic": "%.1f", "holdout_rmsle": "%.4f"},
           hide_index=True, key="scaling_forms",
           column_config={"parameters": num("params"),
                          "train_rmsle": num("RMSLE", format="%.4f", help="on the fitted rows")})
download_buttons("scaling_forms", form_table)
if not res.extrapolation.empty:
    st.subheader("Extrapolation")
    show_table(res.extrapolation, formats={"target": SIG}, hide_index=True, key="scaling_extrap")
st.subheader("Predictions per point")
show_table(pts, formats={"x": SIG}, hide_index=True, key="scaling_points")
download_buttons("scaling_predictions", pts)

# ---------------------------------------------------------------- what-if
if source == "synthetic":
    st.subheader("When does the knee stop being detectable?")
    det = guarded("scaling_detect", lambda: _detection(syn, int(min_seg)), PAGE_LABELS)
    if det is not None:
        dfig = go.Figure(go.Scatter(x=det["noise"], y=det["detection_rate"], mode="lines+markers"))
        dfig.add_vline(x=syn["noise"] or NOISE_LEVELS[0], line_dash="dot")
        _label_at(dfig, syn["noise"] or NOISE_LEVELS[0], "current noise")
        dfig.update_xaxes(type="log", title="noise (std of ln loss)")
        dfig.update_yaxes(range=[0, 1.05], title="share of 200 seeds where BIC prefers the break")
        dfig.update_layout(title="Detection rate of this knee against noise", height=360)
        st.plotly_chart(dfig, key="scaling_detect")
        show_table(det, hide_index=True, key="scaling_detect_table")
