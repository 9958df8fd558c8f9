"""Bottlenecks: where a run's wall-clock goes (start-up, steps, evaluation, checkpoints, other), where each step's
time goes (per phase), throughput, memory, and rule-based findings that read the run's config."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.findings import WALL_PARTS, diagnose, phase_shares, shares_from_sums, wall_clock
from rlcore.timing import PHASES

TIMING = [f"timing/{p}" for p in PHASES] + ["timing/step"]
WALL = ["timing/startup", "timing/step", "timing/eval", "timing/checkpoint", "timing/save", "timing/total",
        "timing/wall"]
DETAIL = 3  # runs with per-step detail at first (each is a chart, two tables and findings)
HEALTH = ["reward/zero_var_group_frac", "response/clip_ratio", "actor/entropy", "kl/mean", "actor/clipfrac_high",
          "actor/clipfrac_low", "perf/tokens_per_s", "perf/peak_mem_mb", "reward/errors"]

st.title("Bottlenecks")
runs = common.load_runs()
if runs is not None:
    rl = runs[runs["rlcore.kind"] == "rl"]
    if rl.empty:
        st.info("No RL runs yet: the phase timings come from `rlcore run`.")
    else:
        chosen = common.pick_runs(rl, default_n=1)
        uri = common.store().uri
        params = common.params(uri, tuple(chosen))
        names = common.short(runs)
        duration = runs.set_index("run_id")["duration_s"]
        sums = common.sums(uri, tuple(chosen), tuple(WALL + TIMING[:-1]))
        summary, walls, totals_of = [], {}, {}
        for run_id in chosen:
            mine = sums[sums["run_id"] == run_id].set_index("key")
            totals = {**mine["sum"].to_dict(), **{f"max:{k}": v for k, v in mine["max"].to_dict().items()}}
            totals_of[run_id] = totals
            walls[run_id] = wall_clock(totals, float(duration.get(run_id, 0) or 0))
        if walls:
            st.subheader("Wall-clock")
            st.caption("Where each run's whole time went: the steps are one part; start-up (models, warm start, "
                       "opening the run), held-out evaluation and checkpoints are the rest. Runs logged before "
                       "these timings existed show them as 'other'.")
            wl = pd.DataFrame(walls).T
            long = wl[list(WALL_PARTS)].rename(index=names).reset_index(names="run").melt(
                "run", var_name="part", value_name="seconds")
            long["share"] = long["seconds"] / long["run"].map(wl["total"].rename(index=names))
            st.altair_chart(alt.Chart(long).mark_bar().encode(
                x=alt.X("seconds:Q", stack="zero", title="seconds of wall-clock"),
                y=alt.Y("run:N", title=None, axis=alt.Axis(labelLimit=0)),
                color=alt.Color("part:N", sort=list(WALL_PARTS), scale=alt.Scale(scheme="tableau10")),
                order=alt.Order("part_order:Q"),
                tooltip=["run", "part", alt.Tooltip("seconds:Q", format=".1f"), alt.Tooltip("share:Q", format=".1%")])
                .transform_calculate(part_order=f"indexof({list(WALL_PARTS)}, datum.part)")
                .properties(height=70 + 36 * len(walls)), width="stretch")
        detail = st.multiselect("Per-step detail for", chosen, default=chosen[:DETAIL], format_func=names.get,
                                help=f"The first {DETAIL} ticked runs at first; the table at the end covers all.")
        every = common.history(uri, tuple(chosen), tuple(TIMING + HEALTH), max_points=400)  # one read for all
        for run_id in chosen:
            # charts and rules on <= 400 points per metric; the shares and the wall-clock from SQL sums of every step
            h = every[every["run_id"] == run_id]
            steps = h.pivot_table(index="step", columns="key", values="value").sort_index()
            steps = steps[steps.index > 0]
            steps.attrs["shares"] = shares_from_sums(totals_of[run_id]).to_dict()  # a dict: pandas compares attrs
            if "timing/step" not in steps:
                if run_id in detail:
                    st.subheader(names[run_id])
                    st.info("This run has no step timings.")
                continue
            shares, wall = phase_shares(steps), walls[run_id]
            p = params.loc[run_id].dropna().to_dict() if run_id in params.index else {}
            found = diagnose(p, steps, wall)
            summary.append({"run": names[run_id], "wall-clock s": round(float(wall["total"]), 1),
                            "s/step": steps["timing/step"].mean(),
                            "tokens/s": steps.get("perf/tokens_per_s", pd.Series(dtype=float)).mean(),
                            "peak MB": steps.get("perf/peak_mem_mb", pd.Series(dtype=float)).max(),
                            "findings": ", ".join(f.rule for f in found),
                            **{f"{k} % wall": round(100 * float(wall[k] / wall["total"]), 1) for k in WALL_PARTS},
                            **{f"{k} %": round(100 * v, 1) for k, v in shares.items()}})
            if run_id not in detail:
                continue
            st.subheader(names[run_id])
            stack = steps[[c for c in TIMING[:-1] if c in steps]].copy()
            stack["timing/other"] = (steps["timing/step"] - stack.sum(axis=1)).clip(lower=0)
            long = stack.reset_index().melt("step", var_name="phase", value_name="seconds")
            long["phase"] = long["phase"].str.removeprefix("timing/")
            chart = alt.Chart(long).mark_area().encode(
                x=alt.X("step:Q", axis=alt.Axis(format="d", tickMinStep=1)),
                y=alt.Y("seconds:Q", stack="zero", title="s per step"),
                color=alt.Color("phase:N", sort=[*PHASES, "other"], scale=alt.Scale(scheme="tableau20")),
                tooltip=["step", "phase", alt.Tooltip("seconds:Q", format=".3f")]).interactive(bind_y=False)
            c1, c2 = st.columns([2, 1])
            c1.altair_chart(chart.properties(height=240, title="Per step, by phase"), width="stretch")
            c2.dataframe(pd.DataFrame({"share of step": shares.map(lambda v: f"{v:.1%}")}), key=f"shares_{run_id}")
            c2.dataframe(pd.DataFrame({"seconds": wall.round(1), "share of wall-clock":
                                       (wall / wall["total"]).map(lambda v: f"{v:.1%}")}), key=f"wall_{run_id}")
            if not found:
                st.success("No findings: no rule fired for this run.")
            for f in found:
                (st.warning if f.severity == "warn" else st.info)(
                    f"**{f.rule}** — {f.message} ({common.lesson_link(f.lesson)})")
        if summary:
            st.subheader("Side by side")
            st.dataframe(pd.DataFrame(summary), hide_index=True, key="bottleneck_summary")
