"""MLflow run records outside a live run: who owns a RUNNING run, what `--resume` may reopen, closing runs whose
process died, delivering an outage's spill (`rlcore replay`), and a sweep's parent and trial runs. With
rlcore/tracking.py (the live run's writer) the only code of rlcore that talks to MLflow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from rlcore.tracking import CONFIG_TAG, OWNER_TAG, Tracker, experiment_id, local_process_alive, owner, tracking_settings


def client(root: Path | None = None):
    """A client on the project's store (mlflow.yml / MLFLOW_TRACKING_URI), its schema created if new."""
    return Tracker("rlcore", root).client  # the Tracker resolves the settings and serialises the first touch


def owner_alive(tag: str | None) -> bool:
    """Whether the process named by an owner tag exists, other than this one (on another host: assumed alive)."""
    if not tag:
        return False
    alive = local_process_alive(tag)
    return True if alive is None else alive and tag != owner()


def run_state(root: Path, run_id: str) -> tuple[str | None, bool]:
    """(MLflow status or None if the run is gone, whether its owning process is alive)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_settings(root)["tracking_uri"]).get_run(run_id)
    except MlflowException:
        return None, False
    if run.info.lifecycle_stage == "deleted":
        return None, False
    return run.info.status, owner_alive(run.data.tags.get(OWNER_TAG))


def reap_orphans(root: Path, experiment: str, config_hash: str) -> list[str]:
    """Close as KILLED the RUNNING runs of this config whose owning process is gone (kill -9). Returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_settings(root)["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`{CONFIG_TAG}` = '{config_hash}' and attributes.status = 'RUNNING'")
    out = []
    for r in runs:
        if not owner_alive(r.data.tags.get(OWNER_TAG)):
            client.set_tag(r.info.run_id, "rlcore.failure", "process killed (no clean exit); closed by --resume")
            client.set_terminated(r.info.run_id, status="KILLED")
            out.append(r.info.run_id)
    return out


def replay(path: Path) -> tuple[str, int, str | None]:
    """Deliver a spill file left by an outage (`rlcore replay`): its metrics in order, then the run's final status.
    Returns (run_id, metrics delivered, status set)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    footer = next((x for x in lines if isinstance(x, dict)), None)
    if footer is None:
        raise ValueError(f"{path}: no run id in this file (not written by rlcore's tracker?)")
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", footer["tracking_uri"]))
    rows = [Metric(*r) for x in lines if isinstance(x, list) for r in x]
    for i in range(0, len(rows), 1000):
        client.log_batch(footer["run_id"], metrics=rows[i : i + 1000], synchronous=True)
    tables = path.with_name(f"{footer['run_id']}.tables.jsonl")  # sample tables and tags of the same outage
    if tables.is_file():
        from rlcore.tracking import deliver

        for line in tables.read_text().splitlines():
            try:
                deliver(client, footer["run_id"], json.loads(line))
            except ValueError:  # cut by a kill while it was written
                continue
        tables.unlink()
    client.set_terminated(footer["run_id"], status=footer["status"])
    path.unlink()
    return footer["run_id"], len(rows), footer["status"]


# ------------------------------------------------------------------------------------------------ sweeps

def sweep_parent(c, name: str, experiment: str, artifact_location: str | None, sweep: dict[str, Any],
                 params: dict[str, Any]) -> str:
    """Create a sweep's parent run (tagged kind=sweep, its resolved sweep file as an artifact); returns its id."""
    run = c.create_run(experiment_id(c, experiment, artifact_location), run_name=f"sweep:{name}",
                       tags={"rlcore.kind": "sweep", "rlcore.study": name})
    c.log_text(run.info.run_id, yaml.safe_dump(sweep, sort_keys=False), "sweep.yaml")
    for k, v in params.items():
        c.log_param(run.info.run_id, k, v)
    return run.info.run_id


def reopen(c, run_id: str) -> None:
    """Mark a run RUNNING again (a sweep continued by a re-run of the command)."""
    if c.get_run(run_id).info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")


def close_trial(c, run_id: str | None, state: str, status: str | None = None) -> None:
    """Tag a trial's run with its Optuna state, and close it with `status` if it is still RUNNING."""
    if run_id is None:
        return
    c.set_tag(run_id, "rlcore.trial_state", state)
    if status is not None and c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status=status)


def record_best(c, parent: str, finished: int, value: float, tags: dict[str, str]) -> None:
    """The sweep's best value so far as the parent's metric sweep/best_value, and its trial and params as tags."""
    c.log_metric(parent, "sweep/best_value", value, step=finished)
    for k, v in tags.items():
        c.set_tag(parent, k, v)
