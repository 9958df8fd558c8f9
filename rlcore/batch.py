"""The data that flows between roles: a problem, and the batch of completions every role reads and fills.

A leaf: it imports nothing of rlcore's, so any role, loss or engine can use it without pulling in another role.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Problem:
    prompt: str  # the question, e.g. "12+345=" (rlcore.prompts formats it into the model's prompt)
    answer: str  # the reference answer, e.g. "357" (for addition: the exact completion that earns reward 1)
    meta: dict | None = field(default=None, compare=False, hash=False)  # the task's record (a reasoning-gym entry)


@dataclass
class RolloutBatch:
    """B = prompts x K rows. Prompt left-padded to P, response right-padded to T."""

    input_ids: torch.Tensor  # [B, P+T] prompt + response token ids
    attention_mask: torch.Tensor  # [B, P+T] 1 on real tokens (prompt and response up to and including EOS)
    response_mask: torch.Tensor  # [B, T] float; 1 on tokens the loss, KL and entropy count
    group: torch.Tensor  # [B] index of the prompt a row answers (global across processes)
    sampler_logp: torch.Tensor  # [B, T] the sampling distribution's log-prob of each token
    finished: torch.Tensor  # [B] bool, the completion ended with EOS (not cut at max_new_tokens)
    prompt_len: int  # P
    problems: list[Problem] = field(default_factory=list)  # [B]
    completions: list[str] = field(default_factory=list)  # [B] decoded response text (without EOS)
    answers: list[str] = field(default_factory=list)  # [B] what the grader reads (after the last tool output)
    tool_mask: torch.Tensor | None = None  # [B, T] 1 on tokens the environment inserted (None without a tool)
    rewards: torch.Tensor | None = None  # [B] sequence reward (task reward + shaping)
    shaping: torch.Tensor | None = None  # [B] the part of `rewards` that is shaping (DAPO overlong), 0 when off
    ref_logp: torch.Tensor | None = None  # [B, T] reference log-probs (None when beta = 0)
    old_logp: torch.Tensor | None = None  # [B, T] policy log-probs before the update (None when on-policy)
    values: torch.Tensor | None = None  # [B, T] critic values V(s_t) before the update (PPO with GAE)
    returns: torch.Tensor | None = None  # [B, T] the critic's targets (PPO with GAE)
    adv: torch.Tensor | None = None  # [B, T] advantages
    version: int | None = None  # the policy version (updates made) whose weights sampled it, where an engine says
    # Sums a tensor over every process's rows (identity with one process); batch-level statistics use it so they
    # do not depend on how the batch was split.
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]  # [B, T]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def first_nonfinite(self) -> str:
        """The first phase whose output holds a NaN/inf ('update' when every input was finite)."""
        for phase, t in (("reward", self.rewards), ("reference", self.ref_logp), ("old_logprob", self.old_logp),
                         ("values", self.values), ("advantage", self.adv)):
            if t is not None and not bool(torch.isfinite(t).all()):
                return phase
        return "update"

    def rows(self, idx: slice | torch.Tensor) -> RolloutBatch:
        """A micro-batch: tensors and lists taken on the batch dimension by a slice or a LongTensor of rows."""
        out = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                out[name] = value[idx]
            elif isinstance(value, list) and value:  # per-row lists
                out[name] = value[idx] if isinstance(idx, slice) else [value[i] for i in idx.tolist()]
            else:
                out[name] = value
        return RolloutBatch(**out)

    @staticmethod
    def cat(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Concatenate rollout batches on rows, re-padding prompts (left) and responses (right) to a common width.

        Used by dynamic sampling, whose rounds have different prompt and response lengths. Only fields set on
        every batch are kept (rewards yes, advantages not yet computed).
        """
        P = max(b.prompt_len for b in batches)
        T = max(b.response_mask.shape[1] for b in batches)
        first = batches[0]

        def pad(t: torch.Tensor, left: int, right: int, value: float = 0) -> torch.Tensor:
            return F.pad(t, (left, right), value=value)

        out: dict = {"prompt_len": P, "reduce_sum": first.reduce_sum}
        for name in ("input_ids", "attention_mask"):
            out[name] = torch.cat([
                torch.cat([pad(b.__dict__[name][:, : b.prompt_len], P - b.prompt_len, 0, pad_id if name == "input_ids" else 0),
                           pad(b.__dict__[name][:, b.prompt_len :], 0, T - b.response_mask.shape[1],
                               pad_id if name == "input_ids" else 0)], 1)
                for b in batches])
        for name, value in first.__dict__.items():
            if name in out or value is None:
                continue
            if isinstance(value, list):
                out[name] = [x for b in batches for x in b.__dict__[name]]
            elif not isinstance(value, torch.Tensor):  # the version: the oldest round's
                out[name] = min(b.__dict__[name] for b in batches)
            elif value.dim() == 2:  # [B, T] response-aligned
                out[name] = torch.cat([pad(b.__dict__[name], 0, T - b.__dict__[name].shape[1]) for b in batches])
            else:  # [B]
                out[name] = torch.cat([b.__dict__[name] for b in batches])
        return RolloutBatch(**out)


@dataclass
class LossInputs:
    """What a policy loss reads of one micro-batch besides the current log-probs, as one view: later fields
    (importance weights, the behaviour policy of an async engine) reach every loss without a new signature."""

    old_logp: torch.Tensor  # [b, T] pi_old of the ratio (the current log-probs, detached, when on-policy)
    adv: torch.Tensor  # [b, T] advantages
    mask: torch.Tensor  # [b, T] 1 on tokens the loss counts
    sampler_logp: torch.Tensor | None = None  # [b, T] the log-probs of the engine that sampled (behaviour policy)
