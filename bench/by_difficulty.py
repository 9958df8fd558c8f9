"""Where does RL's gain come from? Held-out greedy accuracy and sampled reward split by the longest operand.

    python bench/by_difficulty.py [POLICY_DIR ...] [--experiment experiments/grpo.yaml]

With no directory it scores the experiment's warm start; pass a run's `outputs/<run id>/policy` to compare. The
evaluation is rlcore's own (`rlcore.evaluation` settings: the fixed held-out set, k samples at T = 1 with the
held-out seed's noise), so the totals equal the run's `eval/*` metrics; only the split is new.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from rlcore.evaluation import heldout_rewards
from rlcore.loading import load_experiment
from rlcore.model import build_policy
from rlcore.rollout import RolloutEngine
from rlcore.sft import warm_start_dir
from rlcore.tasks import make_task


def split(policy: Path | None, cfg) -> dict[int, tuple[int, float, float]]:
    """{longest operand's digits: (prompts, greedy accuracy, sampled reward)} plus key 0 for all prompts."""
    task = make_task(cfg.task)
    model, tokenizer = build_policy(cfg.model, policy)
    greedy, sampled = heldout_rewards(RolloutEngine(model, tokenizer, seed=cfg.seed), task, cfg)  # [P], [P]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(task.heldout):
        groups[max(len(x) for x in p.prompt.rstrip("=").split("+"))].append(i)
    groups[0] = list(range(len(task.heldout)))
    return {d: (len(ix), float(greedy[ix].mean()), float(sampled[ix].mean())) for d, ix in sorted(groups.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policies", nargs="*", type=Path, help="policy directories (default: the warm start)")
    ap.add_argument("--experiment", type=Path, default=Path("experiments/grpo.yaml"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_experiment(args.experiment)
    targets = args.policies or [warm_start_dir(cfg, Path.cwd())]
    for policy in targets:
        print(f"\n{policy}")
        print(f"{'longest operand':>16} {'prompts':>8} {'greedy':>8} {'sampled':>8}")
        for d, (n, g, s) in split(policy, cfg).items():
            print(f"{'all' if d == 0 else f'{d} digit' + 's' * (d > 1):>16} {n:>8} {g:>8.3f} {s:>8.3f}")


if __name__ == "__main__":
    main()
