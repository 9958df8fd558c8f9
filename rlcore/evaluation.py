"""Held-out evaluation: greedy accuracy and sampled reward on the task's fixed held-out set."""

from __future__ import annotations

import torch

from rlcore.config import ExperimentConfig
from rlcore.rollout import RolloutEngine
from rlcore.tasks import AdditionTask, score


@torch.no_grad()
def heldout_rewards(engine: RolloutEngine, task: AdditionTask, cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion rewards on the held-out set: greedy [P] and sampled [P * k] (k samples per prompt at T=1,
    prompt-major).

    The sampling noise comes from its own generator seeded by the held-out set's seed, not the run's: every eval of
    every run draws the same uniforms, so before/after and run-vs-run comparisons are paired, and evaluating never
    shifts the training sampler's random stream.
    """
    heldout = task.heldout
    train_gen = engine.generator
    engine.generator = torch.Generator().manual_seed(cfg.task.heldout_seed + 1)
    try:
        greedy = engine.generate(heldout, 1, cfg.rollout.max_new_tokens, greedy=True)
        sampled = engine.generate(heldout, cfg.task.eval_samples, cfg.rollout.max_new_tokens, temperature=1.0)
    finally:
        engine.generator = train_gen
    return score(task, greedy), score(task, sampled)


def evaluate(engine: RolloutEngine, task: AdditionTask, cfg: ExperimentConfig) -> dict[str, float]:
    """eval/greedy_accuracy and eval/sampled_reward (k samples per prompt at T=1); see heldout_rewards."""
    greedy, sampled = heldout_rewards(engine, task, cfg)
    return {"eval/greedy_accuracy": float(greedy.mean()), "eval/sampled_reward": float(sampled.mean())}
