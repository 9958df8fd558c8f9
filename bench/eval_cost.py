"""What held-out evaluation costs next to the RL step, exact against sampled, timed alternately in one process.

On the shipped warm start with experiments/grpo.yaml's settings: one exact eval (one teacher-forced pass over the
512 held-out prompts), one sampled eval (512 greedy + 512 x eval_samples sampled generations: the path before exact
evaluation, and still the path for Hugging Face tokenizers and tools), and one GRPO step (64 x 8). CPU seconds of
this process (wall time is noisy on a shared machine), medians over --repeats, with the share of a run's time that
eval takes at logging.eval_every.

    python bench/eval_cost.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from rlcore.controller import build_for, step
from rlcore.evaluation import evaluate
from rlcore.loading import load_experiment

REPO = Path(__file__).resolve().parents[1]


def cpu(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_experiment(REPO / "experiments" / "grpo.yaml")
    sampled_cfg = load_experiment(REPO / "experiments" / "grpo.yaml", ["task.eval_exact=false"])
    loop = build_for(cfg, REPO)
    stream = loop.task.stream(cfg.seed)

    def one_step() -> None:
        step(loop, [next(stream) for _ in range(cfg.rollout.prompts_per_step)])

    times: dict[str, list[float]] = {"exact eval": [], "sampled eval": [], "GRPO step": []}
    one_step()  # warm-up
    for _ in range(args.repeats):
        times["exact eval"].append(cpu(lambda: evaluate(loop.engine, loop.task, cfg)))
        times["sampled eval"].append(cpu(lambda: evaluate(loop.engine, loop.task, sampled_cfg)))
        times["GRPO step"].append(cpu(one_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    every = cfg.logging.eval_every
    print(f"torch threads {args.threads}, {args.repeats} repeats, CPU seconds (median):")
    for k, v in med.items():
        print(f"  {k:<13} {v:7.3f} s")
    print(f"exact / sampled eval: 1/{med['sampled eval'] / med['exact eval']:.0f} of the cost")
    for k in ("exact eval", "sampled eval"):
        share = med[k] / (med[k] + every * med["GRPO step"])
        print(f"share of run time with {k} every {every} steps: {share:.1%}")


if __name__ == "__main__":
    main()
