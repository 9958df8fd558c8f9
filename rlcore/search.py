"""Search at evaluation (lesson 17): spend more samples at test time and let a reward model choose.

On the task's held-out prompts, at an equal budget of N samples per prompt:
- `greedy`: one argmax completion (the budget is 1).
- `best_of_n`: N completions at T = 1; an outcome reward model (rlcore.reward_model) scores each, the best is kept.
- `best_of_n_prm`: the same N completions ranked by a process reward model: each completion's score is its
  weakest step, min_t sigma(PRM logit after token t) (Lightman et al. 2023 rank by the product; the minimum is the
  common variant and needs no length correction).
- `best_of_n_pointwise`: the same N completions ranked by an outcome model trained pointwise on the process
  model's own answers (one label each, at the EOS): process supervision's control, same answers, a fifth of the
  labels.
- `majority`: the answer most of the N completions give (self-consistency, Wang et al. 2023): no reward model.
- `prm_beam`: PRM-guided beam search, one token a step: N candidates are sampled from the kept beams, the PRM
  scores each prefix, the best N/M are kept (M = 4 expansions per beam; Snell et al. 2024's setting), a kept
  candidate that ended (EOS or the cap) is set aside; the best-scored ended candidate is the answer. N candidate
  tokens a step, so its budget is N samples' worth of tokens. Candidates are drawn with replacement, so one beam
  can fill with copies of one prefix; `prm_beam_dedup` keeps each distinct prefix once (same draws, same budget).
- `oracle`: the same N completions, kept if *any* is right (pass@N): the ceiling a perfect ranker would reach.
- `sample`: one of them at random (their mean): what the N samples are worth without a ranker.

Each reports the task's true accuracy of what it keeps and the tokens it generated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlcore.config import ConfigError, ExperimentConfig
from rlcore.rollout import pad_rows, positions

METHODS = ("greedy", "sample", "majority", "best_of_n", "best_of_n_pointwise", "best_of_n_prm", "prm_beam",
           "prm_beam_dedup", "oracle")
EXPANSIONS = 4  # M: candidates sampled from each kept beam


def best_of_n_accuracy(p: float, decoy: float, n: int) -> dict[str, float]:
    """What N samples are worth under three rankers, in closed form (lesson 17's control). Each sample is right with
    probability p; a wrong one is a *decoy* with probability `decoy`: the reward model scores it above every right
    answer (its errors are not noise but a preference for a kind of wrong answer). Right answers outrank the other
    wrong ones.

        oracle (pass@N)   1 - (1 - p)^N
        best-of-N (RM)    (1 - (1 - p) q)^N - ((1 - p)(1 - q))^N      (no decoy drawn, and not all wrong)
        one sample        p

    With q = 0 best-of-N is the oracle; with q > 0 it peaks and then falls towards 0 as N grows: more samples means
    more chances to draw a decoy (Gao et al. 2022's over-optimisation, at test time)."""
    miss = (1 - p) * decoy
    return {"oracle": 1 - (1 - p) ** n, "best_of_n": (1 - miss) ** n - ((1 - p) * (1 - decoy)) ** n, "sample": p}


def step_scores(prm, pad: int, prompts: list[list[int]], answers: list[list[int]],
                chunk: int = 256) -> list[torch.Tensor]:
    """sigma(PRM logit) after every answer token of each (prompt ids, answer ids). -> a [len(answer)] per row"""
    out = []
    for i in range(0, len(prompts), chunk):
        rows = [p + a for p, a in zip(prompts[i : i + chunk], answers[i : i + chunk], strict=True)]
        ids, mask = pad_rows(rows, pad)
        probs = torch.sigmoid(prm(ids, mask, steps=True))  # [n, L]
        out += [probs[j, len(p) : len(p) + len(a)] for j, (p, a) in
                enumerate(zip(prompts[i : i + chunk], answers[i : i + chunk], strict=True))]
    return out


def prm_beam(policy, prm, tokenizer, prompts: list[list[int]], n: int, max_new_tokens: int,
             generator: torch.Generator, dedup: bool = False) -> tuple[list[list[int]], int]:
    """PRM-guided beam search for every prompt at once (see the module doc); `dedup`: each distinct candidate is
    ranked once, so the kept beams are distinct prefixes. -> (answer ids, EOS included, per prompt; candidate tokens
    sampled in all)"""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(1, n // EXPANSIONS)
    beams: list[list[list[int]]] = [[[]] for _ in prompts]  # per prompt: the kept unfinished answers
    done: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]  # per prompt: (score, ended answer)
    spent = 0
    for _ in range(max_new_tokens):
        owners = [i for i, b in enumerate(beams) for _ in b]
        parents = [a for b in beams for a in b]
        if not parents:
            break
        ids, mask = pad_rows([prompts[i] + a for i, a in zip(owners, parents, strict=True)], pad, left=True)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]  # [b, V]
        probs = torch.softmax(logits.float(), -1)
        per_parent = [n // len(beams[i]) for i in owners]  # the first step draws all N from the empty answer
        draws = torch.multinomial(probs, max(per_parent), replacement=True, generator=generator)  # [b, max]
        cands: list[list[tuple[list[int], bool]]] = [[] for _ in prompts]
        for row, (i, a) in enumerate(zip(owners, parents, strict=True)):
            for tok in draws[row, : per_parent[row]].tolist():
                ext = a + [tok]
                cands[i].append((ext, tok == eos or len(ext) >= max_new_tokens))
        spent += sum(len(c) for c in cands)  # every draw is paid for, a duplicate too
        if dedup:
            cands = [list({tuple(ext): (ext, end) for ext, end in c}.values()) for c in cands]
        flat = [(i, ext, end) for i, c in enumerate(cands) for ext, end in c]
        scores = step_scores(prm, pad, [prompts[i] for i, _, _ in flat], [ext for _, ext, _ in flat])
        by_prompt: list[list[tuple[float, list[int], bool]]] = [[] for _ in prompts]
        for (i, ext, end), sc in zip(flat, scores, strict=True):
            by_prompt[i].append((float(sc[-1]), ext, end))
        for i, c in enumerate(by_prompt):
            kept = sorted(c, key=lambda x: -x[0])[:width]
            done[i] += [(sc, ext) for sc, ext, end in kept if end]
            beams[i] = [ext for _, ext, end in kept if not end]
    return [max(d, key=lambda x: x[0])[1] if d else b[0] for d, b in zip(done, beams, strict=True)], spent



@torch.no_grad()
def evaluate_search(cfg: ExperimentConfig, root: Path, n: int, reward_model: Path | None,
                    policy_dir: Path | None = None, seed: int = 0, process_model: Path | None = None,
                    pointwise_model: Path | None = None) -> list[dict]:
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
    fmt = PromptFormat(cfg.prompt, cfg.model.use_chat_template)
    engine = RolloutEngine(policy, tokenizer, seed=seed, fmt=fmt)
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
    every = torch.arange(len(held))
    votes = [b.answers[i * n:(i + 1) * n] for i in range(len(held))]  # the N answers of each prompt, as graded
    # the most frequent answer (ties: the one drawn first); an empty answer is a vote like any other
    majority = torch.tensor([max(range(n), key=lambda j, v=v: (v.count(v[j]), -j)) for v in votes])  # [P]
    rows.append({"method": "majority", "n": n, "accuracy": float(right[every, majority].mean()), "tokens": tokens,
                 "samples": len(held) * n})
    if reward_model is not None:
        model, rm_tok, rm_fmt = load_reward_model(reward_model)
        scores = learned_scores(model, rm_tok, rm_fmt, [p.prompt for p in b.problems], b.completions)
        pick = scores.view(len(held), n).argmax(-1)  # [P] the reward model's choice
        rows.append({"method": "best_of_n", "n": n, "accuracy": float(right[every, pick].mean()),
                     "tokens": tokens, "samples": len(held) * n})
    prompt_ids = [fmt.ids(tokenizer, p.prompt) for p in held]
    answers = [b.responses[i][b.response_mask[i].bool()].tolist() for i in range(len(b))]
    if pointwise_model is not None:
        pw, pw_tok, _ = load_reward_model(pointwise_model)
        if pw_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError("search.pointwise_model: its tokenizer is not the policy's")
        final = step_scores(pw, tokenizer.pad_token_id, [prompt_ids[i // n] for i in range(len(b))], answers)
        last = torch.tensor([float(s[-1]) for s in final]).view(len(held), n)  # [P, N] read at each answer's EOS
        rows.append({"method": "best_of_n_pointwise", "n": n, "accuracy": float(right[every, last.argmax(-1)].mean()),
                     "tokens": tokens, "samples": len(held) * n})
    if process_model is not None:
        prm, prm_tok, _ = load_reward_model(process_model)
        if prm_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError("--prm: the process reward model's tokenizer is not the policy's (it scores the "
                              "policy's tokens one by one)")
        steps = step_scores(prm, tokenizer.pad_token_id, [prompt_ids[i // n] for i in range(len(b))], answers)
        weakest = torch.tensor([float(s.min()) for s in steps]).view(len(held), n)  # [P, N]
        rows.append({"method": "best_of_n_prm", "n": n, "accuracy": float(right[every, weakest.argmax(-1)].mean()),
                     "tokens": tokens, "samples": len(held) * n})
        eos = tokenizer.eos_token_id
        for method, dedup in (("prm_beam", False), ("prm_beam_dedup", True)):
            chosen, spent = prm_beam(policy, prm, tokenizer, prompt_ids, n, T, torch.Generator().manual_seed(seed),
                                     dedup=dedup)
            texts = [tokenizer.decode([t for t in a if t != eos], skip_special_tokens=True) for a in chosen]
            ended = [bool(a) and a[-1] == eos for a in chosen]
            acc = truth.true_scores(texts, ended, held)
            rows.append({"method": method, "n": n, "accuracy": float(acc.mean()), "tokens": spent,
                         "samples": len(held) * n})
    rows.append({"method": "oracle", "n": n, "accuracy": float(right.max(-1).values.mean()), "tokens": tokens,
                 "samples": len(held) * n})
    rows.append({"method": "sample", "n": 1, "accuracy": float(right.mean()), "tokens": tokens // n,
                 "samples": len(held)})
    return rows


def run_search(cfg: ExperimentConfig, root: Path) -> tuple[str, dict[str, float]]:
    """`kind: search`: `evaluate_search` at every N of `search.n`, logged as one MLflow run (`search/<method>` and
    `search_tokens/<method>` at step N), so a lesson's plan makes the table and the dashboard charts it against N.
    -> (run id, the last N's accuracies)"""
    import time

    import yaml

    from rlcore.config import flatten
    from rlcore.rm_training import resolve
    from rlcore.sft import warm_start_dir, warm_start_tags
    from rlcore.tracking import Tracker, git_commit

    cpu0 = time.process_time()
    s = cfg.search
    models = {k: None if v is None else resolve(v, cfg._base_dir, root)
              for k, v in (("reward_model", s.reward_model), ("process_model", s.process_model),
                           ("pointwise_model", s.pointwise_model))}
    policy = None if s.policy is None else cfg.resolve_path(s.policy)
    ws = warm_start_dir(cfg, root, quiet=True)
    tracker = Tracker(cfg.logging.experiment, root)
    tags = {"rlcore.kind": "search", "task": cfg.task.name, "git_commit": git_commit(root),
            "rlcore.group": cfg.seed_group(), "seed": str(cfg.seed), "model": cfg.model.name_or_path or "tiny-llama",
            **warm_start_tags(ws), **cfg.logging.tags}
    last: dict[str, float] = {}
    with tracker.run(cfg.logging.run_name or "search", tags, flatten(cfg.to_dict()),
                     yaml.safe_dump(cfg.to_dict(), sort_keys=False)):
        for n in s.n:
            rows = evaluate_search(cfg, root, n, models["reward_model"], policy, cfg.seed, models["process_model"],
                                   models["pointwise_model"])
            last = {f"search/{r['method']}": r["accuracy"] for r in rows}
            tracker.log(n, {**last, **{f"search_tokens/{r['method']}": float(r["tokens"]) for r in rows}})
        tracker.log(s.n[-1], {"perf/cpu_s": time.process_time() - cpu0})
    return tracker.run_id, last
