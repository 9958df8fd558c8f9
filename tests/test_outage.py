"""A real `mlflow server` on 127.0.0.1 is stopped for ~20 s mid-run and restarted: training goes on, and every
step's metrics arrive, in order."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--default-artifact-root", str(db.parent / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_server_down_for_20s_loses_nothing(lab: Path, tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "server.db"
    server = start_server(db, port)
    uri = f"http://127.0.0.1:{port}"
    steps = 160  # may end during the outage on a fast machine: finish() then waits (lab: finish_timeout_s 90)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    train = subprocess.Popen([sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--set", f"trainer.steps={steps}",
                              "--set", "logging.eval_every=40", "--set", "logging.experiment=test-outage",
                              "--set", "trainer.checkpoint_every=0"],
                             cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(uri)
    try:
        deadline = time.time() + 120
        while True:  # wait until the run exists and has logged some steps
            assert time.time() < deadline and train.poll() is None
            exp = client.get_experiment_by_name("test-outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and runs[0].data.metrics.get("reward/mean") is not None:
                break
            time.sleep(0.5)
        run_id = runs[0].info.run_id
        stop_server(server)
        down_at = time.time()
        time.sleep(20)
        assert train.poll() is None, "training must carry on while the tracker is down"
        server = start_server(db, port)
        outage = time.time() - down_at
        out, err = train.communicate(timeout=600)
        assert train.returncode == 0, err[-3000:]
    finally:
        if train.poll() is None:
            train.kill()
        stop_server(server)
        server = start_server(db, port)
    try:
        assert "MLflow unreachable" in err and "reachable again" in err, err[-3000:]
        r = client.get_run(run_id)
        assert r.info.status == "FINISHED"
        for key in ("reward/mean", "actor/loss", "timing/step", "kl/mean"):
            hist = client.get_metric_history(run_id, key)
            steps_seen = [m.step for m in hist]
            assert sorted(steps_seen) == list(range(1, steps + 1)), key  # every step, once
            by_step = sorted(hist, key=lambda m: m.step)
            assert all(a.timestamp <= b.timestamp for a, b in zip(by_step, by_step[1:], strict=False)), key  # in order
        print(f"outage {outage:.0f} s; {steps} steps delivered")
    finally:
        stop_server(server)
