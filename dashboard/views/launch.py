"""Launch: start an experiment or sweep under experiments/ in the background, follow it (its run, step, ETA), stop it."""

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

ACTIVE = ("running", "stopping")
active = {x.id: (x, x.status(root)) for x in launcher.all_launches(root) if x.status(root) in ACTIVE}
st.session_state["active_launches"] = sorted((k, v[1]) for k, v in active.items())
# Stop and Kill live here, outside the panel that refreshes every 3 s: a click on a button that a timed rerun is
# redrawing at that moment could be lost.
for launch, status in active.values():
    c1, c2 = st.columns([5, 1])
    c1.markdown(f"**{launch.id}** · {launch.file} · {status}")
    if status == "running" and c2.button("Stop", key=f"stop-{launch.id}",
                                         help="SIGTERM: the run finishes its step, checkpoints, closes as KILLED"):
        launcher.stop(launch, root)
        time.sleep(0.5)
        st.rerun()
    if status == "stopping" and c2.button("Kill now", key=f"kill-{launch.id}",
                                          help="SIGKILL: no checkpoint of the last step"):
        launcher.stop(launch, root, force=True)
        time.sleep(0.5)
        st.rerun()


def progress(launch: launcher.Launch) -> None:
    """The launch's MLflow runs (tagged rlcore.launch by the run itself), each with its step, rate and ETA."""
    try:
        runs = common.runs_frame(common.store().uri)
    except Exception:  # noqa: BLE001 - no store yet: the run has not opened
        return
    mine = runs[runs["rlcore.launch"] == launch.id]
    if mine.empty:
        return
    summary = common.summary(common.store().uri, tuple(mine["run_id"]), (), (), ("trainer.steps",))
    for r in mine.sort_values("start").itertuples():
        steps = summary.loc[r.run_id]
        done, total = int(steps.get("steps", 0) or 0), int(float(steps.get("trainer.steps", 0) or 0))
        line = f"[{r.name} ({r.run_id[:8]})](/run?run={r.run_id}) · {r.status} · step {done}/{total or '?'}"
        if r.status == "RUNNING" and done > 0 and total > done:
            rate = r.duration_s / done
            line += f" · {rate:.1f} s/step · ETA {(total - done) * rate / 60:.1f} min"
        st.markdown(line)
        if r.status == "RUNNING" and total:
            st.progress(min(1.0, done / total))


@st.fragment(run_every=3 if active else None)
def launches_panel() -> None:
    launches = launcher.all_launches(root)
    if not launches:
        return
    now_active = sorted((x.id, x.status(root)) for x in launches if x.status(root) in ACTIVE)
    if now_active != st.session_state.get("active_launches"):
        # A launch started, ended or began stopping: redraw its Stop/Kill row above, from fresh reads (the cached
        # ones are up to TTL_S old, and with no launch left running nothing would refresh them: a finished launch
        # kept showing RUNNING · step 4/12)
        common.runs_frame.clear()
        common.summary.clear()
        st.rerun()
    st.subheader("Launches")
    for launch in launches[:20]:
        status = launch.status(root)
        with st.expander(f"{launch.id} · {launch.file} · {status}", expanded=launch.id == st.session_state.get("watch")):
            st.code(" ".join(launch.command[2:]), language="bash")
            progress(launch)
            st.text(launcher.tail(launch.log(root)) or "(no output yet)")


launches_panel()
