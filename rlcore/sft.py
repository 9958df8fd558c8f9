"""Supervised warm start: teach the tiny model the task's format (and some arithmetic) so RL has a start.

An SFT experiment is an ordinary experiment YAML with `kind: sft`. RL experiments name it in `model.warm_start`;
its output is built on first use and cached under `.rlcore_cache/warm_start/<config hash>/`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import rlcore
from rlcore.atomic import SEAL, atomic_dir, sha256
from rlcore.config import ExperimentConfig
from rlcore.evaluation import evaluate
from rlcore.loading import load_experiment
from rlcore.model import build_policy
from rlcore.rollout import RolloutEngine
from rlcore.seeding import seed_everything
from rlcore.tasks import make_task
from rlcore.tools import Calculator, make_tool
from rlcore.trainer import Learner, adamw, step_learners


def warm_start_dir(cfg: ExperimentConfig, root: Path, quiet: bool = False) -> Path | None:
    """Directory of the warm-start policy for an RL config; None if unset.

    A shipped copy (`warm_starts/<name>/`, committed with its manifest) whose recipe key matches and whose files
    hash to the manifest's digests is used as it is: every machine then starts from the same bits. Otherwise the
    warm start is trained on first use and cached under .rlcore_cache/warm_start/<key>/.
    """
    if cfg.model.warm_start is None:
        return None
    sft_cfg = load_experiment(cfg.resolve_path(cfg.model.warm_start))  # validated (kind: sft) by load_experiment
    shipped = find_shipped(sft_cfg, root, quiet)
    if shipped is not None:
        return shipped
    out = cache_dir(sft_cfg, root)
    if (out / "config.json").is_file():
        return out
    from filelock import FileLock, Timeout

    # One builder per warm start on this machine: a second process that needs it (`rlcore lesson --jobs 2`, two
    # terminals) waits for the first instead of training the same weights again.
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not quiet:
            print(f"warm start: another process is training {cfg.model.warm_start}; waiting for it ({out})")
        lock.acquire()
    try:
        if not (out / "config.json").is_file():  # the other process may have finished it while we waited
            if not quiet:
                print(f"warm start: training {cfg.model.warm_start} (cached after this in {out})")
            train_sft(sft_cfg, out, root)
    finally:
        lock.release()
    return out


def cache_key(sft_cfg: ExperimentConfig) -> str:
    """What identifies a warm start: its resolved training settings and rlcore's version."""
    # Only the sections SFT training reads, and only values that differ from the defaults, are in the key: a new
    # option or a renamed MLflow experiment must not invalidate every cached warm start. (Changing a default that
    # SFT uses is a new rlcore version, which is in the key.)
    key = sft_cfg.config_hash(sections=("kind", "seed", "model", "task", "trainer"), changed_only=True)
    return f"{key}-v{rlcore.__version__}"


def cache_dir(sft_cfg: ExperimentConfig, root: Path) -> Path:
    """Where a warm start built on this machine lives: keyed by `cache_key`."""
    return root / ".rlcore_cache" / "warm_start" / cache_key(sft_cfg)


SHIPPED_DIR = "warm_starts"
MANIFEST = "MANIFEST.json"


def find_shipped(sft_cfg: ExperimentConfig, root: Path, quiet: bool = False) -> Path | None:
    """The shipped warm start built from exactly this recipe, if its files are intact; else None."""
    key = cache_key(sft_cfg)
    for manifest in sorted((root / SHIPPED_DIR).glob(f"*/{MANIFEST}")):
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("cache_key") != key:
            continue
        d = manifest.parent
        bad = [f for f, digest in meta.get("files", {}).items() if not (d / f).is_file() or sha256(d / f) != digest]
        if bad or not meta.get("files"):
            if not quiet:
                print(f"warning: shipped warm start {d} does not match its manifest ({', '.join(bad) or 'no files'}); "
                      "building it instead", file=sys.stderr)
            return None
        return d
    return None


def ship(sft_cfg: ExperimentConfig, built: Path, root: Path, name: str, metrics: dict[str, float]) -> Path:
    """Copy a built warm start to warm_starts/<name>/ with a manifest: recipe key, file digests, how it was built."""
    import platform

    import transformers

    dest = root / SHIPPED_DIR / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(built, dest, ignore=shutil.ignore_patterns(SEAL))  # the cache's seal is not shipped
    files = {p.name: sha256(p) for p in sorted(dest.iterdir()) if p.is_file() and p.name != MANIFEST}
    meta = {
        "cache_key": cache_key(sft_cfg),
        "recipe": sft_cfg.model_dump(mode="json", exclude_defaults=True),
        "files": files,
        "heldout": {k: round(v, 6) for k, v in metrics.items()},
        "built_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version(), "machine": platform.machine(),
                       "cpu": _cpu_name(), "torch_threads": torch.get_num_threads()},
    }
    (dest / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def warm_start_tags(ws: Path | None) -> dict[str, str]:
    """Which weights the run started from: the shipped copy or one built here, and their digest."""
    if ws is None or not (ws / "model.safetensors").is_file():
        return {}
    return {"warm_start.source": "shipped" if ws.parent.name == SHIPPED_DIR else "built here",
            "warm_start.sha256": sha256(ws / "model.safetensors")[:16]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _encode(tokenizer, problems, tool: Calculator | None = None,
            use_tool: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`<bos>A+B=C<eos>` right-padded; labels are -100 except on the completion C<eos>.

    Rows with `use_tool` are the trace `<bos>A+B=[A+B](C)C<eos>`, whose tool output `(C)` is context, not a target
    (labels -100), exactly as the RL loss masks it.
    """
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows, labels = [], []
    for i, p in enumerate(problems):
        prompt = [tokenizer.bos_token_id] + ids(p.prompt)
        answer = ids(p.answer) + [tokenizer.eos_token_id]
        if tool is not None and use_tool is not None and use_tool[i]:
            call, out, _ = tool.trace(p.prompt, p.answer)
            target, label = ids(call) + ids(out) + answer, ids(call) + [-100] * len(ids(out)) + answer
        else:
            target, label = answer, answer
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + label)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    lab = torch.full((len(rows), L), -100)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], lab[i, : len(y)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(y), 1
    return ids, mask, lab


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, with label smoothing ε (Szegedy et al. 2016):

        loss = (1 - ε) · (-log p(y)) + ε · mean_v(-log p(v))

    ε = 0 is exactly Hugging Face's causal-LM loss. ε > 0 keeps the warm start from betting everything on its argmax,
    so it samples less surely than it answers greedily: the room RL's sharpening has (lesson 01).
    """
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1),  # [B*(L-1), V]: position t predicts token t+1
        labels[:, 1:].flatten(),  # [B*(L-1)], -100 where not a target
        ignore_index=-100, label_smoothing=label_smoothing,
    )


def train_sft(cfg: ExperimentConfig, out: Path, root: Path) -> dict[str, float]:
    """Train the warm start, log it as its own MLflow run, and save it atomically to `out`."""
    import yaml

    from rlcore import threads
    from rlcore.config import flatten
    from rlcore.tracking import Tracker, git_commit

    threads.say_once()
    seed_everything(cfg.seed)
    task = make_task(cfg.task)
    tool = make_tool(cfg.task.tool)
    coin = random.Random(cfg.seed)  # which examples are written as tool traces
    model, tokenizer = build_policy(cfg.model)
    t = cfg.trainer
    opt, sched = adamw(model.parameters(), t, cosine_over=t.steps)  # warm-up, then cosine decay to 10 %
    tracker = Tracker(cfg.logging.experiment, root)
    tags = {"rlcore.kind": "sft", "task": cfg.task.name, "model": cfg.model.name_or_path or "tiny-llama",
            "git_commit": git_commit(root)}
    params, config_yaml = flatten(cfg.to_dict()), yaml.safe_dump(cfg.to_dict())
    with tracker.run(cfg.logging.run_name or "sft-warm-start", tags, params, config_yaml):
        stream = task.stream(cfg.seed)
        model.train()
        bar = tqdm(range(1, t.steps + 1), desc="sft", unit="step", dynamic_ncols=True)
        for step in bar:
            problems = [next(stream) for _ in range(t.sft_batch_size)]
            use_tool = [coin.random() < cfg.task.sft_tool_frac for _ in problems]
            ids, mask, labels = _encode(tokenizer, problems, tool, use_tool)
            seen: list[torch.Tensor] = []

            def loss_of(_m, _norm, ids=ids, mask=mask, labels=labels, seen=seen) -> tuple[torch.Tensor, dict]:
                loss = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels, t.label_smoothing)
                seen.append(loss.detach())
                return loss, {}

            # The same core as RL's update: one micro-batch (the whole SFT batch), clip, non-finite guard, step.
            step_learners([Learner("sft", model, opt, loss_of)], [None], None, t.grad_clip)
            sched.step()
            loss = seen[0]
            if step % 50 == 0 or step == t.steps:
                tracker.log(step, {"sft/loss": float(loss.detach()), "actor/lr": sched.get_last_lr()[0]})
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        engine = RolloutEngine(model, tokenizer, seed=cfg.seed, tool=tool, max_tool_calls=cfg.task.max_tool_calls)
        metrics = evaluate(engine, task, cfg)
        tracker.log(t.steps, metrics)
        with atomic_dir(out) as tmp:  # a killed build never leaves a half-written warm start behind
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    print(f"warm start: greedy accuracy {metrics['eval/greedy_accuracy']:.1%}, "
          f"sampled reward {metrics['eval/sampled_reward']:.3f} (run {tracker.run_id})")
    return metrics
