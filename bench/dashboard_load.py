"""Benchmark: every dashboard page's load on a big store (200 runs x 2,000 steps x 30 metrics = 12M points), cold
and warm, through Streamlit's AppTest and in headless Chromium. Target: every page <= 2 s cold.

The store is a real MLflow SQLite store (schema made by MLflow itself); its rows are bulk-inserted with SQL because
logging 12M points through the client would take hours. Runs come in seed groups of 3 (rlcore.group), with the
timing and eval metrics the pages read, and an Optuna journal holds a 50-trial study for the Sweeps page.

- AppTest: the whole page script, the data layer's SQL, downsampling, altair and element serialisation, in this
  process. Cold = a fresh AppTest with every cache cleared; warm = the same page re-run with caches filled (what a
  user gets when switching back or changing a widget).
- Browser: `rlcore dashboard` on the store and Debian Chromium (Playwright); cold = a fresh server process, so its
  caches are empty (the server's own start-up is not counted: it is paid once); warm = a reload of the same page.
  Time runs from navigation to the script's end (Streamlit's "running" widget gone) with every chart drawn.

    python bench/dashboard_load.py [--runs 200 --steps 2000 --metrics 30 --repeats 3] [--no-browser]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashboard.common import DEFAULT_METRICS  # noqa: E402
from dashboard.serve import SCRIPT_DONE, background  # noqa: E402
from rlcore.metrics import CATALOGUE  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "dashboard" / "app.py")
PAGES = ["runs", "algorithms", "sweeps", "bottlenecks", "samples", "run", "lessons", "launch"]
URL = {"runs": "/", "lessons": "/lessons?lesson=11&"}


def build_store(root: Path, n_runs: int, n_steps: int, n_metrics: int) -> list[str]:
    from mlflow.tracking import MlflowClient

    (root / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_location: mlruns/artifacts\n")
    db = root / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{db}")  # MLflow creates its own schema
    exp = client.create_experiment("bench")
    # the metrics the pages read by default first (Algorithms, Bottlenecks), then the rest of the catalogue
    first = [*DEFAULT_METRICS, "eval/greedy_accuracy", "timing/step", "timing/rollout", "timing/update",
             "timing/reference", "perf/tokens_per_s", "perf/peak_mem_mb", "reward/zero_var_group_frac"]
    keys = first + [m.name for m in CATALOGUE if m.name not in first]
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
                     for k, v in (("algorithm", ["grpo", "rloo", "ppo"][i // 3 % 3]), ("rlcore.kind", "rl"),
                                  ("seed", str(i % 3)), ("rlcore.group", f"bench-{i // 3:08x}"))])
    con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                    [(k, v, r) for i, r in enumerate(run_ids)
                     for k, v in (("algorithm.name", ["grpo", "rloo", "ppo"][i // 3 % 3]), ("seed", str(i % 3)),
                                  ("trainer.lr", str(1e-4 * (1 + i // 3))), ("algorithm.kl_coef", "0.04"),
                                  ("trainer.steps", str(n_steps)), ("rollout.samples_per_prompt", "8"))])
    for r in run_ids:
        rows = [(k, rng.random(), t0 + s * 1000, r, s, 0) for k in keys for s in range(n_steps)]
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                        rows)
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                        "VALUES (?, ?, ?, ?, 0, ?)", [(k, 0.5, t0 + n_steps * 1000, n_steps - 1, r) for k in keys])
    con.commit()
    con.close()
    return run_ids


def add_study(root: Path, n_trials: int = 50) -> None:
    """A finished 2-parameter study in the journal beside the store, each trial with 4 intermediate values."""
    import optuna
    from optuna.distributions import FloatDistribution

    from rlcore.sweep import default_journal, storage_from_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="bench", direction="maximize",
                                storage=storage_from_spec(str(default_journal(root)), root))
    space = {"trainer.lr": FloatDistribution(1e-5, 1e-3, log=True), "algorithm.kl_coef": FloatDistribution(0, 0.2)}
    rng = random.Random(0)
    for _ in range(n_trials):
        lr, beta = 10 ** rng.uniform(-5, -3), rng.uniform(0, 0.2)
        v = 0.6 - abs(lr - 2e-4) * 100 - beta / 10 + rng.gauss(0, 0.01)
        study.add_trial(optuna.trial.create_trial(params={"trainer.lr": lr, "algorithm.kl_coef": beta},
                                                  distributions=space, value=v,
                                                  intermediate_values={s: v * s / 40 for s in (10, 20, 30, 40)}))


def apptest_time(root: Path, page: str, selected: list[str], at=None) -> tuple[float, object]:
    from streamlit.testing.v1 import AppTest

    os.chdir(root)
    t = time.perf_counter()
    if at is None:
        at = AppTest.from_file(APP, default_timeout=300)
        at.query_params["runs"] = ",".join(selected)
        at.query_params["lesson"] = "11"  # a lesson with paired experiments
        if page != "runs":
            at.switch_page(f"views/{page}.py")
    at.run()
    elapsed = time.perf_counter() - t
    assert not at.exception, (page, [e.message for e in at.exception])
    return elapsed, at


# Charts each page draws on this store (the wait is for all of them: React paints them after the script ends).
CHARTS = {"runs": 5, "algorithms": 6, "sweeps": 6, "bottlenecks": 4}


def done(charts: int) -> str:
    """JS: the script has run to its end and `charts` charts are on the page, each drawn."""
    return (f"() => ({SCRIPT_DONE})() && (c => c.length >= {charts} && [...c].every(x => x.querySelector('canvas, svg')))"
            "(document.querySelectorAll('[data-testid=\"stVegaLiteChart\"]'))")


FLOOR_APP = 'import streamlit as st\nst.title("floor")\n'


def browser_times(root: Path, selected: list[str], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per page (and `floor`: a one-line Streamlit app, what any Streamlit page costs in this browser), the cold
    and warm times of each repeat."""
    from playwright.sync_api import sync_playwright

    (root / "floor.py").write_text(FLOOR_APP)
    out: dict[str, tuple[list[float], list[float]]] = {p: ([], []) for p in ["floor", *PAGES]}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        for _ in range(repeats):
            for page_name in ["floor", *PAGES]:
                floor = [sys.executable, "-m", "streamlit", "run", "floor.py", "--server.headless", "true",
                         "--browser.gatherUsageStats", "false"]
                with background(root, floor if page_name == "floor" else None, timeout_s=120) as url:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    path = "/?" if page_name == "floor" else URL.get(page_name, f"/{page_name}?")
                    target = f"{url}{path}{'' if path.endswith(('?', '&')) else '?'}runs={','.join(selected)}"
                    for i in range(2):  # cold, then warm (a reload: same server, caches filled)
                        t = time.perf_counter()
                        page.goto(target) if i == 0 else page.reload()
                        page.wait_for_selector("h1", timeout=120_000)
                        page.wait_for_timeout(100)
                        page.wait_for_function(done(CHARTS.get(page_name, 0)), timeout=120_000)
                        out[page_name][i].append(time.perf_counter() - t - 0.1)
                        assert page.locator('[data-testid="stException"]').count() == 0, page_name
                    page.close()
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--metrics", type=int, default=30)
    ap.add_argument("--selected", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--keep", type=Path, help="build (or reuse) the store here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t = time.perf_counter()
        if args.keep and (root / "mlruns" / "mlflow.db").is_file():
            from dashboard.data import Store

            run_ids = list(Store.for_project(root).runs()["run_id"])[::-1]
        else:
            root.mkdir(parents=True, exist_ok=True)
            run_ids = build_store(root, args.runs, args.steps, args.metrics)
            add_study(root)
            for d in ("lessons", "experiments", "warm_starts"):  # the Lessons and Launch pages read the real ones
                shutil.copytree(REPO / d, root / d, dirs_exist_ok=True)
        size = (root / "mlruns" / "mlflow.db").stat().st_size / 2**20
        print(f"store: {args.runs} runs x {args.steps} steps x {args.metrics} metrics "
              f"= {args.runs * args.steps * args.metrics / 1e6:.1f}M points, {size:.0f} MB, ready in "
              f"{time.perf_counter() - t:.0f} s; {args.selected} runs selected; torch threads: 1 per process")
        selected = run_ids[:: max(1, args.runs // args.selected)][: args.selected]
        import streamlit as st

        print(f"\n{'page':12s} {'AppTest cold':>14s} {'AppTest warm':>14s}"
              + ("" if args.no_browser else f" {'browser cold':>14s} {'browser warm':>14s}") + "   (median of "
              f"{args.repeats}, seconds)")
        rows = {}
        for page in PAGES:
            cold, warm = [], []
            for _ in range(args.repeats):
                st.cache_data.clear()
                st.cache_resource.clear()
                c, at = apptest_time(root, page, selected)
                w, _ = apptest_time(root, page, selected, at)
                cold.append(c)
                warm.append(w)
            rows[page] = (statistics.median(cold), statistics.median(warm))
            if args.no_browser:
                print(f"{page:12s} {rows[page][0]:14.2f} {rows[page][1]:14.2f}", flush=True)
        if not args.no_browser:
            b = browser_times(root, selected, args.repeats)
            print(f"{'(floor)':12s} {'':14s} {'':14s} {statistics.median(b['floor'][0]):14.2f} "
                  f"{statistics.median(b['floor'][1]):14.2f}   a one-line Streamlit app: what any page costs here")
            for page in PAGES:
                print(f"{page:12s} {rows[page][0]:14.2f} {rows[page][1]:14.2f} {statistics.median(b[page][0]):14.2f} "
                      f"{statistics.median(b[page][1]):14.2f}")
        worst = max(rows, key=lambda p: rows[p][0])
        print(f"\nslowest cold page (AppTest): {worst} {rows[worst][0]:.2f} s (target <= 2 s)")


if __name__ == "__main__":
    main()
