"""Algorithms: group runs by a config key (default algorithm.name) and draw mean +- std across seeds."""

import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.data import band

METRICS = ["eval/sampled_reward", "eval/greedy_accuracy", "reward/mean", "kl/mean", "actor/entropy",
           "response/length_mean"]

st.title("Algorithms")
runs = common.load_runs()
if runs is not None:
    rl = runs[(runs["rlcore.kind"] == "rl") & (runs["status"] == "FINISHED")]
    if rl.empty:
        st.info("No finished RL runs yet. `rlcore run experiments/grpo.yaml --seeds 0,1,2` makes a group.")
    else:
        uri = common.store().uri
        exps = st.multiselect("Experiments", sorted(rl["experiment"].unique()), default=sorted(rl["experiment"].unique()))
        rl = rl[rl["experiment"].isin(exps)]
        p = common.params(uri, tuple(rl["run_id"]))
        keys = sorted(p.columns) if not p.empty else ["algorithm.name"]
        group_key = st.selectbox("Group by", keys, index=keys.index("algorithm.name") if "algorithm.name" in keys else 0)
        objective = st.selectbox("Sort by (final value)", METRICS, index=0)
        if p.empty or rl.empty:
            st.info("No runs in these experiments.")
        else:
            groups = p[group_key].astype(str)
            h = common.history(uri, tuple(rl["run_id"]), tuple(METRICS + ["timing/step"]))
            b = band(h[h["key"] != "timing/step"], groups)
            cols = st.columns(2)
            for i, key in enumerate(METRICS):
                part = b[b["key"] == key].rename(columns={"mean": "value", "group": "run"})
                if not part.empty:
                    cols[i % 2].altair_chart(common.line_chart(part, title=f"{key} (mean ± std)", lo="lo", hi="hi", metric=key),
                                             width="stretch")
            last = h.sort_values("step").groupby(["run_id", "key"])["value"].last().unstack()
            speed = h[h["key"] == "timing/step"].groupby("run_id")["value"].mean()
            rows = []
            for g, ids in groups.groupby(groups).groups.items():
                row = {group_key: g, "runs": len(ids)}
                for key in METRICS:
                    v = last.reindex(ids)[key] if key in last else pd.Series(dtype=float)
                    row[key] = f"{v.mean():.3f} ± {v.std(ddof=0):.3f}" if v.notna().any() else "-"
                    row[f"_{key}"] = v.mean()
                row["s/step"] = round(float(speed.reindex(ids).mean()), 3)
                rows.append(row)
            table = pd.DataFrame(rows).sort_values(f"_{objective}", ascending=False)
            st.subheader("Final values (mean ± std across runs)")
            st.dataframe(table[[c for c in table.columns if not c.startswith("_")]], hide_index=True,
                         key="algorithm_summary")
