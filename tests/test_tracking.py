"""Tracking settings, the metric catalogue, and batched logging that loses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlcore.metrics import BY_NAME, CATALOGUE
from rlcore.timing import PHASES
from rlcore.tracking import Tracker, project_root, tracking_settings


def test_default_store_is_embedded_sqlite_under_the_project(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert project_root() == tmp_path
    s = tracking_settings()
    assert s["tracking_uri"] == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert s["artifact_location"] == (tmp_path / "mlruns" / "artifacts").as_uri()


def test_env_var_overrides_the_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    s = tracking_settings(tmp_path)
    assert s["tracking_uri"] == "http://127.0.0.1:5999" and s["artifact_location"] is None


def test_unknown_key_in_mlflow_yml_is_named(tmp_path: Path) -> None:
    (tmp_path / "mlflow.yml").write_text("trackin_uri: x\n")
    with pytest.raises(ValueError, match="unknown key 'trackin_uri'"):
        tracking_settings(tmp_path)


def test_a_2000_step_run_keeps_every_sample_table(tmp_path: Path, monkeypatch) -> None:
    """Samples every 10 steps for 2,000 steps: 200 tables. mlflow's log_table also appends each file to a size-capped
    run tag, which failed at about the 160th table (and then looked like an outage forever)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nflush_interval_s: 30\n")
    t = Tracker("tables", tmp_path)
    run_id = t.start("r", {}, {}, "a: 1\n")
    rows = [{"prompt": "12+3=", "completion": "15", "answer": "15", "reward": 1.0}] * 16
    for step in range(10, 2001, 10):
        t.log_table(step, rows)
    t.finish()
    assert t.outage_since is None
    c = MlflowClient(t.where)
    assert c.get_run(run_id).info.status == "FINISHED"
    files = [f.path for f in c.list_artifacts(run_id, "samples")]
    assert len(files) == 200 and files[-1] == "samples/step_002000.json"
    from dashboard.data import Store

    tables = Store(t.where).samples(run_id)
    assert len(tables) == 200 and list(tables[2000].columns) == ["prompt", "completion", "answer", "reward"]


def test_catalogue_is_unique_and_covers_every_phase() -> None:
    assert len(BY_NAME) == len(CATALOGUE)
    for p in PHASES:
        assert f"timing/{p}" in BY_NAME
    assert all(m.unit and m.formula for m in CATALOGUE)


def test_batched_logging_delivers_every_step_in_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nflush_interval_s: 5\n")
    t = Tracker("unit", tmp_path)
    run_id = t.start("r", {"k": "v"}, {"a.b": 1}, "a: {b: 1}\n")
    for step in range(1, 1501):  # more than one log_batch request (1000 metrics) per flush
        t.log(step, {"reward/mean": step / 10})
    with pytest.raises(KeyError, match="not in rlcore.metrics.CATALOGUE"):
        t.log(1, {"made/up": 1.0})
    t.finish()  # the flush interval never elapsed: finish must still deliver everything
    c = MlflowClient(t.where)
    hist = sorted(c.get_metric_history(run_id, "reward/mean"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, 1501))
    assert c.get_run(run_id).info.status == "FINISHED" and c.get_run(run_id).data.params == {"a.b": "1"}


def test_a_run_that_fails_while_starting_is_not_left_running(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    t = Tracker("unit-start", tmp_path)

    def broken(*a, **k):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(t.client, "log_text", broken)  # fails after create_run, while logging config.yaml
    with pytest.raises(OSError, match="artifact store unreachable"), t.run("r", {}, {}, "a: 1\n"):
        pass
    c = MlflowClient(t.where)
    (run,) = c.search_runs([c.get_experiment_by_name("unit-start").experiment_id])
    assert run.info.status == "FAILED"


def test_interrupted_run_is_killed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    t = Tracker("unit-kill", tmp_path)
    with pytest.raises(KeyboardInterrupt), t.run("r", {}, {}, "a: 1\n"):
        raise KeyboardInterrupt
    assert MlflowClient(t.where).get_run(t.run_id).info.status == "KILLED"


def test_store_down_at_exit_keeps_metrics_for_replay(tmp_path: Path, monkeypatch, capsys) -> None:
    """The store stops answering and is still down when the run ends: nothing is lost; `rlcore replay` delivers it
    all, in order, and sets the final status."""
    import sys

    from rlcore import cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nflush_interval_s: 0.05\n"
                                         "finish_timeout_s: 0.5\n")
    t = Tracker("unit-outage", tmp_path)
    run_id = t.start("r", {}, {}, "a: 1\n")
    t.log(1, {"reward/mean": 0.1})
    t.drain()
    real = t.client.log_batch

    def down(*a, **k):
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(t.client, "log_batch", down)
    monkeypatch.setattr(t.client, "set_terminated", down)
    for step in range(2, 40):
        t.log(step, {"reward/mean": step / 10})
    t.finish("FINISHED")  # no exception: training's result is safe
    err = capsys.readouterr().err
    spill = tmp_path / ".rlcore_cache" / "undelivered" / f"{run_id}.jsonl"
    assert "MLflow unreachable" in err and f"rlcore replay {spill}" in err and spill.is_file()
    monkeypatch.setattr(t.client, "log_batch", real)
    monkeypatch.setattr(sys, "argv", ["rlcore", "replay", str(spill)])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", t.where)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None)
    c = MlflowClient(t.where)
    hist = sorted(c.get_metric_history(run_id, "reward/mean"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, 40))
    assert c.get_run(run_id).info.status == "FINISHED" and not spill.exists()


def test_runs_started_together_on_a_fresh_store_all_succeed(tmp_path: Path) -> None:
    """MLflow builds a new SQLite schema without a lock; concurrent first runs once crashed with
    `duplicate column name: step`. Four processes released at the same instant must each log a FINISHED run."""
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    go = time.time() + 4.0  # every process imports mlflow first, then all touch the store at this instant
    code = (
        "import sys, time; from pathlib import Path; from rlcore.tracking import Tracker\n"
        f"time.sleep(max(0.0, {go} - time.time()))\n"
        "t = Tracker('race', Path(sys.argv[1]))\n"
        "with t.run('r', {}, {'seed': 0}, 'seed: 0\\n'):\n"
        "    t.log(1, {'reward/mean': 1.0})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-600:] for e in errors)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4


def test_peak_memory_is_per_run_not_per_process() -> None:
    """A lesson or --seeds runs many runs in one process; each must report its own peak, not the process's."""
    from rlcore.metrics import peak_memory_mb, reset_peak_memory

    reset_peak_memory()
    base = peak_memory_mb()
    block = bytearray(256 * 2**20)  # touch 256 MB, then free it
    block[:: 4096] = b"x" * len(block[:: 4096])
    del block
    assert peak_memory_mb() > base + 200
    reset_peak_memory()
    assert peak_memory_mb() < base + 100
