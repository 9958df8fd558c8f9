"""Run: one run on one page (status, config, latest metrics, artifacts, checkpoints, samples) and its management:
rename, note, tags, soft delete and restore, all through MLflow so MLflow's own UI shows the same."""

import pandas as pd
import streamlit as st
import yaml

from dashboard import common

st.title("Run")
if gone := st.session_state.get("just_deleted"):
    box = st.container(border=True)
    box.success(f"Deleted run **{gone['name']}** ({gone['id'][:8]}) of experiment {gone['experiment']}.")
    if box.button(f"Undo: restore {gone['name']}", key="undo-delete"):
        common.store()._client().restore_run(gone["id"])
        del st.session_state["just_deleted"]
        common.url_set("run", gone["id"])
        st.cache_data.clear()
        st.rerun()
runs = common.load_runs()
if runs is not None:
    ids = list(runs["run_id"])
    labels = common.label(runs)
    run_id = st.selectbox("Run", ids, index=ids.index(common.url_run(runs)), format_func=labels.get)
    common.url_set("run", run_id)
    r = runs.set_index("run_id").loc[run_id]
    client = common.store()._client()
    c = st.columns(5)
    c[0].metric("status", r["status"])
    c[1].metric("algorithm", str(r["algorithm"] or "-"))
    c[2].metric("seed", str(r["seed"] or "-"))
    summary = common.summary(common.store().uri, (run_id,), (), (), ("trainer.steps",))
    done = summary.loc[run_id].get("steps")
    total = summary.loc[run_id].get("trainer.steps")
    c[3].metric("steps", f"{int(done) if pd.notna(done) else 0} / {total if isinstance(total, str) else '-'}")
    c[4].metric("duration", f"{r['duration_s']:.0f} s")
    st.caption(f"experiment {r['experiment']} · id {run_id} · started {r['start']:%Y-%m-%d %H:%M:%S}"
               + (f" · group {r['rlcore.group']}" if isinstance(r["rlcore.group"], str) else "")
               + (f" · launched from the Launch page ({r['rlcore.launch']})" if isinstance(r["rlcore.launch"], str) else ""))
    if isinstance(r["rlcore.failure"], str) and r["status"] in ("FAILED", "KILLED"):  # why, first, not in the tags
        st.error(f"{r['status']}: {r['rlcore.failure']}")
    if isinstance(r["mlflow.note.content"], str) and r["mlflow.note.content"]:
        st.info(r["mlflow.note.content"])

    with st.expander("Manage: rename, note, tags, delete", expanded=False):
        with st.form(f"manage-{run_id}"):
            name = st.text_input("Name", r["name"])
            note = st.text_area("Note (markdown; MLflow shows it as the run's description)",
                                r["mlflow.note.content"] if isinstance(r["mlflow.note.content"], str) else "")
            tag = st.text_input("Add or change a tag (key=value)", "")
            if st.form_submit_button("Save"):
                if name != r["name"]:
                    client.update_run(run_id, name=name)
                client.set_tag(run_id, "mlflow.note.content", note)
                if tag:
                    k, sep, v = tag.partition("=")
                    if not sep or not k.strip():
                        st.error("error: a tag is key=value")
                        st.stop()
                    client.set_tag(run_id, k.strip(), v.strip())
                st.cache_data.clear()
                st.rerun()
        user = [t.split("=", 1)[0] for t in (r["tags"] or "").split(", ") if t]
        if user:
            gone = st.selectbox("Remove a tag", ["", *user])
            if gone and st.button(f"Remove tag {gone}"):
                client.delete_tag(run_id, gone)
                st.cache_data.clear()
                st.rerun()
        # Confirmed by typing this run's name, in a box of this run's own: a tick box shared by every run stayed
        # ticked when the page moved on to another run after a delete, and the next click deleted that one.
        typed = st.text_input(f"To delete this run, type its name: {r['name']}", key=f"confirm-delete-{run_id}",
                              help="Soft delete: MLflow keeps the run, and Undo (or Restore below) brings it back.")
        if st.button("Delete run", disabled=typed != r["name"], type="primary", key=f"delete-{run_id}"):
            client.delete_run(run_id)
            st.session_state.pop(f"confirm-delete-{run_id}", None)
            st.session_state["just_deleted"] = {"id": run_id, "name": r["name"], "experiment": r["experiment"]}
            st.session_state["selected_runs"] = [x for x in st.session_state.get("selected_runs", []) if x != run_id]
            common.url_set("run", "")
            st.cache_data.clear()
            st.rerun()

    left, right = st.columns(2)
    with left:
        st.subheader("Latest metrics")
        keys = common.metric_keys(common.store().uri, (run_id,))
        last = common.summary(common.store().uri, (run_id,), tuple(keys), (), ())
        vals = pd.DataFrame({"metric": keys, "last": [last.loc[run_id].get(f"last:{k}") for k in keys]})
        st.dataframe(vals, hide_index=True, height=300, key="run_latest")
        st.subheader("Tags")
        st.dataframe(pd.DataFrame([t.split("=", 1) for t in (r["tags"] or "").split(", ") if t],
                                  columns=["tag", "value"]), hide_index=True)
    with right:
        st.subheader("Config")
        try:
            text = (common.store().artifact_text(run_id, "config.yaml"))
            with st.container(height=420):  # the whole resolved config, scrollable
                st.code(yaml.safe_dump(yaml.safe_load(text), sort_keys=False), language="yaml")
        except Exception as e:  # noqa: BLE001 - a run without its config artifact: say so
            st.caption(f"no config.yaml artifact ({type(e).__name__})")
    st.subheader("Artifacts and checkpoints")
    arts = common.store().artifacts(run_id)
    if arts.empty:  # a statement, not `a if c else b`: Streamlit's magic would print the expression's value (the
        st.caption("no artifacts")  # element's help text, ~4,000 px of it)
    else:
        st.dataframe(arts, hide_index=True, key="run_artifacts")
    ckpts = sorted((common.root() / "outputs" / run_id / "checkpoints").glob("step_*.pt"))
    policy = common.root() / "outputs" / run_id / "policy"
    st.caption((f"checkpoints: {', '.join(p.stem for p in ckpts)} (resume with `rlcore run FILE --resume`)"
                if ckpts else "no checkpoints under outputs/") +
               (f" · final policy: {policy}" if policy.is_dir() else ""))
    st.page_link("views/samples.py", label="Samples of this run", icon=":material/list:",
                 query_params={"runs": run_id})
    st.page_link("views/runs.py", label="Chart it on the Runs page", icon=":material/show_chart:",
                 query_params={"runs": run_id})

    deleted = common.store().deleted_runs()
    if not deleted.empty:
        with st.expander(f"Deleted runs ({len(deleted)})"):
            back = st.selectbox("Restore", deleted["run_id"], format_func=dict(zip(deleted["run_id"],
                                deleted["experiment"] + " / " + deleted["name"] + " (" + deleted["run_id"].str[:8] + ")", strict=True)).get)
            if st.button("Restore run"):
                client.restore_run(back)
                st.cache_data.clear()
                st.rerun()
