"""Sweeps: pick an Optuna study; optimisation history, parameter importance, parallel coordinates, slices, trials."""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import common
from rlcore.sweep import default_journal, storage_from_spec


@st.cache_resource(ttl=common.TTL_S)
def open_storage(spec: str):
    return storage_from_spec(spec, common.root())  # the same reading of a spec as `rlcore sweep`


def trials_frame(study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = "INTERRUPTED" if t.state.name == "FAIL" and t.user_attrs.get("interrupted") else t.state.name
        run = t.user_attrs.get("mlflow_run_id")
        rows.append({"trial": t.number, "state": state, "value": t.value,
                     "run page": f"run?run={run}" if run else None, "mlflow run": run,
                     "steps": t.user_attrs.get("steps_done"), **{f"param:{k}": v for k, v in t.params.items()}})
    return pd.DataFrame(rows)


def intermediate_frame(study) -> pd.DataFrame:
    """The values each trial reported at its eval steps (what the pruner compared): trial, state, step, value."""
    rows = [{"trial": t.number, "state": t.state.name, "step": step, "value": v}
            for t in study.get_trials(deepcopy=False) for step, v in sorted(t.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["trial", "state", "step", "value"])


def log_params(study) -> set[str]:
    """Parameters sampled on a log scale (their axes are drawn in log)."""
    out = set()
    for t in study.get_trials(deepcopy=False):
        out |= {k for k, d in t.distributions.items() if getattr(d, "log", False)}
    return out


st.title("Sweeps")
import optuna  # noqa: E402 - after the title so the page paints first

optuna.logging.set_verbosity(optuna.logging.WARNING)
journal = default_journal(common.root())
spec = st.text_input("Optuna storage", str(journal), help="The journal file beside the MLflow store (default), "
                     "or an RDB URL such as postgresql+psycopg://user@127.0.0.1/optuna")
if "://" not in spec and not __import__("pathlib").Path(spec.removeprefix("journal:")).is_file():
    st.info(f"No sweep has run yet (no journal at {spec}). Start one: `rlcore sweep experiments/sweeps/grpo_lr_beta.yaml`.")
else:
    try:
        storage = open_storage(spec)
        names = optuna.get_all_study_names(storage)
    except Exception as e:  # noqa: BLE001 - a bad URL or unreachable database: say so on the page
        st.error(f"Cannot open the Optuna storage: {e}")
        names = []
    if not names:
        st.info("The storage has no studies yet.")
    else:
        want = common.url_get("study")
        name = st.selectbox("Study", names, index=names.index(want) if want in names else 0)
        common.url_set("study", name)
        study = optuna.load_study(study_name=name, storage=storage)
        df = trials_frame(study)
        logs = log_params(study)
        direction = study.direction.name.lower()
        done = df[df["state"] == "COMPLETE"].copy()
        counts = df["state"].value_counts()
        st.caption(f"{direction} · {len(df)} trials · " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items()))
        params = [c for c in df.columns if c.startswith("param:")]
        if done.empty:
            st.info("No trial has completed yet.")
        else:
            best_row = done.loc[done["value"].idxmax() if direction == "maximize" else done["value"].idxmin()]
            with st.container(border=True):
                b1, b2 = st.columns([1, 3])
                b1.metric(f"Best trial: #{int(best_row['trial'])}", f"{best_row['value']:.4g}",
                          help=f"{direction} of the study's objective")
                b2.markdown("  \n".join(f"`{p[6:]}` = **{best_row[p]:.4g}**" if isinstance(best_row[p], float)
                                         else f"`{p[6:]}` = **{best_row[p]}**" for p in params))
                if isinstance(best_row["mlflow run"], str):
                    b2.page_link("views/run.py", label=f"its run {best_row['mlflow run'][:8]}",
                                 icon=":material/description:", query_params={"run": best_row["mlflow run"]})
            done = done.sort_values("trial")
            best = done["value"].cummax() if direction == "maximize" else done["value"].cummin()
            done["best so far"] = best
            # Vega-Lite reads ':' as a type suffix and '.' as a nested field: chart a copy with plain column names.
            safe = {p: p[len("param:"):].replace(".", "_") for p in params}
            chart_df = done.rename(columns=safe)
            hist = alt.Chart(chart_df).mark_circle(size=60).encode(
                x=alt.X("trial:Q", axis=alt.Axis(format="d", tickMinStep=1)), y=alt.Y("value:Q", scale=alt.Scale(zero=False)),
                tooltip=["trial", "value", *safe.values()])
            hist += alt.Chart(chart_df).mark_line(color="firebrick", interpolate="step-after").encode(x="trial:Q", y="best so far:Q")
            c1, c2 = st.columns(2)
            c1.altair_chart(hist.properties(title="Optimisation history", height=260), width="stretch")
            inter = intermediate_frame(study)
            if not inter.empty:
                st.altair_chart(alt.Chart(inter).mark_line(point=True).encode(
                    x=alt.X("step:Q", axis=alt.Axis(format="d", tickMinStep=1)),
                    y=alt.Y("value:Q", scale=alt.Scale(zero=False), title="reported value"),
                    detail="trial:N", color=alt.Color("state:N", scale=alt.Scale(scheme="tableau10")),
                    tooltip=["trial", "state", "step", alt.Tooltip("value:Q", format=".4g")])
                    .properties(title="Intermediate values per trial (what the pruner compared at each eval step)",
                                height=260).interactive(bind_y=False), width="stretch")
            if len(done) >= 2 and len(params) >= 1:
                try:
                    imp = optuna.importance.get_param_importances(study)
                except (RuntimeError, ValueError) as e:
                    imp = {}
                    c2.caption(f"importance unavailable: {e}")
                if imp:
                    idf = pd.DataFrame({"param": list(imp), "importance": list(imp.values())})
                    c2.altair_chart(alt.Chart(idf).mark_bar().encode(x="importance:Q", y=alt.Y("param:N", sort="-x"))
                                    .properties(title="Parameter importance (PED-ANOVA)", height=260), width="stretch")
            # parallel coordinates: each parameter scaled to [0, 1] (categoricals by rank)
            pc = done[["trial", "value", *params]].copy()
            for p in params:
                col = pc[p]
                num = pd.to_numeric(col, errors="coerce")
                if p[6:] in logs and (num > 0).all():
                    num = np.log10(num)  # log-sampled: equal ratios are equal distances, as the sampler saw them
                if num.isna().any():
                    num = col.astype(str).rank(method="dense")
                span = num.max() - num.min()
                pc[p] = (num - num.min()) / span if span else 0.5
            long = pc.melt(["trial", "value"], var_name="param", value_name="scaled")
            long["param"] = long["param"].str.removeprefix("param:").map(lambda q: f"log10 {q}" if q in logs else q)
            st.altair_chart(alt.Chart(long).mark_line(opacity=0.6).encode(
                x=alt.X("param:N", title=None), y=alt.Y("scaled:Q", title="scaled value"), detail="trial:N",
                color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis")), tooltip=["trial", "value"])
                .properties(title="Parallel coordinates", height=260), width="stretch")
            cols = st.columns(max(1, min(3, len(params))))
            for i, p in enumerate(params):
                numeric = pd.api.types.is_numeric_dtype(done[p])
                xscale = alt.Scale(type="log") if p[6:] in logs else alt.Undefined
                cols[i % len(cols)].altair_chart(alt.Chart(chart_df).mark_circle(size=60).encode(
                    x=alt.X(f"{safe[p]}:{'Q' if numeric else 'N'}", title=p[6:] + (" (log)" if p[6:] in logs else ""),
                            scale=xscale),
                    y=alt.Y("value:Q", scale=alt.Scale(zero=False)), tooltip=["trial", "value"])
                    .properties(title=f"Slice: {p[6:]}", height=200), width="stretch")
        st.subheader("Trials")
        st.dataframe(df, hide_index=True, key="trials_table", column_config={
            "run page": st.column_config.LinkColumn("run page", display_text="open")})
