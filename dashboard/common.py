"""What every page shares: the store (cached), cached frames, the run picker whose selection survives page
switches, the metric catalogue's tooltips, and the line chart with a min/max (or std) band."""

from __future__ import annotations

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
def history(uri: str, run_ids: tuple[str, ...], keys: tuple[str, ...], max_points: int = 400) -> pd.DataFrame:
    return Store(uri).history(list(run_ids), list(keys), max_points)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def params(uri: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    return Store(uri).params(list(run_ids))


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


def pick_runs(runs: pd.DataFrame, key: str = "runs", default_n: int = 2, help: str | None = None) -> list[str]:
    """A run multiselect whose choice is kept in session state across pages."""
    labels = label(runs)
    kept = [r for r in st.session_state.get("selected_runs", []) if r in labels]
    if not kept:
        kept = list(runs["run_id"].head(default_n))
    chosen = st.multiselect("Runs", list(labels), default=kept, format_func=labels.get, key=key, help=help)
    st.session_state["selected_runs"] = chosen
    return chosen


def metric_table(keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The catalogue's rows for `keys` (in that order; keys not in the catalogue are left out): what each metric
    computes, its unit, what a healthy run shows, the red flag, and the lesson that explains it."""
    rows = [BY_NAME[k] for k in keys if k in BY_NAME]
    return pd.DataFrame({"metric": [m.name for m in rows], "unit": [m.unit for m in rows],
                         "formula": [m.formula for m in rows], "healthy": [m.healthy for m in rows],
                         "red flag": [m.red_flag for m in rows], "lesson": [m.lesson for m in rows]})


def line_chart(frame: pd.DataFrame, x: str = "step", color: str = "run", title: str = "", band: bool = True,
               lo: str = "vmin", hi: str = "vmax", domain: list[str] | None = None, metric: str = "") -> alt.Chart:
    """One metric: a line per `color` value plus its band (min/max of the bucket, or mean +- std). `domain` fixes
    the color of each series across charts (a run keeps its color even in a chart where another run is missing).
    A catalogue `metric` (default: the title) gets its unit and formula as the subtitle and its unit in the tooltip."""
    scale = alt.Scale(domain=domain) if domain else alt.Undefined
    m = BY_NAME.get(metric or title)
    value_title = f"{m.name} ({m.unit})" if m else "value"
    base = alt.Chart(frame).encode(x=alt.X(f"{x}:Q", title=x), color=alt.Color(f"{color}:N", title=None, scale=scale))
    line = base.mark_line().encode(y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
                                   tooltip=[color, x, alt.Tooltip("value:Q", format=".4g", title=value_title)])
    layers = [line]
    if band and lo in frame and hi in frame:
        layers.insert(0, base.mark_area(opacity=0.18).encode(y=f"{lo}:Q", y2=f"{hi}:Q"))
    heading = alt.TitleParams(text=title, subtitle=textwrap.wrap(f"{m.unit} · {m.formula}", 70), subtitleFontSize=10,
                              anchor="start") if m else title
    return alt.layer(*layers).properties(title=heading, height=220)
