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
from rlcore.reward import Scorer
from rlcore.rollout import RolloutEngine, Sampling, encode_prompts, positions
from rlcore.tasks import Task


def exact_applies(engine: RolloutEngine, cfg: ExperimentConfig) -> bool:
    """Whether the reward has exactly one rewarded token sequence per prompt (see the module doc): the default
    character model on addition with its own verifier, plain prompts, no tool."""
    return (cfg.task.eval_exact and engine.tool is None and cfg.model.name_or_path is None
            and not cfg.model.use_chat_template and cfg.task.name == "addition"
            and [c.fn for c in cfg.reward.components] == ["task"] and cfg.reward.extract == "none"
            and cfg.prompt.model_dump(exclude_defaults=True) == {})


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


def heldout_rewards(engine: RolloutEngine, task: Task, cfg: ExperimentConfig,
                    scorer: Scorer | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per held-out prompt: greedy accuracy [P] (the reward's first component) and expected reward at T = 1 [P]
    (exact, or the mean of k samples; None when task.eval_samples is 0). See `heldout_scores`."""
    return heldout_scores(engine, task, cfg, scorer)[:2]


@torch.no_grad()
def heldout_scores(engine: RolloutEngine, task: Task, cfg: ExperimentConfig,
                   scorer: Scorer | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """`heldout_rewards`, plus eval/true_accuracy and eval/proxy_reward when the reward is a proxy whose truth is
    watched (a learned reward model, or reward.log_true), from the same greedy completions.

    The sampled path's noise comes from its own generator seeded by the held-out set's seed, not the run's: every
    eval of every run draws the same uniforms, so comparisons are paired, and evaluating never shifts the training
    sampler's random stream. Prompts are generated in chunks of trainer.micro_batch_size (greedy rows do not depend
    on their neighbours; sampled rows draw their noise by global row, so chunking changes nothing either).
    """
    heldout, T = task.heldout, cfg.rollout.max_new_tokens
    if exact_applies(engine, cfg):
        return *answer_scores(engine, heldout, T, chunk=cfg.trainer.micro_batch_size), {}
    scorer = scorer or Scorer(cfg.reward, task)
    counted = engine.fmt.truncated if engine.fmt is not None else 0
    n, chunk, k = len(heldout), max(1, cfg.trainer.micro_batch_size), cfg.task.eval_samples

    def noise(skip: int = 0) -> torch.Generator:
        """The eval generator, past the greedy pass's `skip` rows of uniforms (its own: training's never moves)."""
        g = torch.Generator().manual_seed(cfg.task.heldout_seed + 1)
        if skip:
            torch.rand((skip, T), generator=g)
        return g

    greedy, truth, proxy = [], [], []
    for i in range(0, n, chunk):
        b = engine.generate(heldout, 1, Sampling(T, greedy=True), rows=slice(i, i + chunk), generator=noise())
        acc, true, total = scorer.judge(b.answers, b.finished.tolist(), b.problems)  # [b] each (true: or None)
        greedy.append(acc)
        if true is not None:  # a proxy reward: the truth and the proxy on the same greedy completions
            truth.append(true)
            proxy.append(total)
    extra = {"eval/true_accuracy": float(torch.cat(truth).mean()),
             "eval/proxy_reward": float(torch.cat(proxy).mean())} if truth else {}
    sampled = None
    if k:
        out = []
        for i in range(0, n, max(1, chunk // k)):
            b = engine.generate(heldout, k, Sampling(T, temperature=1.0), rows=slice(i, i + max(1, chunk // k)),
                                generator=noise(skip=n))
            out.append(scorer.total(b.answers, b.finished.tolist(), b.problems))
        sampled = torch.cat(out).view(n, k).mean(1)
    if engine.fmt is not None:
        engine.fmt.truncated = counted  # held-out prompts were checked before the run; they are not training's count
    return torch.cat(greedy), sampled, extra


def evaluate(engine: RolloutEngine, task: Task, cfg: ExperimentConfig, scorer: Scorer | None = None) -> dict[str, float]:
    """eval/greedy_accuracy and eval/sampled_reward (expected reward at T = 1); see heldout_rewards."""
    greedy, sampled, extra = heldout_scores(engine, task, cfg, scorer)
    out = {"eval/greedy_accuracy": float(greedy.mean())} | extra
    if sampled is not None:
        out["eval/sampled_reward"] = float(sampled.mean())
    return out
