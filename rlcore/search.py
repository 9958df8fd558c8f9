"""Search at evaluation (lesson 17): spend more samples at test time and let a reward model choose.

On the task's held-out prompts, at an equal budget of N samples per prompt:
- `greedy`: one argmax completion (the budget is 1).
- `best_of_n`: N completions at T = 1; an outcome reward model (rlcore.reward_model) scores each, the best is kept.
- `oracle`: the same N completions, kept if *any* is right (pass@N): the ceiling a perfect ranker would reach.
- `sample`: one of them at random (their mean): what the N samples are worth without a ranker.

Each reports the task's true accuracy of what it keeps and the tokens it generated. A process reward model and
PRM-guided beam search are the next entries (issue 20).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlcore.config import ExperimentConfig

METHODS = ("greedy", "best_of_n", "oracle")


@torch.no_grad()
def evaluate_search(cfg: ExperimentConfig, root: Path, n: int, reward_model: Path | None,
                    policy_dir: Path | None = None, seed: int = 0) -> list[dict]:
    """One row per method: {method, n, accuracy, tokens (generated, all prompts), samples}."""
    from rlcore.model import build_policy, load_pretrained
    from rlcore.prompts import PromptFormat
    from rlcore.reward import Scorer, learned_scores, reward_search_path
    from rlcore.reward_model import load_reward_model
    from rlcore.rollout import RolloutEngine, Sampling
    from rlcore.sft import warm_start_dir
    from rlcore.tasks import make_task

    if policy_dir is not None:
        policy, tokenizer = load_pretrained(policy_dir, cfg.model.model_copy(update={"allow_download": False}))
    else:
        policy, tokenizer = build_policy(cfg.model, warm_start_dir(cfg, root))
    policy.eval()
    task = make_task(cfg.task, cfg._base_dir)
    truth = Scorer(cfg.reward.model_copy(update={"components": cfg.reward.components[:1]}), task,
                   reward_search_path(cfg))
    engine = RolloutEngine(policy, tokenizer, seed=seed, fmt=PromptFormat(cfg.prompt, cfg.model.use_chat_template))
    held, T = task.heldout, cfg.rollout.max_new_tokens

    def true_of(b) -> torch.Tensor:
        return truth.true_scores(b.answers, b.finished.tolist(), b.problems)  # [B]

    rows = []
    g = engine.generate(held, 1, Sampling(T, greedy=True))
    rows.append({"method": "greedy", "n": 1, "accuracy": float(true_of(g).mean()),
                 "tokens": int(g.response_mask.sum()), "samples": len(held)})
    b = engine.generate(held, n, Sampling(T, temperature=1.0), generator=torch.Generator().manual_seed(seed))
    right = true_of(b).view(len(held), n)  # [P, N]
    tokens = int(b.response_mask.sum())
    if reward_model is not None:
        model, rm_tok, rm_fmt = load_reward_model(reward_model)
        scores = learned_scores(model, rm_tok, rm_fmt, [p.prompt for p in b.problems], b.completions)
        pick = scores.view(len(held), n).argmax(-1)  # [P] the reward model's choice
        rows.append({"method": "best_of_n", "n": n, "accuracy": float(right[torch.arange(len(held)), pick].mean()),
                     "tokens": tokens, "samples": len(held) * n})
    rows.append({"method": "oracle", "n": n, "accuracy": float(right.max(-1).values.mean()), "tokens": tokens,
                 "samples": len(held) * n})
    rows.append({"method": "sample", "n": 1, "accuracy": float(right.mean()), "tokens": tokens // n,
                 "samples": len(held)})
    return rows
