"""Staleness x behaviour correction (issue 21, lesson 24): held-out sampled reward before -> after, mean clip
fraction, mismatch KL and effective sample size, mean ± std over seeds, read from the MLflow store.

    # make the runs (experiments/offpolicy/stale.yaml with --set rollout.staleness=S, a correction and a seed), e.g.
    rlcore run experiments/offpolicy/stale.yaml --set rollout.staleness=1 --set algorithm.behaviour_correction=tis_token \\
        --set logging.experiment=offpolicy-grid --set seed=0
    python bench/offpolicy_table.py --experiment offpolicy-grid

Only FINISHED runs count; with several runs of one (staleness, correction, seed) the newest is used.
"""

from __future__ import annotations

import argparse
import statistics

from mlflow.tracking import MlflowClient

from rlcore.tracking import project_root, tracking_settings


def ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="offpolicy-grid")
    args = ap.parse_args()
    c = MlflowClient(tracking_settings(project_root())["tracking_uri"])
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"error: no MLflow experiment {args.experiment!r}")
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    seen = set()
    for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]):
        p = r.data.params
        corr = "coupled (ratio vs mu)" if p.get("algorithm.ratio_anchor") == "behaviour" else p["algorithm.behaviour_correction"]
        # the sampler's precision and kernel are rows of their own (a bfloat16 run is not a staleness-0 seed)
        sampler = ", ".join(x for x in (p.get("rollout.dtype", "float32"), p.get("rollout.attention", "same"))
                            if x not in ("float32", "same")) or "-"
        key = (p["rollout.staleness"], corr, sampler)
        if (key, p["seed"]) in seen:
            continue
        seen.add((key, p["seed"]))

        def hist(k: str, run_id: str = r.info.run_id) -> list[float]:
            return [m.value for m in sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)]

        ev = hist("eval/sampled_reward")
        cell = rows.setdefault(key, {k: [] for k in ("before", "after", "clip", "kl", "ess", "seeds")})
        cell["before"].append(ev[0])
        cell["after"].append(ev[-1])
        low, high = hist("actor/clipfrac_low"), hist("actor/clipfrac_high")
        cell["clip"].append(statistics.mean(a + b for a, b in zip(low, high, strict=True)) if low else 0.0)
        if kl := hist("mismatch/kl_k3"):
            cell["kl"].append(statistics.mean(kl))
            cell.setdefault("kl1", []).append(kl[0])
            cell["ess"].append(statistics.mean(hist("is/ess")))
        cell["seeds"].append(float(p["seed"]))
    print("| staleness | correction | sampler | seeds | held-out sampled reward | mean clip fraction | mismatch KL (k3) "
          "| at step 1 | ESS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (s, corr, sampler), cell in sorted(rows.items()):
        print(f"| {s} | {corr} | {sampler} | {len(cell['seeds'])} | {ms(cell['before'])} → {ms(cell['after'])} | "
              f"{ms(cell['clip'], 4)} | {ms(cell['kl'], 5)} | {ms(cell.get('kl1', []), 9)} | {ms(cell['ess'], 4)} |")


if __name__ == "__main__":
    main()
