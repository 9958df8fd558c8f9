"""Samples: the completions a run logged at a chosen step, with their rewards."""

import streamlit as st

from dashboard import common

st.title("Samples")
runs = common.load_runs()
if runs is not None:
    labels = common.label(runs)
    kept = [r for r in st.session_state.get("selected_runs", []) if r in labels]
    run_id = st.selectbox("Run", list(labels), index=list(labels).index(kept[0]) if kept else 0,
                          format_func=labels.get)
    tables = common.store().samples(run_id)
    if not tables:
        st.info("This run logged no sample tables (logging.num_samples = 0, or it has not reached a sample step).")
    else:
        steps = list(tables)
        step = st.select_slider("Step", steps, value=steps[-1]) if len(steps) > 1 else steps[0]
        t = tables[step]
        st.caption(f"{len(t)} completions at step {step}; mean reward {t['reward'].mean():.3f}")
        st.dataframe(t, hide_index=True, key="samples_table")
