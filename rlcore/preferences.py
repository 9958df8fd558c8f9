"""Preference data from the task (lesson 15): pairs of the policy's own completions, labelled by a simulated annotator.

A `kind: preferences` experiment samples K completions per prompt from its policy (the model section: a warm start,
a local model), pairs them at random without repeats, and labels each pair: the completion with the higher *true*
reward (the experiment's `reward:`, usually the verifier) is chosen; ties are broken by a fair coin or, with
`bias: longer`, for the longer completion; then the label is flipped with probability `label_noise`. The result is
written once, atomically, as a versioned data set keyed by the config's hash:

    .rlcore_cache/preferences/<hash>/pairs.jsonl   one pair per line (prompt, answer, chosen, rejected, their true
                                                    rewards and lengths, flipped, tie)
    .rlcore_cache/preferences/<hash>/card.json     how it was made: the config, the model, counts, label agreement

and logged as artifacts of an MLflow run of kind `preferences`. The same config twice gives the same file (seeded).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import torch

from rlcore.atomic import atomic_dir
from rlcore.config import ExperimentConfig

PAIRS, CARD = "pairs.jsonl", "card.json"
VERSION = 1  # of the file format; part of the cache key


def cache_dir(cfg: ExperimentConfig, root: Path) -> Path:
    key = cfg.config_hash(sections=("seed", "model", "task", "prompt", "reward", "rollout", "preferences"),
                          changed_only=True)
    return root / ".rlcore_cache" / "preferences" / f"v{VERSION}-{key}"


def label_pairs(scores: list[float], lengths: list[int], cfg, rng: random.Random) -> list[dict]:
    """Pair one prompt's K completions at random (K // 2 disjoint pairs) and label each with the simulated
    annotator. Returns [{chosen, rejected (indices), flipped, tie}]; pure given `rng`."""
    order = list(range(len(scores)))
    rng.shuffle(order)
    out = []
    for a, b in zip(order[::2], order[1::2], strict=False):
        tie = scores[a] == scores[b]
        if tie and cfg.skip_ties:
            continue
        if not tie:
            win = a if scores[a] > scores[b] else b
        elif cfg.bias == "longer" and lengths[a] != lengths[b]:
            win = a if lengths[a] > lengths[b] else b
        else:
            win = a if rng.random() < 0.5 else b
        lose = b if win == a else a
        flipped = rng.random() < cfg.label_noise
        if flipped:
            win, lose = lose, win
        out.append({"chosen": win, "rejected": lose, "flipped": flipped, "tie": tie})
    return out


def intact(out: Path) -> bool:
    """The data set's pairs file is the one its card describes (sha256)."""
    try:
        card = json.loads((out / CARD).read_text())
        return hashlib.sha256((out / PAIRS).read_bytes()).hexdigest() == card["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(cfg: ExperimentConfig, root: Path, quiet: bool = False) -> tuple[Path, dict]:
    """Sample, label and write the pairs (or find them already written for this config); returns (dir, card)."""
    out = cache_dir(cfg, root)
    if (out / CARD).is_file():
        if intact(out):
            return out, json.loads((out / CARD).read_text())
        # Derived data, rebuilt bit for bit from its config: a damaged copy is replaced, never read.
        print(f"warning: {out} is damaged (its pairs do not match card.json); rebuilding it", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)  # another process may be replacing it too
    from rlcore.model import build_policy
    from rlcore.prompts import PromptFormat
    from rlcore.reward import Scorer, reward_search_path
    from rlcore.rollout import RolloutEngine, Sampling
    from rlcore.seeding import seed_everything
    from rlcore.sft import warm_start_dir
    from rlcore.tasks import make_task

    seed_everything(cfg.seed)
    policy, tokenizer = build_policy(cfg.model, warm_start_dir(cfg, root, quiet=quiet))
    policy.eval()
    task = make_task(cfg.task, cfg._base_dir)
    scorer = Scorer(cfg.reward, task, reward_search_path(cfg))
    engine = RolloutEngine(policy, tokenizer, seed=cfg.seed, fmt=PromptFormat(cfg.prompt, cfg.model.use_chat_template))
    p, r = cfg.preferences, cfg.rollout
    stream, rng = task.stream(cfg.seed), random.Random(cfg.seed)
    rows: list[dict] = []
    chunk = max(1, cfg.trainer.micro_batch_size // p.samples_per_prompt)
    for start in range(0, p.prompts, chunk):
        problems = stream.take(min(chunk, p.prompts - start))
        with torch.no_grad():
            batch = engine.generate(problems, p.samples_per_prompt, Sampling(r.max_new_tokens, r.temperature, r.top_p))
        true = scorer.total(batch.answers, batch.finished.tolist(), batch.problems).tolist()  # [B]
        lengths = batch.response_mask.sum(-1).long().tolist()  # [B]
        for g, problem in enumerate(problems):
            rows_g = range(g * p.samples_per_prompt, (g + 1) * p.samples_per_prompt)
            for pair in label_pairs([true[i] for i in rows_g], [lengths[i] for i in rows_g], p, rng):
                c, j = rows_g[pair["chosen"]], rows_g[pair["rejected"]]
                rows.append({"prompt": problem.prompt, "answer": problem.answer,
                             "chosen": batch.completions[c], "rejected": batch.completions[j],
                             "chosen_reward": true[c], "rejected_reward": true[j],
                             "chosen_len": lengths[c], "rejected_len": lengths[j],
                             "flipped": pair["flipped"], "tie": pair["tie"]})
    informative = [x for x in rows if not x["tie"]]
    card = {
        "format_version": VERSION, "pairs": len(rows), "prompts": p.prompts,
        "ties": len(rows) - len(informative),
        "flipped": sum(x["flipped"] for x in rows),
        # How often the label agrees with the true reward on pairs where the true reward decides: 1 - label_noise
        # in expectation. The ceiling of any reward model's pair accuracy on such pairs.
        "true_agreement": (sum(x["chosen_reward"] > x["rejected_reward"] for x in informative) / len(informative)
                           if informative else None),
        "mean_true_reward": sum(x["chosen_reward"] + x["rejected_reward"] for x in rows) / (2 * len(rows)) if rows else None,
        "model": cfg.model.warm_start or cfg.model.name_or_path or "tiny-llama",
        "config": cfg.to_dict(),
    }
    with atomic_dir(out) as tmp:
        with open(tmp / PAIRS, "w") as f:
            for x in rows:
                f.write(json.dumps(x) + "\n")
        card["sha256"] = hashlib.sha256((tmp / PAIRS).read_bytes()).hexdigest()
        (tmp / CARD).write_text(json.dumps(card, indent=1))
    return out, card


def load_pairs(cfg: ExperimentConfig, pairs: str | None, root: Path) -> list[dict]:
    """The pairs of the `kind: preferences` experiment at `pairs` (relative to `cfg`'s file), built on first use."""
    from rlcore.config import ConfigError
    from rlcore.loading import load_experiment

    if pairs is None:
        raise ConfigError(f"{cfg.kind}.pairs: a `kind: {cfg.kind}` experiment names its `kind: preferences` data set")
    out, _ = build(load_experiment(cfg.resolve_path(pairs)), root)
    rows = [json.loads(line) for line in (out / PAIRS).read_text().splitlines()]
    if not rows:  # training on nothing would "finish" and save the starting weights as if trained
        raise ConfigError(f"{cfg.kind}.pairs: {pairs!r} made 0 pairs (every pair a tie left out by skip_ties, or "
                          "too few samples); there is nothing to train on")
    return rows


def run_preferences(cfg: ExperimentConfig, root: Path) -> tuple[Path, dict, str]:
    """Build the data set inside an MLflow run of kind `preferences` (its files as artifacts, its counts as tags)."""
    import yaml

    from rlcore import threads
    from rlcore.config import flatten
    from rlcore.tracking import Tracker, git_commit

    threads.say_once()
    tracker = Tracker(cfg.logging.experiment, root)
    tags = {"rlcore.kind": "preferences", "task": cfg.task.name, "git_commit": git_commit(root),
            "model": cfg.model.warm_start or cfg.model.name_or_path or "tiny-llama", **cfg.logging.tags}
    with tracker.run(cfg.logging.run_name or f"prefs-noise{cfg.preferences.label_noise:g}", tags,
                     flatten(cfg.to_dict()), yaml.safe_dump(cfg.to_dict(), sort_keys=False)):
        out, card = build(cfg, root)
        for key in ("pairs", "ties", "flipped", "true_agreement"):
            tracker.set_tag(f"rlcore.prefs.{key}", str(card[key]))
        tracker.set_tag("rlcore.prefs.dir", str(out))
        tracker.log_artifact(out / PAIRS)
        tracker.log_artifact(out / CARD)
    return out, card, tracker.run_id
