"""Samples: the completions a run logged, filtered and sorted by reward, step and prompt; and two steps or two runs
side by side on the prompts they share."""

import pandas as pd
import streamlit as st

from dashboard import common

SORTS = {"step, then reward": (["step", "reward"], [True, False]), "reward, high first": (["reward"], [False]),
         "reward, low first": (["reward"], [True]), "completion length": (["length"], [False])}


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def all_samples(uri: str, run_id: str) -> pd.DataFrame:
    """Every logged completion of the run: step, prompt, completion, answer, reward, length."""
    from dashboard.data import Store

    tables = Store(uri).samples(run_id)
    if not tables:
        return pd.DataFrame(columns=["step", "prompt", "completion", "answer", "reward", "length"])
    out = pd.concat([t.assign(step=s) for s, t in tables.items()], ignore_index=True)
    out["length"] = out["completion"].astype(str).str.len()
    # the k-th completion of a prompt at a step: lines two tables up completion by completion
    out["k"] = out.groupby(["step", "prompt"]).cumcount()
    return out[["step", "prompt", "completion", "answer", "reward", "length", "k"]]


st.title("Samples")
runs = common.load_runs()
if runs is not None:
    labels = common.label(runs)
    ids = list(labels)
    run_id = st.selectbox("Run", ids, index=ids.index(common.url_run(runs)), format_func=labels.get)
    common.url_set("run", run_id)
    uri = common.store().uri
    t = all_samples(uri, run_id)
    if t.empty:
        st.info("This run logged no sample tables (logging.num_samples = 0, or it has not reached a sample step).")
    else:
        steps = sorted(t["step"].unique())
        c1, c2, c3, c4 = st.columns([2, 2, 2, 2])
        chosen_steps = c1.multiselect("Steps", steps, default=[steps[-1]], help="empty = every logged step")
        lo, hi = float(t["reward"].min()), float(t["reward"].max())
        rng = c2.slider("Reward", lo, hi, (lo, hi)) if hi > lo else (lo, hi)
        text = c3.text_input("Prompt or completion contains", "")
        sort = c4.selectbox("Sort by", list(SORTS))
        view = t[t["step"].isin(chosen_steps or steps) & t["reward"].between(*rng)]
        if text:
            view = view[view["prompt"].str.contains(text, case=False, regex=False)
                        | view["completion"].astype(str).str.contains(text, case=False, regex=False)]
        by, asc = SORTS[sort]
        view = view.sort_values(by, ascending=asc)
        st.caption(f"{len(view)} of {len(t)} logged completions · mean reward {view['reward'].mean():.3f}"
                   if len(view) else "No completion matches the filters.")
        st.dataframe(view.drop(columns="k"), hide_index=True, key="samples_table",
                     column_config={"reward": st.column_config.NumberColumn(format="%.3f")})

        st.subheader("Compare")
        mode = st.radio("Side by side with", ["another step of this run", "another run at the same step"],
                        horizontal=True)
        a_step = st.selectbox("Step", steps, index=len(steps) - 1, key="cmp_step")
        a = t[t["step"] == a_step]
        if mode == "another step of this run":
            b_step = st.selectbox("Other step", steps, index=0, key="cmp_other_step")
            b, b_name = t[t["step"] == b_step], f"step {b_step}"
        else:
            other = st.selectbox("Other run", [r for r in ids if r != run_id], format_func=labels.get, key="cmp_run")
            b, b_name = all_samples(uri, other) if other else t.iloc[0:0], labels.get(other, "")
            b = b[b["step"] == a_step]
        both = a.merge(b, on=["prompt", "k"], suffixes=("", " (other)"))
        if both.empty:
            st.info(f"Step {a_step} and {b_name} share no prompt among the logged completions: each step draws fresh "
                    "training prompts, so two steps of one run rarely share one; two runs with the same seed see "
                    "the same prompts at the same step.")
        else:
            both["Δ reward"] = both["reward (other)"] - both["reward"]
            st.caption(f"{both['prompt'].nunique()} shared prompts, {len(both)} completion pairs · mean reward "
                       f"{both['reward'].mean():.3f} here vs {both['reward (other)'].mean():.3f} in {b_name}")
            st.dataframe(both[["prompt", "answer", "completion", "reward", "completion (other)", "reward (other)",
                               "Δ reward"]].sort_values("Δ reward"), hide_index=True, key="samples_compare")
