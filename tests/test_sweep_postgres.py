"""Scale-out: a real PostgreSQL server on 127.0.0.1 as both the Optuna storage and the MLflow backend store, with two
`rlcore sweep` processes (as if on two machines) joining one study."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from rlcore.sweep import load_sweep, make_study, storage_from_spec


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields its base URL. Root cannot run initdb: use `postgres`."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    data = Path(tempfile.mkdtemp(prefix="rlcore-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, initdb, "-D", str(data / "db"), "-U", "rlcore", "--auth=trust"], check=True,
                   capture_output=True)
    port = free_port()
    subprocess.run([*as_user, pg_ctl, "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        createdb = pg_bin("createdb")
        for db in ("optuna", "mlflow"):
            subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "rlcore", db], check=True)
        yield f"postgresql+psycopg://rlcore@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data / "db"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_sweep_processes_join_one_study_on_postgres(lab: Path, postgres: str) -> None:
    path = lab / "pg-sweep.yaml"
    path.write_text(f"""\
base: rl.yaml
overrides: [trainer.steps=2, logging.eval_every=2, logging.num_samples=0]
study_name: pg-sweep
space:
  trainer.lr: {{type: float, low: 1.0e-4, high: 3.0e-3, log: true}}
objective: {{metric: eval/greedy_accuracy}}
sampler: {{name: random}}
pruner: {{name: none}}
n_trials: 6
storage: {postgres}/optuna
""")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"{postgres}/mlflow", "OMP_NUM_THREADS": "1"}
    # Create the MLflow schema once before two writers start (two processes migrating a fresh store can collide).
    subprocess.run([sys.executable, "-c", "from rlcore.runs import client; client(None)"],
                   cwd=lab, env=env, check=True, timeout=300)
    sw = load_sweep(path)
    storage = storage_from_spec(sw.storage, lab)  # ... and Optuna's tables, so the poll below creates nothing
    cmd = [sys.executable, "-m", "rlcore.cli", "sweep", str(path)]
    # The first "machine" stops claiming once the study holds 3 trials, so the second must take the other 3 however
    # fast or slow either starts; the second joins once the first holds a trial, so both take part.
    first = subprocess.Popen([*cmd, "--trials", "3"], cwd=lab, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        try:
            if optuna.load_study(study_name="pg-sweep", storage=storage).get_trials(deepcopy=False):
                break
        except KeyError:  # the first has not created the study yet
            pass
        time.sleep(0.5)
    second = subprocess.Popen(cmd, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p in (first, second):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    study = make_study(sw, storage)
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)  # each trial ran exactly once
    owners = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert len(owners) == 2  # both processes took trials from the one study
    c = MlflowClient(f"{postgres}/mlflow")
    runs = c.search_runs([c.get_experiment_by_name("pg-sweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get("rlcore.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # closed by the last launcher to finish
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["rlcore.trial"]) for r in children) == list(range(6))
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs)
