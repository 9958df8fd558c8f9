"""SmolLM2-135M-Instruct learns on a CPU: GRPO full fine-tune vs LoRA, side by side.

    python bench/smollm2_learning.py            # run both experiments at once (one torch thread each), then report
    python bench/smollm2_learning.py --report   # only the table, from the newest finished run of each

Both runs share the machine for their whole length, so their s/step compare side by side (on 2 cores one thread
each is faster than two each under contention). The table: held-out greedy accuracy at step 0 and at the end (200
prompts, so one prompt is 0.5 points), the change, median s/step and its phases, peak memory (RSS), wall time.
Extra `--set` overrides apply to both (e.g. `--set trainer.steps=60 --set rollout.prompts_per_step=32` on a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"full fine-tune": "experiments/smollm2_basic_arithmetic.yaml",
               "LoRA r=16": "experiments/smollm2_basic_arithmetic_lora.yaml"}


def launch(overrides: list[str]) -> None:
    env = {**os.environ, "RLCORE_THREADS": os.environ.get("RLCORE_THREADS", "1"), "RLCORE_NO_BAR": "1"}
    procs = {}
    for label, exp in EXPERIMENTS.items():
        cmd = [sys.executable, "-m", "rlcore.cli", "run", exp, *[a for o in overrides for a in ("--set", o)]]
        log = open(ROOT / "outputs" / f"bench-{Path(exp).stem}.log", "w")  # noqa: SIM115 - closed with the process
        procs[label] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"started {label}: {' '.join(cmd[2:])} (log: {log.name})", flush=True)
    t0 = time.time()
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(30)
        print(f"  {time.time() - t0:6.0f} s", flush=True)
    for label, (p, log) in procs.items():
        log.close()
        if p.returncode:
            raise SystemExit(f"{label} exited {p.returncode}; see {log.name}")


def report() -> None:
    from mlflow.tracking import MlflowClient

    from rlcore.loading import load_experiment
    from rlcore.tracking import tracking_settings

    c = MlflowClient(tracking_settings(ROOT)["tracking_uri"])
    rows = []
    for label, exp in EXPERIMENTS.items():
        cfg = load_experiment(ROOT / exp)
        exp_id = c.get_experiment_by_name(cfg.logging.experiment).experiment_id
        found = c.search_runs([exp_id], f"tags.`rlcore.group` = '{cfg.seed_group()}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            print(f"{label}: no finished run of {exp}")
            continue
        r = found[0]

        def hist(key: str, run_id: str = r.info.run_id) -> list[tuple[int, float]]:
            return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))

        acc = hist("eval/greedy_accuracy")
        med = {k: statistics.median(v for _, v in hist(f"timing/{k}")) for k in ("step", "rollout", "reference", "update")}
        rows.append((label, r.info.run_id[:8], acc[0][1], acc[-1][1], acc[-1][0], med,
                     max(v for _, v in hist("perf/peak_mem_mb")), r.data.metrics.get("timing/total", float("nan")),
                     [f"{s}:{v:.3f}" for s, v in acc], r.data.tags.get("torch_threads", "?")))
    print(f"\n{'run':16} {'id':9} {'acc@0':>6} {'acc@end':>7} {'change':>7} {'steps':>5} {'s/step':>7} "
          f"{'rollout':>7} {'ref':>6} {'update':>7} {'peak MB':>8} {'wall s':>7}  threads  evals")
    for label, rid, a0, a1, n, med, mem, wall, evals, threads in rows:
        print(f"{label:16} {rid:9} {a0:6.3f} {a1:7.3f} {100 * (a1 - a0):+6.1f}pt {n:5d} {med['step']:7.1f} "
              f"{med['rollout']:7.1f} {med['reference']:6.1f} {med['update']:7.1f} {mem:8.0f} {wall:7.0f}  "
              f"{threads:>7}  {' '.join(evals)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only print the table from finished runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value for both runs")
    args = ap.parse_args()
    if not args.report:
        (ROOT / "outputs").mkdir(exist_ok=True)
        launch(args.overrides)
    report()


if __name__ == "__main__":
    main()
