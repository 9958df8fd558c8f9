"""DPO and IPO (lesson 16): optimise the policy directly on preference pairs, without a reward model or sampling.

    s(y) = log pi(y|x) - log pi_ref(y|x)           (summed over the completion's tokens, EOS included)
    DPO:  -log sigma(beta * (s(y_c) - s(y_r)))     IPO:  (s(y_c) - s(y_r) - 1/(2 beta))^2

(rlcore.pairwise). The reference is the frozen starting policy (rlcore.reference.Reference: a copy, or with LoRA the
policy with its adapters disabled); its log-probs of each pair are computed once per batch without gradients. The
update is the trainer core's (`step_learners`: clip, non-finite guard, step). The held-out set of the pairs' task is
evaluated with its true reward at the start, every `logging.eval_every` steps and at the end (eval/*), so DPO and RL
compare on one yardstick.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlcore.batch import RolloutBatch
from rlcore.config import ExperimentConfig
from rlcore.pairwise import PAIR_LOSSES, sequence_logps
from rlcore.prompts import PromptFormat
from rlcore.rollout import encode_prompts, pad_rows, token_logprobs


def pair_batch(tokenizer, fmt: PromptFormat, rows: list[dict]) -> RolloutBatch:
    """The chosen completions then the rejected ones as one batch: prompt left-padded, completion + EOS right-padded.
    -> 2N rows"""
    prompts = [r["prompt"] for r in rows] * 2
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    ids, mask = encode_prompts(tokenizer, prompts, fmt=fmt)  # [2N, P]
    resp = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    out, rmask = pad_rows(resp, tokenizer.pad_token_id)  # [2N, T]
    n, T = out.shape
    return RolloutBatch(input_ids=torch.cat([ids, out], 1), attention_mask=torch.cat([mask, rmask], 1),
                        response_mask=rmask.float(), group=torch.arange(n), sampler_logp=torch.zeros(n, T),
                        finished=torch.ones(n, dtype=torch.bool), prompt_len=ids.shape[1])


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, loss: str, beta: float,
             n: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence log-probs of [chosen; rejected] (2N each) -> pair loss summed and divided by `n` (the whole batch's
    pair count when this process holds a share of it; default N, the mean) and TRL's metrics (summed the same way)."""
    s = policy_logps - ref_logps  # [2N] log-ratio to the reference
    half = len(s) // 2
    n = half if n is None else n
    per_pair, metrics = PAIR_LOSSES[loss](s[:half], s[half:], beta)  # [N]
    return per_pair.sum() / n, {k: v * half / n for k, v in metrics.items()}


def train_dpo(cfg: ExperimentConfig, root: Path) -> tuple[str, dict[str, float], dict[str, float], Path]:
    """Train as its own MLflow run; returns (run id, eval at start, eval at end, final policy directory)."""
    import yaml

    from rlcore import threads
    from rlcore.config import flatten
    from rlcore.evaluation import evaluate
    from rlcore.model import build_policy
    from rlcore.preferences import load_pairs
    from rlcore.reference import Reference
    from rlcore.reward import Scorer, reward_search_path
    from rlcore.rollout import RolloutEngine
    from rlcore.seeding import seed_everything
    from rlcore.sft import warm_start_dir, warm_start_tags
    from rlcore.tasks import make_task
    from rlcore.tracking import NoTracker, Tracker, git_commit
    from rlcore.trainer import Learner, adamw, epoch_batches, global_sum, my_rows, process_group, step_learners

    threads.say_once()
    cpu0 = time.process_time()
    acc = process_group()
    main = acc.is_main_process
    with acc.main_process_first():  # built once, on first use
        rows = load_pairs(cfg, cfg.dpo.pairs, root)
        ws = warm_start_dir(cfg, root, quiet=not main)
    seed_everything(cfg.seed)
    policy, tokenizer = build_policy(cfg.model, ws)
    reference = Reference(policy)
    fmt = PromptFormat(cfg.prompt, cfg.model.use_chat_template)
    task = make_task(cfg.task, cfg._base_dir)
    scorer = Scorer(cfg.reward, task, reward_search_path(cfg))
    engine = RolloutEngine(policy, tokenizer, seed=cfg.seed, fmt=fmt)
    d, t = cfg.dpo, cfg.trainer
    steps = d.epochs * -(-len(rows) // d.batch_size)
    opt, sched = adamw([p for p in policy.parameters() if p.requires_grad], t)
    learner = acc.prepare(policy)  # DDP: the backward all-reduces the gradients; sampling uses the plain module
    tracker = Tracker(cfg.logging.experiment, root) if main else NoTracker()
    tags = {"rlcore.kind": "dpo", "algorithm": d.loss if d.loss != "sigmoid" else "dpo", "task": cfg.task.name,
            "git_commit": git_commit(root), "rlcore.group": cfg.seed_group(), "seed": str(cfg.seed),
            "world_size": str(acc.num_processes), "model": cfg.model.name_or_path or "tiny-llama",
            **warm_start_tags(ws), **cfg.logging.tags}
    with tracker.run(cfg.logging.run_name or f"{tags['algorithm']}-s{cfg.seed}-{cfg.training_hash()[:6]}", tags,
                     flatten(cfg.to_dict()), yaml.safe_dump(cfg.to_dict(), sort_keys=False)):
        first = last = evaluate(engine, task, cfg, scorer) if main else {}
        tracker.log(0, first)
        bar = tqdm(total=steps, desc=tags["algorithm"], unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not main)
        step = 0
        for step, part in enumerate(epoch_batches(rows, d.epochs, d.batch_size, cfg.seed), 1):
            mine, w = my_rows(part, acc)
            batch = pair_batch(tokenizer, fmt, mine)
            ref = sequence_logps(reference.logprobs(batch, t.micro_batch_size), batch.response_mask)  # [2n]
            seen: dict[str, float] = {}

            def loss_of(_m, _norm, batch=batch, ref=ref, seen=seen, n=len(part), w=w):
                logp = sequence_logps(token_logprobs(learner, batch)[0], batch.response_mask)  # [2n]
                loss, metrics = dpo_loss(logp, ref, d.loss, d.beta, n)
                seen.update({"dpo/loss": float(loss.detach()) * w} | {k: float(v) * w for k, v in metrics.items()})
                return loss * w, {}

            policy.train()
            step_learners([Learner("policy", learner, opt, loss_of)], [None], None, t.grad_clip, acc)
            sched.step()
            seen = global_sum(seen, acc)
            bar.update(1)
            bar.set_postfix(loss=f"{seen['dpo/loss']:.3f}", acc=f"{seen['rewards/accuracies']:.2f}")
            tracker.log(step, seen | {"actor/lr": sched.get_last_lr()[0]})
            if main and (step % cfg.logging.eval_every == 0 or step == steps):
                last = evaluate(engine, task, cfg, scorer)
                tracker.log(step, last)
        bar.close()
        tracker.log(step, {"perf/cpu_s": time.process_time() - cpu0})
        out = root / cfg.logging.output_dir / str(tracker.run_id) / "policy"
        if main:
            policy.save_pretrained(out)
            tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    return tracker.run_id, first, last, out
