"""Benchmark: the Runs page's data load + render on a big store (200 runs x 2,000 steps x 30 metrics = 12M points),
10 runs selected. Targets: < 2 s warm, < 10 s cold.

The store is a real MLflow SQLite store (schema made by MLflow itself); its rows are bulk-inserted with SQL because
logging 12M points through the client would take hours. Timing goes through streamlit's AppTest: the whole page
script, the data layer's SQL, downsampling, altair and element serialisation. Cold = a fresh AppTest with empty
caches; warm = the same page re-run with caches filled (what a user gets when switching back or changing a widget).

    python bench/dashboard_load.py [--runs 200 --steps 2000 --metrics 30 --repeats 3]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from dashboard.common import DEFAULT_METRICS
from rlcore.metrics import CATALOGUE

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def build_store(root: Path, n_runs: int, n_steps: int, n_metrics: int) -> list[str]:
    from mlflow.tracking import MlflowClient

    (root / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_location: mlruns/artifacts\n")
    db = root / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{db}")  # MLflow creates its own schema
    exp = client.create_experiment("bench")
    keys = list(DEFAULT_METRICS) + [m.name for m in CATALOGUE if m.name not in DEFAULT_METRICS]
    keys = keys[:n_metrics]
    run_ids = [uuid.uuid4().hex for _ in range(n_runs)]
    rng = random.Random(0)
    t0 = int(time.time() * 1000) - n_steps * 1000
    con = sqlite3.connect(db)
    con.executemany(
        "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, start_time, "
        "end_time, source_version, lifecycle_stage, artifact_uri, experiment_id) "
        "VALUES (?, ?, 'LOCAL', '', '', 'bench', 'FINISHED', ?, ?, '', 'active', '', ?)",
        [(r, f"run-{i}", t0, t0 + n_steps * 1000, exp) for i, r in enumerate(run_ids)])
    con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                    [(k, v, r) for i, r in enumerate(run_ids)
                     for k, v in (("algorithm", ["grpo", "rloo", "ppo"][i % 3]), ("rlcore.kind", "rl"),
                                  ("seed", str(i % 3)))])
    con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                    [(k, v, r) for i, r in enumerate(run_ids)
                     for k, v in (("algorithm.name", ["grpo", "rloo", "ppo"][i % 3]), ("seed", str(i % 3)),
                                  ("trainer.lr", "0.0001"))])
    for r in run_ids:
        rows = [(k, rng.random(), t0 + s * 1000, r, s, 0) for k in keys for s in range(n_steps)]
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                        rows)
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                        "VALUES (?, ?, ?, ?, 0, ?)", [(k, 0.5, t0 + n_steps * 1000, n_steps - 1, r) for k in keys])
    con.commit()
    con.close()
    return run_ids


def page_time(root: Path, selected: list[str], at=None) -> tuple[float, object]:
    import os

    from streamlit.testing.v1 import AppTest

    os.chdir(root)
    if at is None:
        at = AppTest.from_file(APP, default_timeout=120)
        at.session_state["selected_runs"] = selected
    t = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - t
    assert not at.exception, [e.message for e in at.exception]
    charts = len(at.get("vega_lite_chart"))
    assert charts >= 5, f"expected the 5 default metric charts, got {charts}"
    return elapsed, at


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--metrics", type=int, default=30)
    ap.add_argument("--selected", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        run_ids = build_store(root, args.runs, args.steps, args.metrics)
        size = (root / "mlruns" / "mlflow.db").stat().st_size / 2**20
        print(f"store: {args.runs} runs x {args.steps} steps x {args.metrics} metrics "
              f"= {args.runs * args.steps * args.metrics / 1e6:.1f}M points, {size:.0f} MB, built in "
              f"{time.perf_counter() - t:.0f} s")
        selected = run_ids[:: max(1, args.runs // args.selected)][: args.selected]
        cold, warm = [], []
        import streamlit as st

        for _ in range(args.repeats):
            st.cache_data.clear()
            st.cache_resource.clear()
            c, at = page_time(root, selected)
            w, _ = page_time(root, selected, at)
            cold.append(c)
            warm.append(w)
        print(f"Runs page, {len(selected)} runs selected, 5 metric charts:")
        print(f"  cold (empty caches): median {statistics.median(cold):.2f} s  (target < 10 s)  all {cold}")
        print(f"  warm (cached):       median {statistics.median(warm):.2f} s  (target < 2 s)   all {warm}")


if __name__ == "__main__":
    main()
