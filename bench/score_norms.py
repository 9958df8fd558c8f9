"""Which samples carry the policy gradient's noise? Per-sample score-function norms, correct vs wrong (lesson 09).

    python bench/score_norms.py [--experiment experiments/grpo.yaml] [--prompts 32]

Samples one batch (prompts x the experiment's K) from the experiment's warm start, then takes one backward pass per
sample to get ||grad_theta log pi(y|x)|| for the whole completion. Prints the mean and median norm of correct and
wrong samples, the batch-mean baseline, and the variance-minimising constant baseline
b* = E[r ||g||^2] / E[||g||^2]: when the large norms belong to wrong answers, b* is near 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rlcore.config import ExperimentConfig
from rlcore.loading import load_experiment
from rlcore.model import build_policy
from rlcore.reward import Scorer
from rlcore.rollout import RolloutEngine, Sampling, token_logprobs
from rlcore.sft import warm_start_dir
from rlcore.tasks import make_task


def score_norms(cfg: ExperimentConfig, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [B] and per-sample score norms [B] on one seeded batch from the training stream."""
    model, tokenizer = build_policy(cfg.model, warm_start_dir(cfg, Path.cwd(), quiet=True))
    task = make_task(cfg.task)
    stream = task.stream(cfg.seed)
    batch = RolloutEngine(model, tokenizer, seed=cfg.seed).generate(
        [next(stream) for _ in range(prompts)], cfg.rollout.samples_per_prompt, Sampling(cfg.rollout.max_new_tokens))
    rewards = Scorer(cfg.reward, task).score(batch)[0]  # [B]
    logp, _ = token_logprobs(model, batch)  # [B, T]
    seq_logp = (logp * batch.response_mask).sum(-1)  # [B] log pi(y|x) of each completion
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(rewards)):
        norms.append(torch.nn.utils.get_total_norm(torch.autograd.grad(seq_logp[i], params, retain_graph=True)))
    return rewards, torch.stack(norms)  # [B], [B]


def _cell(x: torch.Tensor) -> str:
    return f"{x.mean():.1f} / {x.median():.1f}" if len(x) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", type=Path, action="append",
                    help="RL experiment(s) whose warm start to measure (default: experiments/grpo.yaml)")
    ap.add_argument("--prompts", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{'experiment':>36} {'reward':>7} {'right: mean/median':>19} {'wrong: mean/median':>19} {'b*':>6}")
    for path in args.experiment or [Path("experiments/grpo.yaml")]:
        r, n = score_norms(load_experiment(path), args.prompts)
        right, wrong = n[r == 1], n[r == 0]
        b_star = float((r * n**2).sum() / (n**2).sum())
        print(f"{str(path):>36} {float(r.mean()):>7.3f} {_cell(right):>19} {_cell(wrong):>19} {b_star:>6.3f}")


if __name__ == "__main__":
    main()
