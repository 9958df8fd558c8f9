"""Launch: start an experiment or sweep under experiments/ in the background, watch it, stop it."""

import time

import streamlit as st

from dashboard import common, launcher
from rlcore.config import ConfigError

st.title("Launch")
root = common.root()
files = launcher.experiment_files(root)
if not files:
    st.info("No YAML files under experiments/.")
else:
    file = st.selectbox("Experiment or sweep (under experiments/)", files,
                        index=files.index("quickstart.yaml") if "quickstart.yaml" in files else 0)
    text = st.text_area("Overrides, one key.path=value per line", "", height=80, key="overrides")
    overrides = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        desc = launcher.validate(root, file, overrides)
        st.caption(f"valid: {desc}")
        ok = True
    except ConfigError as e:
        st.error(f"error: {e}")
        ok = False
    if st.button("Start", disabled=not ok, type="primary"):
        launch = launcher.start(root, file, overrides)
        st.success(f"started {launch.id} (pid {launch.pid})")
        st.session_state["watch"] = launch.id

any_running = any(x.status(root) == "running" for x in launcher.all_launches(root))


@st.fragment(run_every=3 if any_running else None)
def launches_panel() -> None:
    launches = launcher.all_launches(root)
    if not launches:
        return
    st.subheader("Launches")
    for launch in launches[:20]:
        status = launch.status(root)
        with st.expander(f"{launch.id} · {launch.file} · {status}", expanded=launch.id == st.session_state.get("watch")):
            st.code(" ".join(launch.command[2:]), language="bash")
            st.text(launcher.tail(launch.log(root)) or "(no output yet)")
            if status == "running" and st.button("Stop", key=f"stop-{launch.id}"):
                launcher.stop(launch, root)
                time.sleep(0.5)
                st.rerun()


launches_panel()
