"""Runs: filter, pick, overlay any metric's curves, and diff the configs of the picked runs."""

import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.data import config_diff, smooth

st.title("Runs")
runs = common.load_runs()
if runs is not None:
    with st.sidebar:
        exps = st.multiselect("Experiment", sorted(runs["experiment"].dropna().unique()))
        algos = st.multiselect("Algorithm", sorted(runs["algorithm"].dropna().unique()))
        status = st.multiselect("Status", sorted(runs["status"].unique()))
        tag = st.text_input("Name or tag contains", "")
    shown = runs
    if exps:
        shown = shown[shown["experiment"].isin(exps)]
    if algos:
        shown = shown[shown["algorithm"].isin(algos)]
    if status:
        shown = shown[shown["status"].isin(status)]
    if tag:
        text = shown.astype(str).apply(lambda r: " ".join(r), axis=1)
        shown = shown[text.str.contains(tag, case=False, regex=False)]
    st.dataframe(shown[["run_id", "experiment", "name", "status", "algorithm", "seed", "start", "duration_s"]],
                 hide_index=True, height=200)
    chosen = common.pick_runs(shown if not shown.empty else runs)
    if not chosen:
        st.info("Pick one or more runs.")
    else:
        uri = common.store().uri
        keys = common.metric_keys(uri, tuple(chosen))
        if not keys:
            st.info("The picked runs have no metrics yet.")
        else:
            defaults = [k for k in common.DEFAULT_METRICS if k in keys] or keys[:4]
            c1, c2, c3 = st.columns([3, 1, 1])
            picked = c1.multiselect("Metrics", keys, default=defaults, help="RL defaults pinned first. Each chart's "
                                    "subtitle is its formula; the table under the charts says what a healthy run "
                                    "shows and what is a red flag.")
            smoothing = c2.slider("Smoothing", 0.0, 0.95, 0.0, 0.05, key="smoothing")
            x = c3.radio("x axis", ["step", "time_s", "tokens"], horizontal=False)
            live = runs.set_index("run_id").loc[chosen, "status"].eq("RUNNING").any()

            @st.fragment(run_every=5 if live else None)
            def charts() -> None:
                need = list(picked) + (["perf/tokens_per_s", "timing/step"] if x == "tokens" else [])
                h = common.history(uri, tuple(chosen), tuple(need))
                if h.empty:
                    st.info("No points for these metrics yet.")
                    return
                names = common.label(runs)
                h = smooth(h, smoothing)
                h["run"] = h["run_id"].map(names)
                if x == "tokens":  # generated tokens so far = cumsum(tokens/s x s/step)
                    w = h[h["key"].isin(["perf/tokens_per_s", "timing/step"])].pivot_table(
                        index=["run_id", "step"], columns="key", values="value")
                    tok = (w["perf/tokens_per_s"] * w["timing/step"]).groupby(level=0).cumsum().rename("tokens")
                    h = h.merge(tok.reset_index(), on=["run_id", "step"], how="inner")
                cols = st.columns(2)
                for i, key in enumerate(picked):
                    part = h[h["key"] == key]
                    if part.empty:
                        continue
                    cols[i % 2].altair_chart(common.line_chart(part, x=x, title=key, domain=[names[r] for r in chosen]), width="stretch")
                if live:
                    st.caption("live: refreshing every 5 s while a picked run is RUNNING")

            charts()
            with st.expander("What these metrics mean (the metric catalogue)"):
                st.dataframe(common.metric_table(picked), hide_index=True, key="metric_catalogue")
        st.subheader("Config diff")
        diff = config_diff(common.params(uri, tuple(chosen)))
        if diff.empty:
            st.caption("Pick two or more runs: only the keys that differ are listed." if len(chosen) < 2
                       else "The picked runs have identical configs.")
        else:
            diff.columns = [c[:8] for c in diff.columns]
            st.dataframe(diff, key="config_diff")
        st.subheader("Picked runs")
        info = runs.set_index("run_id").loc[chosen, ["experiment", "name", "status", "duration_s", "start"]]
        info.insert(0, "mlflow id", pd.Series({r: r for r in chosen}))
        st.dataframe(info, hide_index=True)
