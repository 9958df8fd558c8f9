"""The algorithm comparison table from the MLflow store: held-out greedy accuracy and sampled reward before -> after,
mean +- std over seeds, and s/step, for every preset run with `rlcore run experiments/X.yaml --seeds 0,1,2`.

    python bench/algorithm_table.py [--experiments grpo ppo ...] [--root PROJECT]

Runs are matched by MLflow experiment name (each preset logs to its own) and must be FINISHED; the newest run per
seed is used. Note s/step is only comparable between runs made on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from dashboard.data import Store

PRESETS = ["reinforce", "ppo", "grpo", "rloo", "dapo", "drgrpo", "agentic_calculator"]
EVALS = ["eval/greedy_accuracy", "eval/sampled_reward"]


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:.1f} ± {sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", nargs="*", default=PRESETS)
    ap.add_argument("--root", type=Path, default=Path.cwd())
    args = ap.parse_args()
    store = Store.for_project(args.root)
    runs = store.runs()
    runs = runs[(runs["status"] == "FINISHED") & (runs["rlcore.kind"] == "rl")]
    print("| algorithm | seeds | greedy acc. before → after (%) | sampled reward before → after (%) | Δ sampled (pts) | s/step |")
    print("|---|---|---|---|---|---|")
    for name in args.experiments:
        mine = runs[runs["experiment"] == name].sort_values("start").drop_duplicates("seed", keep="last")
        if mine.empty:
            continue
        ids = list(mine["run_id"])
        h = store.history(ids, [*EVALS, "timing/step"], max_points=100_000)
        row = {}
        for key in EVALS:
            k = h[h["key"] == key].sort_values("step")
            row[key] = ([float(k[k.run_id == r]["value"].iloc[0]) for r in ids],
                        [float(k[k.run_id == r]["value"].iloc[-1]) for r in ids])
        before, after = row["eval/sampled_reward"]
        delta = [a - b for a, b in zip(after, before, strict=True)]
        speed = h[h["key"] == "timing/step"]["value"].mean()
        g0, g1 = row["eval/greedy_accuracy"]
        print(f"| {name} | {len(ids)} | {fmt(g0)} → {fmt(g1)} | {fmt(before)} → {fmt(after)} | {fmt(delta)} "
              f"| {speed:.2f} |")


if __name__ == "__main__":
    main()
