"""Runs: the run table is the main control (filter, tick runs to chart them), then any metric's curves and the
config diff of the ticked runs. Selection, metrics, x axis, smoothing and log scale live in the URL."""

import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.data import band as band_over
from dashboard.data import config_diff, group_labels, merge_ticks, numeric_columns, search, smooth

# The table's metric and config columns: what people sort and compare runs by.
LAST = ["reward/mean", "eval/greedy_accuracy", "eval/sampled_reward", "kl/mean"]
BEST = ["eval/sampled_reward"]
PARAMS = ["trainer.lr", "algorithm.kl_coef", "rollout.samples_per_prompt", "trainer.steps"]
X_AXES = ["step", "time_s", "tokens"]
POINTS = 300  # per run and metric (with its min/max band): enough for a half-width chart, cheap for the browser

st.title("Runs")
runs = common.load_runs()
if runs is not None:
    with st.sidebar:
        st.caption("Filters (ticked runs stay ticked when a filter hides them)")
        # in the URL too, so a link or a reload shows the same rows
        def picker(label: str, options: list[str], param: str) -> list[str]:
            chosen = st.multiselect(label, options, default=[v for v in common.url_list(param) if v in options])
            common.url_set(param, chosen)
            return chosen

        exps = picker("Experiment", sorted(runs["experiment"].dropna().unique()), "exp")
        algos = picker("Algorithm", sorted(runs["algorithm"].dropna().unique()), "algo")
        status = picker("Status", sorted(runs["status"].unique()), "status")
        text = st.text_input("Name or tag contains", common.url_get("q", "") or "", key="search")
        common.url_set("q", text)
    shown = runs
    if exps:
        shown = shown[shown["experiment"].isin(exps)]
    if algos:
        shown = shown[shown["algorithm"].isin(algos)]
    if status:
        shown = shown[shown["status"].isin(status)]
    shown = search(shown, text)
    uri = common.store().uri
    selected = common.selected_runs(runs)

    summary = common.summary(uri, tuple(shown["run_id"]), tuple(LAST), tuple(BEST), tuple(PARAMS))
    table = shown.set_index("run_id")[["name", "experiment", "algorithm", "status", "seed", "rlcore.group", "tags",
                                       "start", "duration_s"]].join(summary)
    table = numeric_columns(table, PARAMS)  # MLflow keeps params as text: "0.0003" sorted after "3e-05"
    table.insert(0, "show", table.index.isin(selected))
    table.insert(1, "id", table.index.str[:8])
    table["rlcore.group"] = table["rlcore.group"].str.rsplit("-", n=1).str[-1].str[:8]  # experiment-HASH: the hash
    # The editor's key follows the rows shown: a filter change starts a fresh editor whose ticks come from the
    # selection (an editor keeps edits by row position, which a filter would shift onto other runs).
    edited = st.data_editor(
        table.reset_index(drop=True), hide_index=True, height=min(420, 38 + 35 * len(table)),
        disabled=[c for c in table.columns if c != "show"], key=f"run_table_{hash(tuple(table.index))}",
        column_config={
            "show": st.column_config.CheckboxColumn("show", help="tick to chart the run", width="small"),
            "rlcore.group": st.column_config.TextColumn("group", help="runs of one config that differ only by seed"),
            "steps": st.column_config.NumberColumn("steps", format="%d"),
            "duration_s": st.column_config.NumberColumn("duration", format="%.0f s"),
            **{f"last:{k}": st.column_config.NumberColumn(f"{k} (last)", format="%.3f") for k in LAST},
            **{f"best:{k}": st.column_config.NumberColumn(f"{k} (best)", format="%.3f") for k in BEST},
            **{k: st.column_config.NumberColumn(k, format="%.4g") for k in PARAMS},
        })
    chosen = merge_ticks(selected, list(table.index), set(table.index[edited["show"].to_numpy()]))
    if chosen != selected:
        common.set_selected(chosen)
        st.rerun()  # redraw the charts (and the table's ticks) from the new selection
    common.set_selected(chosen)
    c1, c2 = st.columns([6, 1])
    c1.caption(f"{len(shown)} of {len(runs)} runs shown · {len(chosen)} ticked: "
               + ", ".join(common.short(runs)[r] for r in chosen))
    if c2.button("Clear ticks", disabled=not chosen):
        common.set_selected([])
        st.rerun()
    if not chosen:
        st.info("Tick one or more runs in the table.")
    else:
        keys = common.metric_keys(uri, tuple(chosen))
        if not keys:
            st.info("The ticked runs have no metrics yet.")
        else:
            wanted = [k for k in common.url_list("m") if k in keys]
            defaults = wanted or [k for k in common.DEFAULT_METRICS if k in keys] or keys[:4]
            c1, c2, c3, c4 = st.columns([4, 1, 1, 1])
            picked = c1.multiselect("Metrics", keys, default=defaults, help="RL defaults pinned first. Each chart's "
                                    "subtitle and tooltip give its formula; the table under the charts says what a "
                                    "healthy run shows and what is a red flag.")
            smoothing = c2.slider("Smoothing", 0.0, 0.95, float(common.url_get("smooth", 0.0) or 0.0), 0.05,
                                  key="smoothing")
            x_url = common.url_get("x", "step")
            x = c3.radio("x axis", X_AXES, index=X_AXES.index(x_url) if x_url in X_AXES else 0)
            log_y = c4.toggle("log y", value=common.url_get("log") == "1")
            # min/max of each downsampled bucket: readable for a few runs, clutter (and ~0.1 s of browser time per
            # run and chart) for many, so on by default up to 3 runs
            band = c4.toggle("band", value=common.url_get("band", "1" if len(chosen) <= 3 else "0") == "1",
                             help=f"Min/max of the raw points each drawn point stands for: only a run of more than "
                             f"{POINTS} logged steps is downsampled, so a shorter one has no band (every point is "
                             "drawn). With 'seeds as bands' it is the mean ± std over the seeds.")
            seeds = c3.toggle("seeds as bands", value=common.url_get("seeds") == "1", disabled=x != "step",
                              help="One line per config (runs whose configs differ only by the seed: their "
                              "rlcore.group), its mean ± std over the seeds at each step. By step only.")
            common.url_set("seeds", "1" if seeds else "")
            common.url_set("m", picked if picked != [k for k in common.DEFAULT_METRICS if k in keys] else [])
            common.url_set("smooth", smoothing or "")
            common.url_set("x", "" if x == "step" else x)
            common.url_set("log", "1" if log_y else "")
            common.url_set("band", "" if band == (len(chosen) <= 3) else ("1" if band else "0"))
            live = runs.set_index("run_id").loc[chosen, "status"].eq("RUNNING").any()
            names = common.short(runs)

            @st.fragment(run_every=5 if live else None)
            def charts() -> None:
                # seeds as bands: one grid of steps for every run (the std is taken across runs at each step)
                h = common.history(uri, tuple(chosen), tuple(picked), POINTS, 0 if seeds and x == "step" else None)
                if h.empty:
                    st.info("No points for these metrics yet.")
                    return
                raw = h.assign(run=h["run_id"].map(names)) if smoothing > 0 else None
                h = smooth(h, smoothing)
                h["run"] = h["run_id"].map(names)
                if x == "tokens":  # cumulative generated tokens, summed over every raw step before downsampling
                    h = h.merge(common.tokens(uri, tuple(chosen)), on=["run_id", "step"], how="inner")
                    raw = raw.merge(common.tokens(uri, tuple(chosen)), on=["run_id", "step"]) if raw is not None else None
                domain = [names[r] for r in chosen]
                lo, hi = "vmin", "vmax"
                if seeds and x == "step":  # one line per seed group: mean and std across its runs at each step
                    groups = group_labels(runs[runs["run_id"].isin(chosen)], pd.DataFrame())
                    n = groups.value_counts()
                    b = band_over(h, groups)
                    h = b.assign(run=b["group"].map(lambda g: f"{g} (n={n[g]})")).rename(columns={"mean": "value"})
                    domain, lo, hi, raw = sorted(h["run"].unique()), "lo", "hi", None
                if len(domain) > common.LEGEND_MAX:  # one legend for all the charts, not one squeezing each plot
                    st.markdown(common.shared_legend(domain), unsafe_allow_html=True)
                cols = st.columns(2)
                for i, key in enumerate(picked):
                    part = h[h["key"] == key]
                    if part.empty:
                        continue
                    rpart = raw[raw["key"] == key] if raw is not None else None
                    cols[i % 2].altair_chart(common.line_chart(part, x=x, title=key, log_y=log_y, band=band or seeds,
                                                               lo=lo, hi=hi, domain=domain, raw=rpart), width="stretch")
                if live:
                    st.caption("live: refreshing every 5 s while a ticked run is RUNNING")

            charts()
            with st.expander("What these metrics mean (the metric catalogue)"):
                st.dataframe(common.metric_table(picked), hide_index=True, key="metric_catalogue")
        st.subheader("Config diff")
        diff = config_diff(common.params(uri, tuple(chosen)))
        if diff.empty:
            st.caption("Tick two or more runs: only the keys that differ are listed." if len(chosen) < 2
                       else "The ticked runs have identical configs.")
        else:
            diff.columns = [common.short(runs)[c] for c in diff.columns]
            st.dataframe(diff, key="config_diff")
        st.subheader("Ticked runs")
        info = runs.set_index("run_id").loc[chosen, ["experiment", "name", "status", "duration_s", "start"]]
        info.insert(0, "page", pd.Series({r: f"/run?run={r}" for r in chosen}))
        st.dataframe(info, hide_index=True, column_config={
            "page": st.column_config.LinkColumn("run page", display_text="open", help="config, artifacts, "
                                                "samples, checkpoints; tags, notes, rename, delete")})
