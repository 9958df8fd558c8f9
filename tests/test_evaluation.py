"""Exact held-out evaluation: the same greedy answers as decoding, and the expectation the samples estimate."""

from __future__ import annotations

from pathlib import Path

import torch

from rlcore.evaluation import answer_scores, exact_applies, heldout_rewards
from rlcore.loading import load_experiment
from rlcore.model import build_policy
from rlcore.rollout import RolloutEngine
from rlcore.sft import warm_start_dir
from rlcore.tasks import make_task


def engine_and_task(lab: Path, *sets: str):
    cfg = load_experiment(lab / "rl.yaml", ["task.heldout_size=48", *sets])
    model, tok = build_policy(cfg.model, warm_start_dir(cfg, lab, quiet=True))
    return RolloutEngine(model, tok, seed=0), make_task(cfg.task), cfg


def test_exact_eval_matches_greedy_decoding_and_the_sampled_estimate(lab: Path) -> None:
    engine, task, cfg = engine_and_task(lab, "task.eval_samples=128")
    assert exact_applies(engine, cfg)
    g_exact, p_exact = heldout_rewards(engine, task, cfg)  # [P], [P]
    sampled_cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"eval_exact": False})})
    assert not exact_applies(engine, sampled_cfg)
    g_dec, p_mc = heldout_rewards(engine, task, sampled_cfg)  # [P], [P] (mean of 128 samples per prompt)
    assert torch.equal(g_exact, g_dec)  # teacher-forced argmax == greedy decoding, prompt by prompt
    assert 0.05 < float(p_exact.mean()) < 0.95  # a model that is neither right nor wrong everywhere
    # 48 x 128 samples: the standard error of the mean is below 0.007; 4 SE apart would be a real disagreement
    se = float((p_exact * (1 - p_exact)).mean().sqrt()) / (48 * 128) ** 0.5
    assert abs(float(p_mc.mean() - p_exact.mean())) < 4 * se + 1e-3


def test_exact_probability_is_the_product_of_the_answer_tokens(lab: Path) -> None:
    engine, task, cfg = engine_and_task(lab)
    p = task.heldout[0]
    _, prob = answer_scores(engine, [p], cfg.rollout.max_new_tokens)
    tok, model = engine.tokenizer, engine.model
    ids = [tok.bos_token_id] + tok(p.prompt, add_special_tokens=False)["input_ids"]
    target = tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    by_hand = 1.0
    with torch.no_grad():
        for t in target:  # one next-token distribution at a time, no padding, no batching
            by_hand *= float(torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[t])
            ids.append(t)
    assert abs(float(prob[0]) - by_hand) < 1e-5


def test_an_answer_longer_than_the_cap_scores_zero(lab: Path) -> None:
    engine, task, cfg = engine_and_task(lab)
    greedy, prob = answer_scores(engine, task.heldout[:8], max_new_tokens=1)  # no answer and EOS fit in 1 token
    assert float(greedy.sum()) == 0 and float(prob.sum()) == 0
