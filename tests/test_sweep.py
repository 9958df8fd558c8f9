"""Sweeps on Optuna: study and MLflow agree trial by trial, kill -9 then re-run loses and duplicates nothing, a
crashing trial is FAIL and the sweep goes on, bad sweep files exit 2 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlcore.sweep import counts, load_sweep, make_study, run_sweep, storage_from_spec
from rlcore.tracking import tracking_settings

SWEEP = """\
base: rl.yaml
overrides: [trainer.steps=4, logging.eval_every=2, logging.num_samples=0]
space:
  trainer.lr: {{type: float, low: 1.0e-4, high: 3.0e-3, log: true}}
  algorithm.kl_coef: {{type: categorical, choices: [0.0, 0.05]}}
objective: {{metric: eval/greedy_accuracy, direction: maximize}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
n_trials: {n}
workers: {workers}
study_name: {name}
"""


def write_sweep(lab: Path, name: str, n: int, workers: int = 1) -> Path:
    path = lab / f"{name}.yaml"
    path.write_text(SWEEP.format(n=n, workers=workers, name=name))
    return path


def client_for(lab: Path) -> MlflowClient:
    return MlflowClient(tracking_settings(lab)["tracking_uri"])


def check_study_matches_mlflow(lab: Path, name: str, expected_done: int) -> None:
    """Every finished trial has exactly one child run under the one parent; states and values agree."""
    sw = load_sweep(lab / f"{name}.yaml")
    study = make_study(sw, storage_from_spec(sw.storage, lab))
    c = client_for(lab)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("rlcore.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert all(r.info.status != "RUNNING" for r in runs)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == expected_done
    by_number = {int(r.data.tags["rlcore.trial"]): r for r in children}
    for t in trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        state = "FAIL" if t.state.name == "FAIL" else t.state.name
        assert run.data.tags["rlcore.trial_state"] == state
        if t.state.name == "COMPLETE":
            assert run.data.metrics["eval/greedy_accuracy"] == pytest.approx(t.value)
            assert float(run.data.params["trainer.lr"]) == pytest.approx(t.params["trainer.lr"])
    assert len(children) == len(trials)
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert parents[0].data.tags["best.run_id"] == best.user_attrs["mlflow_run_id"]


def test_two_workers_study_and_mlflow_agree(lab: Path) -> None:
    path = write_sweep(lab, "sweep-two", n=4, workers=2)
    out = run_sweep(path, root=lab)
    assert out["counts"]["COMPLETE"] == 4 and out["counts"]["FAIL"] == 0
    check_study_matches_mlflow(lab, "sweep-two", 4)
    # the two workers really both ran trials
    sw = load_sweep(path)
    owners = {t.user_attrs["worker"] for t in make_study(sw, storage_from_spec(sw.storage, lab)).get_trials()}
    assert len(owners) == 2
    # re-running a finished study runs nothing new
    again = run_sweep(path, root=lab)
    assert again["counts"]["COMPLETE"] == 4


def test_crashing_trial_is_fail_and_the_sweep_goes_on(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rlcore.controller

    real = rlcore.controller.run
    calls = {"n": 0}

    def flaky(cfg, root, tags, on_start, on_eval):
        calls["n"] += 1
        if calls["n"] == 2:  # the run exists in MLflow before it crashes, as with a real crash

            def on_eval(step, metrics):
                raise RuntimeError("boom in trial")

        return real(cfg, root, tags, on_start, on_eval)

    monkeypatch.setattr(rlcore.controller, "run", flaky)
    path = write_sweep(lab, "sweep-crash", n=3)
    out = run_sweep(path, root=lab)
    assert out["counts"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 1, "RUNNING": 0, "INTERRUPTED": 0}
    sw = load_sweep(path)
    failed = [t for t in make_study(sw, storage_from_spec(sw.storage, lab)).get_trials() if t.state.name == "FAIL"]
    assert "boom in trial" in failed[0].user_attrs["error"]
    run = client_for(lab).get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["rlcore.trial_state"] == "FAIL"


def test_kill_9_midway_then_rerun_finishes_exactly_the_missing_trials(lab: Path) -> None:
    path = write_sweep(lab, "sweep-kill", n=3)
    path.write_text(path.read_text().replace("trainer.steps=4", "trainer.steps=5000"))  # never done before the kill
    cmd = [sys.executable, "-m", "rlcore.cli", "sweep", str(path)]
    proc = subprocess.Popen(cmd, cwd=lab, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sw = load_sweep(path)
    study = make_study(sw, storage_from_spec(sw.storage, lab))
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for trial 0 to be running with its MLflow run
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        if any(t.number == 0 and "mlflow_run_id" in t.user_attrs for t in running):
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.5)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = next(t for t in study.get_trials() if t.number == 0)
    assert killed.state.name == "RUNNING"  # left behind by kill -9
    assert client_for(lab).get_run(killed.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
    path.write_text(path.read_text().replace("trainer.steps=5000", "trainer.steps=4"))  # finish quickly
    rerun = subprocess.run(cmd, cwd=lab, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 interrupted and re-queued" in rerun.stdout
    trials = study.get_trials()
    c = counts(study)
    assert c["COMPLETE"] == 3 and c["RUNNING"] == 0 and c["INTERRUPTED"] == 1 and c["FAIL"] == 0
    interrupted = next(t for t in trials if t.number == 0)
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.params == interrupted.params and retry.state.name == "COMPLETE"  # the point was not lost
    assert client_for(lab).get_run(interrupted.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert len({tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"}) == 3  # no duplicate


@pytest.mark.parametrize("space, message", [
    ("trainer.lrr: {type: float, low: 0.1, high: 0.2}", "space.trainer.lrr: trainer.lrr: unknown key"),
    ("algorithm.advantage: {type: categorical, choices: []}", "should have at least 1 item"),
    ("trainer.lr: {type: float, low: 0.2, high: 0.1}", "low must be <= high"),
    ("trainer.lr: {type: float, low: 0.0, high: 0.1, log: true}", "a log scale needs low > 0"),
    ("trainer.lr: {type: float, low: -1.0, high: 0.1}", "space.trainer.lr: trainer.lr: must be > 0"),
    ("algorithm.advantage: {type: categorical, choices: [grpo, nope]}", "unknown 'nope'"),
    ("trainer.lr: {type: gaussian, low: 0.1, high: 0.2}", "space.trainer.lr"),
])
def test_bad_sweep_files_exit_2_with_one_line(lab: Path, space: str, message: str) -> None:
    path = lab / "bad-sweep.yaml"
    path.write_text(f"base: rl.yaml\nspace:\n  {space}\n")
    proc = subprocess.run([sys.executable, "-m", "rlcore.cli", "sweep", str(path)], cwd=lab, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in proc.stderr
