"""Held-out evaluation: greedy accuracy and sampled reward on the task's fixed held-out set.

Two ways to the same two numbers:

- **exact** (the default where it applies): a task whose reward is 1 for exactly one token sequence, the answer
  followed by EOS, has expected reward at T = 1 of exactly pi(answer, EOS | prompt) = prod_t pi(y_t | x, y_<t), and
  greedy decoding returns the answer iff the answer's token is the argmax at every one of its positions. One
  teacher-forced forward pass over the held-out prompts gives both, with no sampling noise at all. It applies to the
  default character model (one token per character, so the answer has one tokenisation) without a tool.
- **sampled**: greedy decoding plus k samples per prompt at T = 1 (`task.eval_samples`), with noise from a
  generator seeded by the held-out set's seed, so every eval of every run draws the same uniforms (paired). Used for
  Hugging Face tokenizers (an answer can be spelled by several token sequences) and for agentic tasks (a tool call
  and a direct answer both earn the reward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcore.batch import Problem
from rlcore.config import ExperimentConfig
from rlcore.reward import score
from rlcore.rollout import RolloutEngine, Sampling, encode_prompts, positions
from rlcore.tasks import AdditionTask


def exact_applies(engine: RolloutEngine, cfg: ExperimentConfig) -> bool:
    """Whether the reward has exactly one rewarded token sequence per prompt (see the module doc)."""
    return cfg.task.eval_exact and engine.tool is None and cfg.model.name_or_path is None and not engine.chat


@torch.no_grad()
def answer_scores(engine: RolloutEngine, problems: list[Problem], max_new_tokens: int,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: greedy correct (0/1) [P] and pi(answer, EOS | prompt) at T = 1 [P], by teacher forcing."""
    model, tok = engine.model, engine.tokenizer
    was_training = model.training
    model.eval()
    greedy_out, prob_out = [], []
    for i in range(0, len(problems), chunk):
        part = problems[i : i + chunk]
        ids, mask = encode_prompts(tok, [p.prompt for p in part])  # [n, P] left-padded
        answers = [tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in part]
        A = max(len(a) for a in answers)
        ans = torch.full((len(part), A), tok.pad_token_id)  # [n, A] right-padded
        amask = torch.zeros((len(part), A))  # [n, A] 1 on answer tokens (and EOS)
        for j, a in enumerate(answers):
            ans[j, : len(a)], amask[j, : len(a)] = torch.tensor(a), 1.0
        full_mask = torch.cat([mask, amask.long()], 1)  # [n, P+A]
        device = model.device
        out = model(input_ids=torch.cat([ids, ans], 1).to(device), attention_mask=full_mask.to(device),
                    position_ids=positions(full_mask).to(device), use_cache=False)
        P = ids.shape[1]
        logits = out.logits[:, P - 1 : P + A - 1].float().cpu()  # [n, A] position t predicts answer token t
        logp = F.log_softmax(logits, -1).gather(-1, ans.unsqueeze(-1)).squeeze(-1)  # [n, A]
        hit = (logits.argmax(-1) == ans) | (amask == 0)  # [n, A]
        fits = torch.tensor([len(a) <= max_new_tokens for a in answers])  # [n] the answer and EOS fit in the cap
        greedy_out.append((hit.all(-1) & fits).float())
        prob_out.append((logp * amask).sum(-1).exp() * fits)
    model.train(was_training)
    return torch.cat(greedy_out), torch.cat(prob_out)


@torch.no_grad()
def heldout_rewards(engine: RolloutEngine, task: AdditionTask, cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out prompt: greedy reward [P] and expected reward at T = 1 [P] (exact, or the mean of k samples).

    The sampled path's noise comes from its own generator seeded by the held-out set's seed, not the run's: every
    eval of every run draws the same uniforms, so comparisons are paired, and evaluating never shifts the training
    sampler's random stream.
    """
    heldout, T = task.heldout, cfg.rollout.max_new_tokens
    if exact_applies(engine, cfg):
        return answer_scores(engine, heldout, T, chunk=cfg.trainer.micro_batch_size)
    noise = torch.Generator().manual_seed(cfg.task.heldout_seed + 1)  # its own: the training stream never moves
    greedy = engine.generate(heldout, 1, Sampling(T, greedy=True), generator=noise)
    sampled = engine.generate(heldout, cfg.task.eval_samples, Sampling(T, temperature=1.0), generator=noise)
    return score(task, greedy), score(task, sampled).view(len(heldout), cfg.task.eval_samples).mean(1)


def evaluate(engine: RolloutEngine, task: AdditionTask, cfg: ExperimentConfig) -> dict[str, float]:
    """eval/greedy_accuracy and eval/sampled_reward (expected reward at T = 1); see heldout_rewards."""
    greedy, sampled = heldout_rewards(engine, task, cfg)
    return {"eval/greedy_accuracy": float(greedy.mean()), "eval/sampled_reward": float(sampled.mean())}
