"""Where the rollout engine runs (lessons 19 and 22c): measured seconds per step of colocated, separate and async
runs set against the time model (rlcore.topology.step_time: the sum of the roles' times, or their max), with each
role's idle share; and, for async runs at several max_staleness, the clip fraction of a ratio taken against the
stale sampler and the mismatch KL, against the drift model of rlcore.topology (fitted on k = 1, 2), the "clipped by
any of the k updates" model it replaced, and a Gaussian model from the KL.

    rlcore lesson 19,22c            # the paired runs, one at a time (timings need the machine to themselves)
    python bench/topology.py        # reads them from the MLflow store

Steady state: the first `--skip` steps (start-up, the async queue filling) are left out; means over the remaining
steps of each run, then mean ± std over seeds. The model's inputs are each role's own seconds measured in the
separate runs, where every role runs alone on one thread: the engine's generation (engine/generate_s) and the
trainer's share of the step (timing/step - engine/wait_s, which includes the weight push).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from mlflow.tracking import MlflowClient

from rlcore.topology import gaussian_clip_fraction, stale_clip_fraction, stale_mismatch_kl, step_time
from rlcore.tracking import project_root, tracking_settings


def ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else 0.0


class Runs:
    def __init__(self, client: MlflowClient, experiment: str, skip: int):
        self.c, self.skip = client, skip
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"error: no MLflow experiment {experiment!r}")
        self.runs, seen = [], set()
        query = "attributes.status = 'FINISHED'"
        for r in client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"]):
            key = (self.variant(r), r.data.params["seed"])
            if key not in seen:
                seen.add(key)
                self.runs.append(r)

    @staticmethod
    def variant(r) -> tuple[str, str, str]:
        """(mode, max_staleness, torch threads of the trainer's process)"""
        p = r.data.params
        return p.get("rollout.mode", "colocated"), p.get("rollout.max_staleness", "None"), r.data.tags["torch_threads"]

    def steady(self, r, key: str) -> list[float]:
        return [m.value for m in sorted(self.c.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
                if m.step > self.skip]

    def per_variant(self) -> dict[tuple[str, str], list]:
        """(mode, max_staleness) -> runs; a colocated run's mode names its thread count"""
        out = defaultdict(list)
        for r in self.runs:
            mode, k, threads = self.variant(r)
            out[(f"colocated, {threads} thread(s)" if mode == "colocated" else mode, k)].append(r)
        return out


def topology(runs: Runs) -> None:
    by = runs.per_variant()
    sep = by.get(("separate", "None"), [])
    if not sep:
        raise SystemExit("error: no separate run to take the roles' times from")
    t_roll = mean([mean(runs.steady(r, "engine/generate_s")) for r in sep])
    t_train = mean([mean([s - w for s, w in zip(runs.steady(r, "timing/step"), runs.steady(r, "engine/wait_s"),
                                                strict=True)]) for r in sep])
    print(f"roles, each on one thread (separate runs, steps > {runs.skip}): rollout {t_roll:.3f} s, "
          f"train + sync {t_train:.3f} s\n")
    print("| mode | runs | s/step measured | s/step model | trainer idle (model) | engine idle (model) | "
          "trainer process CPU s |")
    print("|---|---|---|---|---|---|---|")
    for (mode, k), rs in sorted(by.items()):
        proc = mode.split(",")[0]
        model = step_time(proc, t_roll, t_train, staleness=int(k) if k != "None" else 1)
        step = [mean(runs.steady(r, "timing/step")) for r in rs]
        idle_t = [mean(runs.steady(r, "idle/trainer")) for r in rs] if proc != "colocated" else []
        idle_e = [mean(runs.steady(r, "idle/engine")) for r in rs] if proc != "colocated" else []
        cpu = [r.data.metrics.get("perf/cpu_s", 0.0) for r in rs]
        print(f"| {mode} | {len(rs)} | {ms(step)} | {model.step_s:.3f} ({'max' if proc == 'async' else 'sum'}) | "
              f"{ms(idle_t, 2)} ({model.trainer_idle:.2f}) | {ms(idle_e, 2)} ({model.engine_idle:.2f}) | "
              f"{ms(cpu, 1)} |")


def pipelining(runs: Runs) -> None:
    by = runs.per_variant()
    ks = sorted(int(k) for (m, k) in by if m == "async" and k != "None")
    if 0 not in ks:
        raise SystemExit("error: no max_staleness 0 runs to take the roles' times from")
    zero = by[("async", "0")]
    t_roll = mean([mean(runs.steady(r, "engine/generate_s")) for r in zero])
    t_train = mean([mean([s - w for s, w in zip(runs.steady(r, "timing/step"), runs.steady(r, "engine/wait_s"),
                                                strict=True)]) for r in zero])

    def clip(r) -> float:
        return mean([a + b for a, b in zip(runs.steady(r, "actor/clipfrac_low"), runs.steady(r, "actor/clipfrac_high"),
                                           strict=True)])

    c1 = mean([clip(r) for r in by.get(("async", "1"), [])])
    kl1 = mean([mean(runs.steady(r, "mismatch/kl_k3")) for r in by.get(("async", "1"), [])])
    print(f"\nasync.yaml: roles at max_staleness 0 (steps > {runs.skip}): rollout {t_roll:.3f} s, train + sync "
          f"{t_train:.3f} s; clip fraction at max_staleness 1: {c1:.4f}\n")
    print("| max_staleness | runs | staleness | s/step | model | trainer idle | engine idle | mismatch KL | "
          "drift model KL1 k^2 | clip fraction | drift model c1 k^a / any-update 1-(1-c1)^k / Gaussian from KL | "
          "held-out sampled reward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        rs = by[("async", str(k))]
        ev = [[m.value for m in sorted(runs.c.get_metric_history(r.info.run_id, "eval/sampled_reward"),
                                       key=lambda m: m.step)] for r in rs]
        kl = [mean(runs.steady(r, "mismatch/kl_k3")) for r in rs]
        model = step_time("async", t_roll, t_train, staleness=k)
        print(f"| {k} | {len(rs)} | {ms([mean(runs.steady(r, 'rollout/staleness')) for r in rs], 1)} | "
              f"{ms([mean(runs.steady(r, 'timing/step')) for r in rs])} | {model.step_s:.3f} | "
              f"{ms([mean(runs.steady(r, 'idle/trainer')) for r in rs], 2)} ({model.trainer_idle:.2f}) | "
              f"{ms([mean(runs.steady(r, 'idle/engine')) for r in rs], 2)} ({model.engine_idle:.2f}) | "
              f"{ms(kl, 5)} | {stale_mismatch_kl(kl1, k):.5f} | {ms([clip(r) for r in rs], 4)} | "
              f"{stale_clip_fraction(c1, k):.4f} / {1 - (1 - c1) ** k:.4f} / {gaussian_clip_fraction(mean(kl)):.4f} | "
              f"{ms([e[0] for e in ev])} → {ms([e[-1] for e in ev])} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="topology", help="MLflow experiment of lesson 19's runs")
    ap.add_argument("--pipelining", default="async", help="MLflow experiment of lesson 22c's runs")
    ap.add_argument("--skip", type=int, default=3, help="leave out the first steps of each run")
    args = ap.parse_args()
    c = MlflowClient(tracking_settings(project_root())["tracking_uri"])
    topology(Runs(c, args.topology, args.skip))
    pipelining(Runs(c, args.pipelining, args.skip))


if __name__ == "__main__":
    main()
