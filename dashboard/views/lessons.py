"""Lessons: each lesson's text beside its interactive control and the charts of its paired runs."""

import altair as alt
import streamlit as st

from dashboard import common
from dashboard.controls import CONTROLS
from dashboard.data import lesson_runs
from rlcore.config import ConfigError
from rlcore.lessons import PARTS, load_all, plan_groups, render
from rlcore.loading import load_experiment


def lesson_charts(own, keys: tuple[str, ...]):
    """(metric, chart) per key: one line per variant (what the lesson changes: the `line` column), the mean over
    its seeds with a mean ± std band; one seed is drawn as it is."""
    h = common.history(common.store().uri, tuple(own["run_id"]), keys)
    if h.empty:
        return
    h["variant"] = h["run_id"].map(own.set_index("run_id")["line"])
    for key in keys:
        part = h[h["key"] == key]
        if part.empty:
            continue
        agg = part.groupby(["variant", "step"])["value"].agg(["mean", "std", "count"]).reset_index()
        agg["std"] = agg["std"].fillna(0.0)
        agg = agg.rename(columns={"mean": "value"}).assign(lo=lambda d: d["value"] - d["std"],
                                                          hi=lambda d: d["value"] + d["std"])
        yield key, common.line_chart(agg, color="variant", title=key, lo="lo", hi="hi")


def versus_charts(own, pairs: list[tuple[str, str]]):
    """(title, chart) per (y, x) pair: y against x (or its square root, `sqrt:x`), one point a step where a run logs
    both, the mean over seeds of each per variant, joined in step order (Gao et al.'s frontier: truth against
    sqrt KL)."""
    keys = tuple(dict.fromkeys(k for y, x in pairs for k in (y, x.removeprefix("sqrt:"))))
    h = common.history(common.store().uri, tuple(own["run_id"]), keys)
    if h.empty:
        return
    h["variant"] = h["run_id"].map(own.set_index("run_id")["line"])
    for y, x in pairs:
        key, root = x.removeprefix("sqrt:"), x.startswith("sqrt:")
        wide = h[h["key"].isin((y, key))].pivot_table(index=["variant", "run_id", "step"], columns="key",
                                                     values="value", aggfunc="last").dropna().reset_index()
        if wide.empty or y not in wide or key not in wide:
            continue
        xname = f"sqrt({key})" if root else key
        wide["x"] = wide[key].clip(lower=0) ** 0.5 if root else wide[key]
        agg = wide.groupby(["variant", "step"]).agg(x=("x", "mean"), y=(y, "mean"), seeds=("run_id", "nunique"))
        agg = agg.reset_index()
        chart = alt.Chart(agg).mark_line(point=True).encode(
            x=alt.X("x:Q", title=xname), y=alt.Y("y:Q", title=y, scale=alt.Scale(zero=False)),
            color=alt.Color("variant:N", legend=alt.Legend(orient="bottom", title=None, labelLimit=0)),
            order="step:Q", tooltip=["variant", "step", alt.Tooltip("x:Q", format=".3f", title=xname),
                                     alt.Tooltip("y:Q", format=".3f", title=y), "seeds"])
        yield f"{y} against {xname}", chart.properties(title=f"{y} against {xname}", height=260)


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
    # The URL names the lesson (a link or a reload opens it); the sidebar and the arrows change it.
    current = common.url_get("lesson") or st.session_state.get("lesson", ids[0])
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
    common.url_set("lesson", current)
    lesson = by_id[current]
    m = lesson.meta
    i = ids.index(current)
    nav = st.columns([1, 6, 1])
    if nav[0].button("← previous", disabled=i == 0):
        st.session_state["lesson"] = ids[i - 1]
        common.url_set("lesson", ids[i - 1])
        st.rerun()
    if nav[2].button("next →", disabled=i == len(ids) - 1):
        st.session_state["lesson"] = ids[i + 1]
        common.url_set("lesson", ids[i + 1])
        st.rerun()
    st.header(f"{m.id} · {m.title}")
    st.caption(f"{PARTS[m.part]} · force: {m.force} · {m.question}")
    text, side = st.columns([3, 2])
    try:
        body = render(lesson.body)
    except ConfigError as e:
        st.error(f"error: {lesson.path.name}: {e}")
        body = lesson.body
    text.markdown(body, unsafe_allow_html=True)  # project files; <details> folds the answers away
    text.caption("The figures this page quotes were measured on a 2-core AMD EPYC (AVX2). On another CPU an end "
                 "figure moves by about the larger of one point and its spread over seeds (lesson 00: measured on "
                 "three CPUs); the charts beside the text are your own runs.")
    with side:
        if m.id in CONTROLS:
            st.subheader("Try it")
            CONTROLS[m.id]()
        if m.blocks():
            st.subheader("Paired runs")
            if m.look_for:
                st.info(f"What to look for: {m.look_for}")
            runs = common.load_runs()
            names = {}
            for f in dict.fromkeys(f for b in m.blocks() for f in b.experiments):
                try:
                    names[f] = load_experiment(root / "experiments" / f).logging.experiment
                except ConfigError as e:
                    st.error(f"{f}: {e}")
            if runs is not None:
                # runs that train something and log curves (preference data sets are artifacts, not curves)
                rl = runs[runs["rlcore.kind"].isin(("rl", "dpo", "reward_model", "search"))]
                mine = []
                for b, block in enumerate(m.blocks()):
                    if b:
                        st.subheader(block.name)
                    try:
                        groups = plan_groups(lesson, root, block)  # rlcore.group -> line label
                    except ConfigError as e:
                        st.error(f"error: {e}")
                        groups = {}
                    # Killed or failed runs are not seeds of the result; a RUNNING one is drawn as it goes.
                    own = lesson_runs(rl, groups)
                    if not own.empty and own["warm_start.sha256"].nunique() > 1:
                        newest = own["warm_start.sha256"].iloc[-1]  # lesson_runs sorts oldest first
                        st.caption(f"{(own['warm_start.sha256'] != newest).sum()} older runs started from another "
                                   "warm start; only those from the newest are drawn.")
                        own = own[own["warm_start.sha256"] == newest]
                    mine += list(own["run_id"])
                    keys = tuple(block.metrics or common.DEFAULT_METRICS[:2])
                    whose = "This study's runs" if b else "This lesson's runs"
                    if own.empty:
                        st.caption(f"{whose} have not been made yet: `rlcore lesson {m.id}` (or the button below).")
                        continue
                    seeds = own.groupby("line")["run_id"].count()
                    st.caption(f"{whose}: {len(own)}, {len(seeds)} line(s): "
                               + "; ".join(f"{k} ({v} seed{'s' if v > 1 else ''})" for k, v in seeds.items())
                               + ". Each line is the mean over its seeds, the band ± one std.")
                    for _key, chart in lesson_charts(own, keys):
                        st.altair_chart(chart, width="stretch")
                    for _title, chart in versus_charts(own, block.versus):
                        st.altair_chart(chart, width="stretch")
                keys = tuple(dict.fromkeys(k for b in m.blocks() for k in b.metrics)) or tuple(common.DEFAULT_METRICS[:2])
                st.markdown("**The metrics on this page**")
                st.dataframe(common.metric_table(keys), hide_index=True, key=f"lesson-metrics-{m.id}")
                presets = rl[~rl["run_id"].isin(mine) & rl["experiment"].isin(names.values())]
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
