"""Reward model (lesson 15): the policy's trunk with a scalar head, trained on preference pairs with the
Bradley-Terry loss -log sigma(r(x, y_chosen) - r(x, y_rejected)) (rlcore.pairwise.sigmoid at beta = 1).
This module is the model, its scoring and loading (what the reward role needs); training is rlcore.rm_training.

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
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlcore.config import ConfigError
from rlcore.pairwise import sigmoid
from rlcore.prompts import PromptFormat
from rlcore.rollout import pad_rows, positions

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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, steps: bool = False) -> torch.Tensor:
        """Scores r(x, y) of right-padded sequences: [N, L] x [N, L] -> [N]; with `steps` a score after every token
        (a process reward model's logits) -> [N, L]."""
        hidden = self.trunk(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                            use_cache=False).last_hidden_state  # [N, L, H]
        if steps:
            return self.head(hidden.float()).squeeze(-1)  # [N, L]
        last = mask.sum(-1) - 1  # [N] index of each row's last real token
        return self.head(hidden[torch.arange(len(ids)), last].float()).squeeze(-1)  # [N]


def encode(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, prompts: list[str],
           completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt ids + completion ids + EOS, right-padded. -> ids [N, L], mask [N, L]"""
    rows = [fmt.ids(tokenizer, p) + tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, c in zip(prompts, completions, strict=True)]
    return pad_rows(rows, tokenizer.pad_token_id)


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


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float, n: int | None = None) -> torch.Tensor:
    """Bradley-Terry loss summed over these pairs and divided by `n` (the whole batch's pair count when a process
    holds a share of it; default: these pairs, the mean), plus reward centring c * (r_c + r_r)^2 alike."""
    n = len(chosen) if n is None else n
    loss = sigmoid(chosen, rejected, 1.0)[0].sum() / n
    return loss + center_coef * ((chosen + rejected) ** 2).sum() / n if center_coef else loss


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


# ------------------------------------------------------------------------------------ process reward model

def process_rows(engine, task, problems: list, k: int, sampling, tokenizer) -> list[dict]:
    """k sampled answers per problem, every answer token labelled (Lightman et al. 2023's step labels, checked
    exactly instead of by people): a digit is right iff the answer so far is a prefix of the right one
    (`task.prefix_right`); the EOS that ends it is right iff the whole answer is (`task.verify`)."""
    batch = engine.generate(problems, k, sampling)
    rows = []
    for i, problem in enumerate(batch.problems):
        ids = batch.responses[i][batch.response_mask[i].bool()].tolist()  # the answer's tokens, EOS included
        labels = []
        for j, tok in enumerate(ids):
            if tok == tokenizer.eos_token_id:
                text = tokenizer.decode(ids[:j], skip_special_tokens=True)
                labels.append(float(task.verify(text, problem.answer, finished=True)))
            else:
                text = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
                labels.append(float(task.prefix_right(text, problem.answer)))
        rows.append({"prompt": problem.prompt, "answer": problem.answer, "ids": ids, "labels": labels})
    return rows


def encode_steps(tokenizer, fmt: PromptFormat, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt + the answer's own token ids, right-padded, and a label per answer token (-1 elsewhere).
    -> ids [N, L], mask [N, L], labels [N, L]"""
    prompts = [fmt.ids(tokenizer, r["prompt"]) for r in rows]
    ids, mask = pad_rows([p + r["ids"] for p, r in zip(prompts, rows, strict=True)], tokenizer.pad_token_id)
    labels, _ = pad_rows([[-1.0] * len(p) + r["labels"] for p, r in zip(prompts, rows, strict=True)], -1.0,
                         dtype=torch.float32)
    return ids, mask, labels


def prm_loss(logits: torch.Tensor, labels: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Binary cross-entropy of every labelled step, summed and divided by `n` (all labelled steps of the whole batch
    when this process holds a share of it; default: these, the mean). [N, L] x [N, L] -> scalar"""
    on = labels >= 0
    n = int(on.sum()) if n is None else n
    return F.binary_cross_entropy_with_logits(logits[on], labels[on], reduction="sum") / max(n, 1)


@torch.no_grad()
def process_metrics(model: RewardModel, tokenizer, fmt: PromptFormat, rows: list[dict], chunk: int) -> dict[str, float]:
    """Held-out: steps classified right (logit > 0 iff the label is 1), and the same for the last step only (does
    the model know whether the whole answer is right?)."""
    was = model.training
    model.eval()
    step_right, steps, last_right = 0, 0, 0
    for i in range(0, len(rows), chunk):
        ids, mask, labels = encode_steps(tokenizer, fmt, rows[i : i + chunk])
        pred = model(ids, mask, steps=True) > 0  # [N, L]
        on = labels >= 0
        step_right += int((pred == (labels > 0.5))[on].sum())
        steps += int(on.sum())
        last = on.cumsum(-1).argmax(-1)  # [N] each row's last labelled position
        rows_ = torch.arange(len(ids))
        last_right += int((pred[rows_, last] == (labels[rows_, last] > 0.5)).sum())
    model.train(was)
    return {"prm/heldout_step_accuracy": step_right / steps, "prm/heldout_final_accuracy": last_right / len(rows)}


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
