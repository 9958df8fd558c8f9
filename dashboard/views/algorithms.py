"""Algorithms: finished RL runs grouped by configuration (seeds of one config form a group), each group's mean ± std
over its seeds, and a table that compares groups fairly: at one common step, on the best value, or on the area
under the curve up to that step, never on each run's last value at different steps."""

import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.data import LOWER_IS_BETTER, band, common_steps, group_labels, group_table, mixed_groups, per_run_values

METRICS = ["eval/sampled_reward", "eval/greedy_accuracy", "reward/mean", "kl/mean", "actor/entropy",
           "response/length_mean"]
CHARTED = 6  # groups drawn by default: more lines than this stop being readable
POINTS = 150  # per group and metric: a half-width chart is ~550 px wide, and each point costs the browser time
MODES = {"at the common step": "at", "best value": "best", "area under the curve (mean up to the common step)": "auc"}

st.title("Algorithms")
runs = common.load_runs()
if runs is not None:
    rl = runs[(runs["rlcore.kind"] == "rl") & (runs["status"] == "FINISHED")]
    if rl.empty:
        st.info("No finished RL runs yet. `rlcore run experiments/grpo.yaml --seeds 0,1,2` makes a group.")
    else:
        uri = common.store().uri
        all_exps = sorted(rl["experiment"].unique())
        exps = st.multiselect("Experiments", all_exps, default=[e for e in common.url_list("exp") if e in all_exps]
                              or all_exps)
        common.url_set("exp", exps if exps != all_exps else [])
        rl = rl[rl["experiment"].isin(exps)]
        trials = rl["rlcore.trial"].notna()
        if trials.any() and not st.toggle(f"Include sweep trials ({int(trials.sum())} runs)", value=False,
                                          help="Each trial is its own config, and a pruned one stops early, which "
                                          "would pull the common step down for every group. The Sweeps page "
                                          "compares trials."):
            rl = rl[~trials]
        c1, c2, c3 = st.columns(3)
        p = common.params(uri, tuple(rl["run_id"]))
        keys = ["config (seeds of one config)", *sorted(p.columns)] if not p.empty else ["config (seeds of one config)"]
        by = c1.selectbox("Group by", keys, index=keys.index(common.url_get("by")) if common.url_get("by") in keys else 0,
                          help="The default groups runs whose configs differ only by the seed (their rlcore.group "
                          "tag). Grouping by one key instead may put different configs in one group: a warning "
                          "then names the keys that differ.")
        common.url_set("by", by if by != keys[0] else "")
        objective = c2.selectbox("Sort by", METRICS, index=0)
        mode_name = c3.selectbox("Compare", list(MODES))
        mode = MODES[mode_name]
        if p.empty or rl.empty:
            st.info("No runs in these experiments.")
        else:
            groups = group_labels(rl, p, None if by == keys[0] else by)
            for g, differing in mixed_groups(groups, p).items():
                st.warning(f"Group **{g}** mixes configs that differ in more than the seed: "
                           + ", ".join(f"`{k}`" for k in differing[:8]) + (" …" if len(differing) > 8 else "")
                           + ". Its band is not a seed spread.")
            ids = tuple(groups.index)
            # The table first, from exact per-run numbers (no history is read for "at the common step"); the
            # charts then read the histories of the groups they draw only.
            last = common_steps(common.last_steps(uri, ids, tuple(METRICS)))
            at_step = {k: last[k] for k in METRICS if k in last}  # in the table's order
            if mode == "at":
                per_run = common.values_at(uri, ids, tuple(at_step.items()))
            elif mode == "best":
                per_run = common.extremes(uri, ids, tuple(METRICS))
            else:
                per_run = per_run_values(common.history(uri, ids, tuple(METRICS), 200, 0), METRICS, "auc", at_step)
            table = group_table(per_run, groups, METRICS)
            speed = common.values_mean(uri, ids, "timing/step")
            table["s/step"] = [round(float(speed.reindex(groups[groups == g].index).mean()), 3)
                               for g in table["group"]]
            table = table.sort_values(f"_{objective}", ascending=objective in LOWER_IS_BETTER, na_position="last")
            n = groups.value_counts()
            # Groups with more seeds first (a band over seeds is the point of this page: six single-run groups
            # hid every multi-seed one), then by the sort metric; the table lists every group.
            first = sorted(table["group"], key=lambda g: -int(n[g]))[:CHARTED]  # sorted() is stable: metric order kept
            drawn = st.multiselect("Groups in the charts", list(table["group"]), default=first,
                                   help=f"At first the {CHARTED} with the most seeds, best by the sort metric among "
                                   "equals; the table lists every group.")
            # grid_above=0: a grid of steps shared by every seed (the bands here are across seeds, not min/max)
            h = common.history(uri, tuple(groups[groups.isin(drawn)].index), tuple(METRICS), POINTS, 0)
            b = band(h, groups)
            b["run"] = b["group"].map(lambda g: f"{g} (n={n[g]})")
            domain = sorted(b["run"].unique())  # a group keeps its colour in every chart, even where it has no line
            cols = st.columns(2)
            for i, key in enumerate(METRICS):
                part = b[b["key"] == key].rename(columns={"mean": "value"})
                if not part.empty:
                    cols[i % 2].altair_chart(common.line_chart(part, title=f"{key} (mean ± std over seeds)", lo="lo",
                                                               hi="hi", metric=key, domain=domain), width="stretch")
            what = {"at": "value at the common step", "best": "best value over the run (max; min for kl/mean)",
                    "auc": "mean over steps up to the common step (area under the curve / steps)"}[mode]
            st.subheader("Groups compared")
            st.caption(f"{what}; mean ± std over each group's runs. Common step per metric: "
                       + ", ".join(f"{k} {s}" for k, s in at_step.items())
                       + " (the last step every run of every group reached).")
            st.dataframe(table[[c for c in table.columns if not c.startswith("_")]], hide_index=True,
                         key="algorithm_summary")
            members = pd.DataFrame({"group": groups, "run": groups.index.map(common.short(runs)),
                                    "seed": rl.set_index("run_id")["seed"].reindex(groups.index)})
            with st.expander(f"Runs per group ({len(groups)} runs)"):
                st.dataframe(members.sort_values(["group", "seed"]), hide_index=True)
