"""Reward model (lesson 15): the policy's trunk with a scalar head, trained on preference pairs with the
Bradley-Terry loss -log sigma(r(x, y_chosen) - r(x, y_rejected)) (rlcore.pairwise.sigmoid at beta = 1).

r(x, y) is the head applied to the trunk's last hidden state at the completion's last token (its EOS). A
`kind: reward_model` experiment names its `kind: preferences` data set (`reward_model.pairs`), holds out a seeded
share of the prompts, trains for `epochs`, logs loss and held-out pair accuracy (against the labels, and against the
true reward), and saves the model like a policy: `outputs/<run_id>/reward_model/` (trunk as a Hugging Face folder,
head as safetensors, a marker file naming what it is).
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlcore.config import ConfigError, ExperimentConfig
from rlcore.pairwise import sigmoid
from rlcore.prompts import PromptFormat
from rlcore.rollout import positions

MARKER = "rlcore_reward_model.json"


class RewardModel(torch.nn.Module):
    """Trunk (a copy of the policy's decoder stack) + a zero-initialised scalar head."""

    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        self.trunk = copy.deepcopy(policy.base_model)
        self.trunk.requires_grad_(True)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)  # every score starts at 0: the first loss is log 2 exactly
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores r(x, y) of right-padded sequences: [N, L] x [N, L] -> [N]."""
        hidden = self.trunk(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                            use_cache=False).last_hidden_state  # [N, L, H]
        last = mask.sum(-1) - 1  # [N] index of each row's last real token
        return self.head(hidden[torch.arange(len(ids)), last].float()).squeeze(-1)  # [N]


def encode(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, prompts: list[str],
           completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt ids + completion ids + EOS, right-padded. -> ids [N, L], mask [N, L]"""
    rows = [fmt.ids(tokenizer, p) + tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, c in zip(prompts, completions, strict=True)]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def split_by_prompt(rows: list[dict], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out pairs are those of a seeded `frac` of the prompts: no prompt is on both sides."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(frac * len(prompts)))])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


def pair_scores(model: RewardModel, tokenizer, fmt: PromptFormat, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every pair's chosen and rejected completion. -> [N], [N]"""
    prompts = [r["prompt"] for r in rows]
    ids, mask = encode(tokenizer, fmt, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    scores = model(ids, mask)  # [2N]
    return scores[: len(rows)], scores[len(rows) :]


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float) -> torch.Tensor:
    """Mean Bradley-Terry loss over pairs, plus reward centring c * mean((r_c + r_r)^2)."""
    loss = sigmoid(chosen, rejected, 1.0)[0].mean()
    return loss + center_coef * ((chosen + rejected) ** 2).mean() if center_coef else loss


@torch.no_grad()
def heldout_metrics(model: RewardModel, tokenizer, fmt: PromptFormat, rows: list[dict], chunk: int) -> dict[str, float]:
    was = model.training
    model.eval()
    c, r = zip(*(pair_scores(model, tokenizer, fmt, rows[i : i + chunk]) for i in range(0, len(rows), chunk)),
               strict=True)
    chosen, rejected = torch.cat(c), torch.cat(r)  # [N]
    model.train(was)
    truth = torch.tensor([x["chosen_reward"] - x["rejected_reward"] for x in rows])  # [N] > 0: the label is right
    # Ties of the true reward are labelled by a coin (or a bias) and are often the same text twice: no model can
    # rank them, so both accuracies count only the pairs the true reward decides.
    decided = truth != 0
    if not bool(decided.any()):
        raise ConfigError("reward_model: no held-out pair has different true rewards; sample more prompts")
    label_right = (chosen > rejected)[decided]
    true_right = torch.where(truth > 0, chosen > rejected, rejected > chosen)[decided]
    return {"rm/heldout_accuracy": float(label_right.float().mean()),
            "rm/heldout_true_accuracy": float(true_right.float().mean()),
            "rm/heldout_margin": float((chosen - rejected).mean())}


def load_pairs(cfg: ExperimentConfig, root: Path) -> list[dict]:
    """The pairs of `reward_model.pairs` (a `kind: preferences` experiment, built on first use)."""
    from rlcore.preferences import load_pairs as load

    return load(cfg, cfg.reward_model.pairs, root)


def train_reward_model(cfg: ExperimentConfig, root: Path, out: Path | None = None) -> tuple[str, dict[str, float], Path]:
    """Train, evaluate and save a reward model as its own MLflow run (to `out`, default
    outputs/<run_id>/reward_model); returns (run id, final metrics, directory)."""
    import yaml
    from safetensors.torch import save_file

    from rlcore import threads
    from rlcore.config import flatten
    from rlcore.model import build_policy
    from rlcore.seeding import seed_everything
    from rlcore.sft import warm_start_dir
    from rlcore.tracking import Tracker, git_commit
    from rlcore.trainer import Learner, adamw, step_learners

    threads.say_once()
    rows = load_pairs(cfg, root)
    seed_everything(cfg.seed)
    policy, tokenizer = build_policy(cfg.model, warm_start_dir(cfg, root))
    model = RewardModel(policy)
    del policy
    fmt = PromptFormat(cfg.prompt, cfg.model.use_chat_template)
    rm = cfg.reward_model
    train, held = split_by_prompt(rows, rm.heldout_frac, cfg.seed)
    if not train or not held:
        raise ConfigError(f"reward_model.heldout_frac: {len(rows)} pairs split into {len(train)} to train on and "
                          f"{len(held)} held out; both must be non-empty")
    t = cfg.trainer
    steps = rm.epochs * -(-len(train) // rm.batch_size)
    opt, sched = adamw(model.parameters(), t, cosine_over=steps)
    tracker = Tracker(cfg.logging.experiment, root)
    tags = {"rlcore.kind": "reward_model", "task": cfg.task.name, "git_commit": git_commit(root),
            "rlcore.rm.pairs": str(len(rows)), "rlcore.rm.heldout_pairs": str(len(held)), **cfg.logging.tags}
    rng = random.Random(cfg.seed)
    with tracker.run(cfg.logging.run_name or "reward-model", tags, flatten(cfg.to_dict()),
                     yaml.safe_dump(cfg.to_dict(), sort_keys=False)):
        metrics = heldout_metrics(model, tokenizer, fmt, held, t.micro_batch_size)
        tracker.log(0, metrics)
        bar = tqdm(total=steps, desc="reward model", unit="step", file=sys.stderr, dynamic_ncols=True)
        step = 0
        for _ in range(rm.epochs):
            order = train[:]
            rng.shuffle(order)
            for i in range(0, len(order), rm.batch_size):
                part = order[i : i + rm.batch_size]
                seen: dict[str, float] = {}

                def loss_of(_m, _norm, part=part, seen=seen) -> tuple[torch.Tensor, dict]:
                    chosen, rejected = pair_scores(model, tokenizer, fmt, part)  # [n], [n]
                    loss = bt_loss(chosen, rejected, rm.center_coef)
                    seen.update({"rm/loss": float(loss.detach()),
                                 "rm/accuracy": float((chosen > rejected).float().mean())})
                    return loss, {}

                step_learners([Learner("reward_model", model, opt, loss_of)], [None], None, t.grad_clip)
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{seen['rm/loss']:.3f}")
                tracker.log(step, seen)
                if step % cfg.logging.eval_every == 0 or step == steps:
                    metrics = heldout_metrics(model, tokenizer, fmt, held, t.micro_batch_size)
                    tracker.log(step, metrics)
        bar.close()
        out = out or root / cfg.logging.output_dir / tracker.run_id / "reward_model"
        model.trunk.save_pretrained(out / "trunk")
        tokenizer.save_pretrained(out / "trunk")
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
        (out / MARKER).write_text(json.dumps({"kind": "reward_model", "run_id": tracker.run_id, **metrics,
                                              "prompt": cfg.prompt.model_dump(), "chat": cfg.model.use_chat_template}))
    return tracker.run_id, metrics, out


def load_reward_model(path: Path) -> tuple[RewardModel, PreTrainedTokenizerBase, PromptFormat]:
    """A saved reward model (the folder with rlcore_reward_model.json), ready to score."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from rlcore.config import PromptConfig

    meta = json.loads((path / MARKER).read_text())
    trunk = AutoModel.from_pretrained(path / "trunk")
    model = RewardModel.__new__(RewardModel)
    torch.nn.Module.__init__(model)
    model.trunk = trunk
    model.head = torch.nn.Linear(AutoConfig.from_pretrained(path / "trunk").hidden_size, 1)
    model.head.load_state_dict(load_file(str(path / "head.safetensors")))
    fmt = PromptFormat(PromptConfig.model_validate(meta["prompt"]), meta["chat"])
    return model.eval(), AutoTokenizer.from_pretrained(path / "trunk"), fmt


def cached(cfg: ExperimentConfig, root: Path) -> Path:
    """The reward model of a `kind: reward_model` experiment, trained on first use into
    .rlcore_cache/reward_model/<config hash>/ (atomically, one builder at a time) and reused after."""
    import os
    import shutil
    import tempfile

    from filelock import FileLock

    key = cfg.config_hash(sections=("seed", "model", "task", "prompt", "reward_model", "trainer"), changed_only=True)
    out = root / ".rlcore_cache" / "reward_model" / key
    if (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / MARKER).is_file():
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
            try:
                train_reward_model(cfg, root, tmp)
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return out
