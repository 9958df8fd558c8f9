"""Training a reward model (`kind: reward_model`) and finding the one a reward names: a trained folder, or a
`kind: reward_model` experiment trained on first use and cached by its config hash."""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from rlcore.atomic import atomic_dir, damage
from rlcore.config import ConfigError, ExperimentConfig
from rlcore.prompts import PromptFormat
from rlcore.reward_model import (
    MARKER,
    RewardModel,
    bt_loss,
    encode_steps,
    heldout_metrics,
    pair_scores,
    prm_loss,
    process_metrics,
    process_rows,
    split_by_prompt,
)


def load_pairs(cfg: ExperimentConfig, root: Path) -> list[dict]:
    """The pairs of `reward_model.pairs` (a `kind: preferences` experiment, built on first use)."""
    from rlcore.preferences import load_pairs as load

    return load(cfg, cfg.reward_model.pairs, root)


def train_reward_model(cfg: ExperimentConfig, root: Path, out: Path | None = None,
                       distributed: bool = True) -> tuple[str, dict[str, float], Path]:
    """Train, evaluate and save a reward model as its own MLflow run (to `out`, default
    outputs/<run_id>/reward_model); returns (run id, final metrics, directory) on the main process.

    Under `accelerate launch` each process scores a contiguous share of every batch of pairs and the gradients are
    all-reduced; the loss is divided by the whole batch's pair count, so N processes take the same steps as one.
    `distributed=False` trains in this process alone (a reward model built on first use inside another run)."""
    import yaml
    from safetensors.torch import save_file

    from rlcore import threads
    from rlcore.config import flatten
    from rlcore.model import build_policy
    from rlcore.seeding import seed_everything
    from rlcore.sft import warm_start_dir, warm_start_tags
    from rlcore.tracking import NoTracker, Tracker, git_commit
    from rlcore.trainer import Learner, adamw, epoch_batches, global_sum, my_rows, process_group, step_learners

    threads.say_once()
    cpu0 = time.process_time()
    acc = process_group() if distributed else None
    main = acc is None or acc.is_main_process
    rm = cfg.reward_model
    process = rm.type in ("process", "pointwise")  # both train on the policy's own labelled answers
    with acc.main_process_first() if acc is not None else nullcontext():  # built once, on first use
        rows = None if process else load_pairs(cfg, root)
        ws = warm_start_dir(cfg, root, quiet=not main)
    seed_everything(cfg.seed)
    policy, tokenizer = build_policy(cfg.model, ws)
    fmt = PromptFormat(cfg.prompt, cfg.model.use_chat_template)
    if process:  # every process samples the same answers (same seed): no data set to share
        rows = step_labels(cfg, policy, tokenizer, fmt)
        if rm.type == "pointwise":  # the same answers, only the final label: is the whole answer right
            rows = [{**r, "labels": [-1.0] * (len(r["labels"]) - 1) + r["labels"][-1:]} for r in rows]
    model = RewardModel(policy)
    del policy
    train, held = split_by_prompt(rows, rm.heldout_frac, cfg.seed)
    if not train or not held:
        raise ConfigError(f"reward_model.heldout_frac: {len(rows)} pairs split into {len(train)} to train on and "
                          f"{len(held)} held out; both must be non-empty")
    t = cfg.trainer
    steps = rm.epochs * -(-len(train) // rm.batch_size)
    opt, sched = adamw(model.parameters(), t, cosine_over=steps)
    learner = model if acc is None else acc.prepare(model)  # DDP: the backward all-reduces the gradients
    tracker = Tracker(cfg.logging.experiment, root) if main else NoTracker()
    world = acc.num_processes if acc is not None else 1
    unit = "answers" if process else "pairs"
    tags = {"rlcore.kind": "reward_model", "rlcore.rm.type": rm.type, "task": cfg.task.name,
            "git_commit": git_commit(root), f"rlcore.rm.{unit}": str(len(rows)), f"rlcore.rm.heldout_{unit}": str(len(held)),
            "rlcore.group": cfg.seed_group(), "seed": str(cfg.seed), "world_size": str(world),
            "model": cfg.model.name_or_path or "tiny-llama", **warm_start_tags(ws), **cfg.logging.tags}
    with tracker.run(cfg.logging.run_name or "reward-model", tags, flatten(cfg.to_dict()),
                     yaml.safe_dump(cfg.to_dict(), sort_keys=False)):
        evaluate = process_metrics if process else heldout_metrics
        metrics = evaluate(model, tokenizer, fmt, held, t.micro_batch_size) if main else {}
        tracker.log(0, metrics)
        bar = tqdm(total=steps, desc="reward model", unit="step", file=sys.stderr, dynamic_ncols=True, disable=not main)
        step = 0
        for step, part in enumerate(epoch_batches(train, rm.epochs, rm.batch_size, cfg.seed), 1):
            seen: dict[str, float] = {}

            def loss_of(_m, _norm, part=part, seen=seen) -> tuple[torch.Tensor, dict]:
                mine, w = my_rows(part, acc)
                if process:
                    ids, mask, labels = encode_steps(tokenizer, fmt, mine)  # [n, L] each
                    logits = learner(ids, mask, steps=True)  # [n, L]
                    n = sum(sum(x >= 0 for x in r["labels"]) for r in part)  # labelled steps of the whole batch
                    loss = prm_loss(logits, labels, n) * w
                    on = labels >= 0
                    seen.update({"prm/loss": float(loss.detach()),
                                 "prm/accuracy": w * float(((logits > 0) == (labels > 0.5))[on].sum()) / n})
                    return loss, {}
                chosen, rejected = pair_scores(learner, tokenizer, fmt, mine)  # [n], [n]
                loss = bt_loss(chosen, rejected, rm.center_coef, len(part)) * w
                seen.update({"rm/loss": float(loss.detach()),
                             "rm/accuracy": w * float((chosen > rejected).float().sum()) / len(part)})
                return loss, {}

            step_learners([Learner("reward_model", learner, opt, loss_of)], [None], None, t.grad_clip, acc)
            sched.step()
            seen = global_sum(seen, acc)
            bar.update(1)
            bar.set_postfix(loss=f"{seen['prm/loss' if process else 'rm/loss']:.3f}")
            tracker.log(step, seen)
            if main and (step % cfg.logging.eval_every == 0 or step == steps):
                metrics = evaluate(model, tokenizer, fmt, held, t.micro_batch_size)
                tracker.log(step, metrics)
        bar.close()
        tracker.log(step, {"perf/cpu_s": time.process_time() - cpu0})
        if main:
            out = out or root / cfg.logging.output_dir / tracker.run_id / "reward_model"
            model.trunk.save_pretrained(out / "trunk")
            tokenizer.save_pretrained(out / "trunk")
            save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
            (out / MARKER).write_text(json.dumps({"kind": "reward_model", "type": rm.type, "run_id": tracker.run_id, **metrics,
                                                  "prompt": cfg.prompt.model_dump(), "chat": cfg.model.use_chat_template}))
    if acc is not None:
        acc.wait_for_everyone()
    return tracker.run_id, metrics, out


def step_labels(cfg: ExperimentConfig, policy, tokenizer, fmt: PromptFormat) -> list[dict]:
    """A process reward model's data: `reward_model.prompts` training prompts, `samples_per_prompt` answers each
    from the policy, every answer token labelled by the task (rlcore.reward_model.process_rows)."""
    from rlcore.rollout import RolloutEngine, Sampling
    from rlcore.tasks import make_task

    rm, r = cfg.reward_model, cfg.rollout
    task = make_task(cfg.task, cfg._base_dir)
    engine = RolloutEngine(policy, tokenizer, seed=cfg.seed, fmt=fmt)
    stream = task.stream(cfg.seed)
    chunk = max(1, cfg.trainer.micro_batch_size // rm.samples_per_prompt)
    rows: list[dict] = []
    policy.eval()
    with torch.no_grad():
        for start in range(0, rm.prompts, chunk):
            problems = stream.take(min(chunk, rm.prompts - start))
            rows += process_rows(engine, task, problems, rm.samples_per_prompt,
                                 Sampling(r.max_new_tokens, r.temperature, r.top_p), tokenizer)
    return rows


def cached(cfg: ExperimentConfig, root: Path) -> Path:
    """The reward model of a `kind: reward_model` experiment, trained on first use into
    .rlcore_cache/reward_model/<config hash>/ (atomically, one builder at a time) and reused after."""
    from filelock import FileLock

    key = cfg.config_hash(sections=("seed", "model", "task", "prompt", "reward_model", "trainer"), changed_only=True)
    out = root / ".rlcore_cache" / "reward_model" / key
    if (out / MARKER).is_file() and damage(out) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        why = damage(out) if out.exists() else "not built yet"
        if out.exists() and why is not None:  # a damaged cache would fail every later run
            print(f"warning: the cached reward model {out} is damaged ({why}); training it again", file=sys.stderr)
        if not (out / MARKER).is_file() or why is not None:
            with atomic_dir(out) as tmp:
                train_reward_model(cfg, root, tmp, distributed=False)
    return out


def resolve(path: str, base_dir: Path, root: Path) -> Path:
    """The folder of the reward model a reward component names (relative to the experiment's folder): the folder
    itself, or a `kind: reward_model` experiment's model, trained here on first use."""
    from rlcore.loading import load_experiment

    p = Path(path).expanduser()
    p = p if p.is_absolute() else (base_dir / p).resolve()
    if p.suffix in (".yaml", ".yml"):
        return cached(load_experiment(p), root)
    return p
