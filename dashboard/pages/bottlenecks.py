"""Bottlenecks: where each step's time goes (per phase), throughput, memory, and rule-based findings."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.findings import diagnose, phase_shares
from rlcore.timing import PHASES

TIMING = [f"timing/{p}" for p in PHASES] + ["timing/step"]
HEALTH = ["reward/zero_var_group_frac", "response/clip_ratio", "actor/entropy", "kl/mean", "actor/clipfrac_high",
          "actor/clipfrac_low", "perf/tokens_per_s", "perf/peak_mem_mb"]

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
        names = common.label(runs)
        summary = []
        for run_id in chosen:
            h = common.history(uri, (run_id,), tuple(TIMING + HEALTH), max_points=2000)
            steps = h.pivot_table(index="step", columns="key", values="value").sort_index()
            steps = steps[steps.index > 0]
            st.subheader(names[run_id])
            if "timing/step" not in steps:
                st.info("This run has no step timings.")
                continue
            stack = steps[[c for c in TIMING[:-1] if c in steps]].copy()
            stack["timing/other"] = (steps["timing/step"] - stack.sum(axis=1)).clip(lower=0)
            long = stack.reset_index().melt("step", var_name="phase", value_name="seconds")
            long["phase"] = long["phase"].str.removeprefix("timing/")
            chart = alt.Chart(long).mark_area().encode(
                x="step:Q", y=alt.Y("seconds:Q", stack="zero", title="s per step"),
                color=alt.Color("phase:N", sort=[*PHASES, "other"]), tooltip=["step", "phase", "seconds"])
            c1, c2 = st.columns([2, 1])
            c1.altair_chart(chart.properties(height=240), width="stretch")
            shares = phase_shares(steps)
            c2.dataframe(shares.rename("share").map(lambda v: f"{v:.1%}"), key=f"shares_{run_id}")
            p = params.loc[run_id].dropna().to_dict() if run_id in params.index else {}
            found = diagnose(p, steps)
            if not found:
                st.success("No findings: no rule fired for this run.")
            for f in found:
                (st.warning if f.severity == "warn" else st.info)(f"**{f.rule}** — {f.message} (lesson {f.lesson})")
            summary.append({"run": names[run_id], "s/step": steps["timing/step"].mean(),
                            "tokens/s": steps.get("perf/tokens_per_s", pd.Series(dtype=float)).mean(),
                            "peak MB": steps.get("perf/peak_mem_mb", pd.Series(dtype=float)).max(),
                            **{f"{k} %": round(100 * v, 1) for k, v in shares.items()}})
        if summary:
            st.subheader("Side by side")
            st.dataframe(pd.DataFrame(summary), hide_index=True, key="bottleneck_summary")
