"""Lessons: each lesson's text beside its interactive control and the charts of its paired runs."""

import streamlit as st

from dashboard import common
from dashboard.controls import CONTROLS
from rlcore.config import ConfigError
from rlcore.lessons import PARTS, load_all
from rlcore.loading import load_experiment

st.title("Lessons")
root = common.root()
try:
    lessons = load_all(root)
except ConfigError as e:
    st.error(f"error: {e}")
    lessons = []
if not lessons:
    st.info("No lessons under lessons/ yet.")
else:
    ids = [x.meta.id for x in lessons]
    by_id = {x.meta.id: x for x in lessons}
    current = st.session_state.get("lesson", ids[0])
    current = current if current in by_id else ids[0]
    with st.sidebar:
        for part, name in PARTS.items():
            members = [x for x in lessons if x.meta.part == part]
            if members:
                st.caption(name)
                for x in members:
                    if st.button(f"{x.meta.id} · {x.meta.title}", key=f"goto-{x.meta.id}", type="tertiary"):
                        current = x.meta.id
    st.session_state["lesson"] = current
    lesson = by_id[current]
    m = lesson.meta
    i = ids.index(current)
    nav = st.columns([1, 6, 1])
    if nav[0].button("← previous", disabled=i == 0):
        st.session_state["lesson"] = ids[i - 1]
        st.rerun()
    if nav[2].button("next →", disabled=i == len(ids) - 1):
        st.session_state["lesson"] = ids[i + 1]
        st.rerun()
    st.header(f"{m.id} · {m.title}")
    st.caption(f"{PARTS[m.part]} · force: {m.force} · {m.question}")
    text, side = st.columns([3, 2])
    text.markdown(lesson.body)
    with side:
        if m.id in CONTROLS:
            st.subheader("Try it")
            CONTROLS[m.id]()
        if m.experiments:
            st.subheader("Paired runs")
            if m.look_for:
                st.info(f"What to look for: {m.look_for}")
            runs = common.load_runs()
            names = {}
            for f in m.experiments:
                try:
                    names[f] = load_experiment(root / "experiments" / f).logging.experiment
                except ConfigError as e:
                    st.error(f"{f}: {e}")
            if runs is not None:
                paired = runs["lesson"].fillna("").str.split(",").map(lambda ids: m.id in ids)  # a run may serve lessons
                mine = runs[paired | runs["experiment"].isin(names.values())]
                mine = mine[mine["rlcore.kind"] == "rl"]
                if mine.empty:
                    st.caption("None of the paired experiments has been run yet.")
                else:
                    uri = common.store().uri
                    keys = m.metrics or common.DEFAULT_METRICS[:2]
                    h = common.history(uri, tuple(mine["run_id"].head(12)), tuple(keys))
                    h["run"] = h["run_id"].map(common.label(runs))
                    for key in keys:
                        part = h[h["key"] == key]
                        if not part.empty:
                            st.altair_chart(common.line_chart(part, title=key), width="stretch")
            from dashboard import launcher

            for f in m.experiments:
                if st.button(f"Run {f} in the background", key=f"run-{f}"):
                    launch = launcher.start(root, f, [f"logging.tags.lesson='{m.id}'"])
                    st.success(f"started {launch.id}: follow it on the Launch page; the runs appear here when they land")
