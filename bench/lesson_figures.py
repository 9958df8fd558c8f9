"""Every figure a lesson page quotes, from the MLflow store: per line of the lesson's plan (experiment x variant),
mean ± std over its seeds of the held-out evaluation before -> after, and of each metric over the first and the
last ten steps.

    rlcore lesson 01-14                       # make the runs (each distinct config once)
    python bench/lesson_figures.py 01-14      # the numbers the pages quote, lesson by lesson
    python bench/lesson_figures.py 14 --series response/length_wrong_mean   # one metric, 10-step windows

Runs are matched to a lesson by config (`rlcore.group`), as the dashboard matches them; only FINISHED runs count,
and with several runs of one (config, seed) the newest is used. "±" is the std over seeds (n in brackets), so a
difference between two lines smaller than about two stds is inside the seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd

from dashboard.data import Store, lesson_runs
from rlcore.lessons import load_all, plan_groups, select
from rlcore.tracking import project_root

EVALS = ["eval/sampled_reward", "eval/greedy_accuracy", "eval/true_accuracy", "eval/proxy_reward",
         "rm/heldout_accuracy", "rm/heldout_true_accuracy", "prm/heldout_step_accuracy", "prm/heldout_final_accuracy"]
WINDOWED = ["reward/mean", "reward/zero_var_group_frac", "adv/abs_mean", "kl/mean", "kl/k3_mean", "actor/entropy",
            "actor/grad_norm", "actor/clipfrac_low", "actor/clipfrac_high", "response/length_mean",
            "response/length_wrong_mean", "response/length_right_mean", "response/tool_call_frac",
            "response/clip_ratio", "critic/value_loss", "critic/explained_var", "rollout/rounds",
            "timing/step", "timing/rollout", "timing/reward", "timing/reference", "timing/old_logprob",
            "timing/values", "timing/advantage", "timing/update", "timing/sync",
            "perf/tokens_per_s", "perf/peak_mem_mb", "perf/sync_mb", "perf/cpu_s",
            "reward/true", "curation/kept_frac", "curation/skipped_buckets", "dpo/loss", "rewards/chosen",
            "rewards/rejected", "rewards/margins", "rewards/accuracies", "rm/loss", "prm/loss"]


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 4 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({len(values)})"


def figures(store: Store, own: pd.DataFrame) -> list[str]:
    h = store.history(list(own["run_id"]), EVALS + WINDOWED, max_points=100_000)
    out = []
    for line, part in own.groupby("line", sort=False):
        out.append(f"  {line}   seeds {sorted(part['seed'].astype(int))}")
        hh = h[h["run_id"].isin(part["run_id"])]
        for key in EVALS:
            k = hh[hh["key"] == key].sort_values("step")
            if k.empty:
                continue
            first = k.groupby("run_id")["value"].first().tolist()
            last = k.groupby("run_id")["value"].last().tolist()
            gain = (k.groupby("run_id")["value"].last() - k.groupby("run_id")["value"].first()).tolist()
            out.append(f"    {key:28s} {ms(first)} -> {ms(last)}   change {ms(gain)}")
            if k["step"].nunique() > 2:  # the peak of a curve that rises and falls (over-optimisation)
                peak = k.loc[k.groupby("run_id")["value"].idxmax()]
                out.append(f"    {'':28s} peak {ms(peak['value'].tolist())} at steps {sorted(peak['step'].astype(int))}")
        for key in WINDOWED:
            k = hh[hh["key"] == key]
            if k.empty:
                continue
            steps = sorted(k["step"].unique())
            early, late = set(steps[:10]), set(steps[-10:])
            a = k[k["step"].isin(early)].groupby("run_id")["value"].mean().tolist()
            b = k[k["step"].isin(late)].groupby("run_id")["value"].mean().tolist()
            whole = k.groupby("run_id")["value"].mean().tolist()
            out.append(f"    {key:28s} first 10 {ms(a)}   last 10 {ms(b)}   all {ms(whole)}")
    return out


def series(store: Store, own: pd.DataFrame, key: str, window: int) -> list[str]:
    """A markdown table: `key` averaged over windows of `window` steps, mean ± std over seeds, one column per line."""
    h = store.history(list(own["run_id"]), [key], max_points=100_000)
    if h.empty:
        return [f"  no {key} in these runs"]
    h = h.assign(line=h["run_id"].map(own.set_index("run_id")["line"]), window=(h["step"] - 1) // window)
    per_run = h.groupby(["line", "window", "run_id"])["value"].mean().reset_index()
    lines = list(dict.fromkeys(own["line"]))
    out = [f"| steps | {' | '.join(lines)} |", "|---|" + "---|" * len(lines)]
    for w in sorted(per_run["window"].unique()):
        cells = []
        for line in lines:
            v = per_run[(per_run["line"] == line) & (per_run["window"] == w)]["value"].tolist()
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}" if v else "-")
        out.append(f"| {w * window + 1}–{(w + 1) * window} | {' | '.join(cells)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lessons", nargs="?", default="01-14", help="03, 01-14, 01,03 or all")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--series", default=None, help="print this metric over windows of --window steps instead")
    ap.add_argument("--window", type=int, default=10)
    args = ap.parse_args()
    root = args.root or project_root()
    store = Store.for_project(root)
    runs = store.runs()
    for lesson in select(load_all(root), args.lessons):
        own = lesson_runs(runs, plan_groups(lesson, root), ("FINISHED",))
        print(f"lesson {lesson.meta.id}: {lesson.meta.title}  ({len(own)} runs)")
        if args.series and not own.empty:
            print("\n".join(series(store, own, args.series, args.window)))
            continue
        print("\n".join(figures(store, own)) if not own.empty else "  no finished runs: rlcore lesson "
              + lesson.meta.id)


if __name__ == "__main__":
    main()
