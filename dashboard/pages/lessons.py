"""Lessons: each lesson's text beside its interactive control and the charts of its paired runs."""

import streamlit as st

from dashboard import common
from dashboard.controls import CONTROLS
from rlcore.config import ConfigError
from rlcore.lessons import PARTS, load_all
from rlcore.loading import load_experiment


def lesson_charts(own, keys: tuple[str, ...]):
    """(metric, chart) per key: one line per variant (what the lesson changes), the mean over its seeds with a
    mean ± std band; one seed is drawn as it is."""
    h = common.history(common.store().uri, tuple(own["run_id"]), keys)
    if h.empty:
        return
    meta = own.set_index("run_id")
    h["variant"] = h["run_id"].map(meta["variant"].fillna("base"))
    for key in keys:
        part = h[h["key"] == key]
        if part.empty:
            continue
        agg = part.groupby(["variant", "step"])["value"].agg(["mean", "std", "count"]).reset_index()
        agg["std"] = agg["std"].fillna(0.0)
        agg = agg.rename(columns={"mean": "value"}).assign(lo=lambda d: d["value"] - d["std"],
                                                          hi=lambda d: d["value"] + d["std"])
        yield key, common.line_chart(agg, color="variant", title=key, lo="lo", hi="hi")


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
                rl = runs[runs["rlcore.kind"] == "rl"]
                tagged = rl["lesson"].fillna("").str.split(",").map(lambda ids: m.id in ids)  # a run may serve lessons
                own, presets = rl[tagged], rl[~tagged & rl["experiment"].isin(names.values())]
                keys = tuple(m.metrics or common.DEFAULT_METRICS[:2])
                if own.empty:
                    st.caption(f"This lesson's runs have not been made yet: `rlcore lesson {m.id}` (or the button below).")
                else:
                    st.caption(f"This lesson's runs: {len(own)} ({own['variant'].fillna('base').nunique()} variant(s); "
                               "seeds of one variant as mean ± std)")
                    for _key, chart in lesson_charts(own, keys):
                        st.altair_chart(chart, width="stretch")
                if not presets.empty:
                    with st.expander(f"Other runs of the same experiments ({len(presets)}, not made for this lesson)"):
                        h = common.history(common.store().uri, tuple(presets["run_id"].head(12)), keys)
                        h["run"] = h["run_id"].map(common.label(runs))
                        for key in keys:
                            part = h[h["key"] == key]
                            if not part.empty:
                                st.altair_chart(common.line_chart(part, title=key), width="stretch")
            from dashboard import launcher

            if st.button(f"Run this lesson's plan in the background (rlcore lesson {m.id})", key=f"run-lesson-{m.id}"):
                launch = launcher.start_lesson(root, m.id)
                st.success(f"started {launch.id}: follow it on the Launch page; the runs appear here when they land")
