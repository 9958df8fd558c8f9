"""What every page shares: the store (cached), cached frames, the run picker whose selection survives page
switches, the metric catalogue's tooltips, and the line chart with a min/max (or std) band."""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.data import Store, StoreError
from rlcore.metrics import BY_NAME
from rlcore.tracking import project_root

# RL defaults pinned first in every metric picker.
DEFAULT_METRICS = ["reward/mean", "eval/sampled_reward", "kl/mean", "actor/entropy", "response/length_mean"]
TTL_S = 5  # short: a RUNNING run's new steps show up on the next refresh


def root() -> Path:
    return project_root()


def store() -> Store:
    return _store(str(root()))


@st.cache_resource
def _store(project: str) -> Store:  # keyed by the project: one process may serve (or test) several
    return Store.for_project(Path(project))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs_frame(uri: str) -> pd.DataFrame:
    return Store(uri).runs()


@st.cache_data(ttl=TTL_S, show_spinner=False)
def history(uri: str, run_ids: tuple[str, ...], keys: tuple[str, ...], max_points: int = 400,
            grid_above: int | None = None) -> pd.DataFrame:
    return Store(uri).history(list(run_ids), list(keys), max_points, grid_above)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def params(uri: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    return Store(uri).params(list(run_ids))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def summary(uri: str, run_ids: tuple[str, ...], last: tuple[str, ...], best: tuple[str, ...],
            param_keys: tuple[str, ...]) -> pd.DataFrame:
    return Store(uri).summary(list(run_ids), list(last), list(best), list(param_keys))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def last_steps(uri: str, run_ids: tuple[str, ...], keys: tuple[str, ...]) -> pd.DataFrame:
    return Store(uri).last_steps(list(run_ids), list(keys))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def values_at(uri: str, run_ids: tuple[str, ...], steps: tuple[tuple[str, int], ...]) -> dict[str, pd.Series]:
    return Store(uri).values_at(list(run_ids), dict(steps))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def extremes(uri: str, run_ids: tuple[str, ...], keys: tuple[str, ...]) -> dict[str, pd.Series]:
    return Store(uri).extremes(list(run_ids), list(keys))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def values_mean(uri: str, run_ids: tuple[str, ...], key: str) -> pd.Series:
    """run_id -> the mean of `key` over every logged point (sum / count, read in SQL)."""
    s = Store(uri).sums(list(run_ids), [key])
    return (s["sum"] / s["n"]).set_axis(s["run_id"]) if not s.empty else pd.Series(dtype=float)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def sums(uri: str, run_ids: tuple[str, ...], keys: tuple[str, ...]) -> pd.DataFrame:
    return Store(uri).sums(list(run_ids), list(keys))


@st.cache_data(ttl=60, show_spinner=False)
def lesson_ids(project: str) -> set[str]:
    """The ids of the lessons that exist (a finding links only to those)."""
    from rlcore.lessons import load_all

    try:
        return {x.meta.id for x in load_all(Path(project))}
    except Exception:  # noqa: BLE001 - a broken lesson file must not break the page that links to lessons
        return set()


def lesson_link(lesson_id: str) -> str:
    """'[lesson NN](/lessons?lesson=NN)' when that lesson exists, else 'lesson NN (not written yet)'."""
    if lesson_id in lesson_ids(str(root())):
        return f"[lesson {lesson_id}](/lessons?lesson={lesson_id})"
    return f"lesson {lesson_id} (not written yet)"


@st.cache_data(ttl=TTL_S, show_spinner=False)
def tokens(uri: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    return Store(uri).tokens(list(run_ids))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def metric_keys(uri: str, run_ids: tuple[str, ...]) -> list[str]:
    return Store(uri).metric_keys(list(run_ids))


def load_runs() -> pd.DataFrame | None:
    """All runs, or None after showing why there are none (never a traceback)."""
    try:
        runs = runs_frame(store().uri)
    except StoreError as e:
        st.info(str(e))
        return None
    if runs.empty:
        st.info("The MLflow store has no runs yet. Start one: `rlcore quickstart`, or the Launch page.")
        return None
    return runs


def label(runs: pd.DataFrame) -> dict[str, str]:
    """run_id -> 'experiment / name (id8)' for pickers."""
    return {r.run_id: f"{r.experiment} / {r.name} ({r.run_id[:8]})" for r in runs.itertuples()}


def short(runs: pd.DataFrame) -> dict[str, str]:
    """run_id -> 'name (id8)': legends and captions (the id tells apart runs that share a name)."""
    return {r.run_id: f"{r.name} ({r.run_id[:8]})" for r in runs.itertuples()}


# ------------------------------------------------------------------------------------------------ URL state
# What a page shows lives in the URL (st.query_params), so a link or a reload shows the same page: the selected
# runs (`runs`, comma-separated ids), metrics (`m`), x axis (`x`), smoothing (`smooth`), log y (`log`), lesson
# (`lesson`), study (`study`), run (`run`). Session state carries the selection across page switches.


def url_get(name: str, default: str | None = None) -> str | None:
    return st.query_params.get(name, default)


def url_list(name: str) -> list[str]:
    v = st.query_params.get(name, "")
    return [x for x in v.split(",") if x]


def url_set(name: str, value) -> None:
    """Write `value` (str, number or list) to the URL; an empty value removes the parameter."""
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    value = "" if value is None else str(value)
    if value:
        if st.query_params.get(name) != value:
            st.query_params[name] = value
    elif name in st.query_params:
        del st.query_params[name]


def selected_runs(runs: pd.DataFrame, default_n: int = 2) -> list[str]:
    """The selection shared by every page: the session's, else the URL's, else the newest `default_n` runs;
    ids not in `runs` are dropped. Ids may be given as prefixes in a hand-written URL."""
    ids = list(runs["run_id"])
    # A link or a reload carries the selection in the URL; switching pages keeps it in the session.
    want = url_list("runs") if "runs" in st.query_params else st.session_state.get("selected_runs", [])
    kept = []
    for w in want:
        match = w if w in ids else next((r for r in ids if r.startswith(w)), None) if len(w) >= 6 else None
        if match and match not in kept:
            kept.append(match)
    if not kept and "selected_runs" not in st.session_state and "runs" not in st.query_params:
        kept = ids[:default_n]
    return kept


def url_run(runs: pd.DataFrame) -> str:
    """The one run a page shows (Run, Samples): the URL's `run` (an id or a prefix), else the first selected run,
    else the newest."""
    ids = list(runs["run_id"])
    want = url_get("run") or next(iter(selected_runs(runs, 1)), ids[0])
    return next((r for r in ids if r.startswith(want)), ids[0])


def set_selected(chosen: list[str]) -> None:
    st.session_state["selected_runs"] = list(chosen)
    url_set("runs", list(chosen))


def pick_runs(runs: pd.DataFrame, key: str = "runs", default_n: int = 2, help: str | None = None) -> list[str]:
    """A run multiselect whose choice is kept across pages and in the URL."""
    labels = label(runs)
    kept = [r for r in selected_runs(runs, default_n) if r in labels] or list(runs["run_id"].head(default_n))
    chosen = st.multiselect("Runs", list(labels), default=kept, format_func=labels.get, key=key, help=help)
    set_selected(chosen)
    return chosen


def metric_table(keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The catalogue's rows for `keys` (in that order; keys not in the catalogue are left out): what each metric
    computes, its unit, what a healthy run shows, the red flag, and the lesson that explains it."""
    rows = [BY_NAME[k] for k in keys if k in BY_NAME]
    return pd.DataFrame({"metric": [m.name for m in rows], "unit": [m.unit for m in rows],
                         "formula": [m.formula for m in rows], "healthy": [m.healthy for m in rows],
                         "red flag": [m.red_flag for m in rows], "lesson": [m.lesson for m in rows]})


# 12 hues, each with a contrast of at least 3:1 (WCAG's bar for lines and symbols) against both Streamlit's light
# background (#ffffff) and its dark one (#0e1117), so a chart reads in either theme; no two alike (tableau20 pairs
# each hue with a pale twin: run 1 and run 2 came out as two blues). A test checks both. They repeat after 12.
PALETTE = ["#4e79a7", "#d95f02", "#59a14f", "#e15759", "#7570b3", "#9c755f", "#e7298a", "#0f8b8d", "#a6761d",
           "#b07aa1", "#6f8a00", "#666666"]


LEGEND_MAX = 8  # series a chart's own legend lists; past it the legend rows squeezed the plot to ~50 px (20 runs)
LEGEND_ROW_PX = 28  # what one legend row takes in the browser (measured: 20 px left the plot 60 px at 8 runs)


def series_style(domain: list[str]) -> dict[str, tuple[str, str]]:
    """Each series' colour and line style, in `domain` order: 12 colours, then the same colours dashed, then
    dotted, so 36 series stay apart (the colours alone repeated after 12)."""
    styles = ("solid", "dashed", "dotted")
    return {name: (PALETTE[i % len(PALETTE)], styles[min(i // len(PALETTE), 2)]) for i, name in enumerate(domain)}


DASHES = {"solid": [1, 0], "dashed": [6, 3], "dotted": [1, 3]}


def shared_legend(domain: list[str]) -> str:
    """One legend for a page of charts that share `domain` (HTML: a swatch of each series' colour and style)."""
    items = [f'<span style="white-space:nowrap;margin-right:14px"><span style="display:inline-block;width:22px;'
             f'border-top:3px {style} {colour};vertical-align:middle;margin-right:5px"></span>{html.escape(name)}</span>'
             for name, (colour, style) in series_style(domain).items()]
    return '<div style="line-height:1.9;font-size:0.85rem">' + " ".join(items) + "</div>"


def line_chart(frame: pd.DataFrame, x: str = "step", color: str = "run", title: str = "", band: bool = True,
               lo: str = "vmin", hi: str = "vmax", domain: list[str] | None = None, metric: str = "",
               log_y: bool = False, raw: pd.DataFrame | None = None) -> alt.Chart:
    """One metric: a line per `color` value plus its band (min/max of the bucket, or mean +- std). `domain` fixes
    the color of each series across charts (a run keeps its color even in a chart where another run is missing).
    A catalogue `metric` (default: the title) gets its unit and formula as the subtitle and in the tooltip.
    The legend lists every series in full; x zooms and pans (drag, wheel; double-click resets); steps are integer
    ticks; `log_y`: a log axis (symlog when a value is <= 0)."""
    m = BY_NAME.get(metric or title)
    names = domain or sorted(frame[color].astype(str).unique()) if len(frame) else (domain or [])
    style = series_style(list(names))
    scale = alt.Scale(domain=list(style), range=[c for c, _ in style.values()])
    dash = alt.StrokeDash(f"{color}:N", scale=alt.Scale(domain=list(style), range=[DASHES[d] for _, d in style.values()]),
                          legend=None)
    # two legend columns while labels are short; one when they are long (two would clip them at the chart's edge)
    ncol = 2 if len(frame) and frame[color].astype(str).str.len().max() <= 30 else 1
    own_legend = len(style) <= LEGEND_MAX  # more: the page draws one shared legend (shared_legend) instead
    legend = alt.Legend(orient="bottom", columns=ncol, labelLimit=0, symbolType="stroke", symbolOpacity=1,
                        title=None) if own_legend else None
    xaxis = alt.Axis(format="d", tickMinStep=1) if x == "step" else alt.Axis(format="~s") if x == "tokens" else alt.Undefined
    base = alt.Chart(frame).encode(x=alt.X(f"{x}:Q", title=x, axis=xaxis),
                                   color=alt.Color(f"{color}:N", scale=scale, legend=legend))
    positive = frame["value"].min() > 0 if len(frame) else True
    yscale = alt.Scale(type="log" if positive else "symlog") if log_y else alt.Scale(zero=False)
    tips = [alt.Tooltip(f"{color}:N", title=color), alt.Tooltip(f"{x}:Q", format="d" if x == "step" else ",.4~g"),
            alt.Tooltip("value:Q", format=".4g", title=f"{m.name} ({m.unit})" if m else "value")]
    line = base.mark_line().encode(y=alt.Y("value:Q", title=None, scale=yscale), tooltip=tips, strokeDash=dash)
    if m:  # the catalogue's formula in every tooltip, one hop from the number
        line = line.transform_calculate(formula=alt.expr.toString(m.formula)).encode(
            tooltip=[*tips, alt.Tooltip("formula:N", title="formula")])
    layers = [line]
    if raw is not None and len(raw):  # the unsmoothed points, faint, behind the smoothed line (a spike stays visible)
        layers.insert(0, alt.Chart(raw).mark_line(opacity=0.25, strokeWidth=1).encode(
            x=alt.X(f"{x}:Q"), y=alt.Y("value:Q", scale=yscale), color=alt.Color(f"{color}:N", scale=scale, legend=None),
            detail=f"{color}:N"))
    if len(frame) and frame.groupby(color).size().min() <= 2:  # a line needs two points: perf/cpu_s has one
        layers.append(base.mark_circle(size=60, opacity=1).encode(y=alt.Y("value:Q", scale=yscale), tooltip=tips))
    if band and lo in frame and hi in frame:
        layers.insert(0, base.mark_area(opacity=0.18).encode(y=alt.Y(f"{lo}:Q", scale=yscale), y2=f"{hi}:Q"))
    heading = alt.TitleParams(text=title, subtitle=textwrap.wrap(f"{m.unit} · {m.formula}", 70), subtitleFontSize=10,
                              subtitleColor="#8a8f98", anchor="start") if m else title  # mid grey: both themes
    # Streamlit fits the whole chart (title, legend, axes) into `height`: grow it with the legend's rows so the
    # plot itself keeps ~220 px however many runs are drawn.
    rows = -(-frame[color].nunique() // ncol) if len(frame) and own_legend else 0
    height = 220 + (44 if m else 20) + LEGEND_ROW_PX * rows + 40
    return alt.layer(*layers).properties(title=heading, height=height).interactive(bind_y=False)
