"""rlcore dashboard: `rlcore dashboard` (binds 127.0.0.1) or `streamlit run dashboard/app.py`.

Reads the MLflow store named by mlflow.yml and Optuna's storage; never writes metrics (the Run page renames, notes,
tags and soft-deletes runs through MLflow's client, so MLflow's UI sees the same). Pages are files under views/ (so
AppTest can switch to each) registered with st.navigation.
"""

import sys
from pathlib import Path

import streamlit as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `dashboard` and `rlcore` from a source checkout

# A favicon made here: a page's material icon as favicon is fetched from fonts.gstatic.com, and the lab works offline.
st.set_page_config(page_title="rlcore lab", layout="wide", page_icon=Image.new("RGB", (32, 32), "#4e79a7"))
here = Path(__file__).parent / "views"  # not pages/: Streamlit lists that folder as a second menu on a deep link
nav = st.navigation({
    "Runs": [st.Page(str(here / "runs.py"), title="Runs", icon=":material/show_chart:", default=True),
             st.Page(str(here / "algorithms.py"), title="Algorithms", icon=":material/compare:"),
             st.Page(str(here / "sweeps.py"), title="Sweeps", icon=":material/tune:"),
             st.Page(str(here / "bottlenecks.py"), title="Bottlenecks", icon=":material/timer:"),
             st.Page(str(here / "samples.py"), title="Samples", icon=":material/list:"),
             st.Page(str(here / "run.py"), title="Run", icon=":material/description:", url_path="run")],
    "Learn": [st.Page(str(here / "lessons.py"), title="Lessons", icon=":material/school:")],
    "Do": [st.Page(str(here / "launch.py"), title="Launch", icon=":material/rocket_launch:")],
})
nav.run()
