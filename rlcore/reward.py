"""Reward: the role that scores a batch's completions. The task's verifier gives each completion its reward; shaping
(DAPO's overlong punishment) is added on top. Later reward models and environments are other scorers here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlcore.batch import RolloutBatch

if TYPE_CHECKING:
    from rlcore.config import AlgorithmConfig
    from rlcore.tasks import AdditionTask


def score(task: AdditionTask, batch: RolloutBatch) -> torch.Tensor:
    """The reward role: sequence rewards [B] for a RolloutBatch's decoded completions."""
    triples = zip(batch.answers, batch.finished.tolist(), batch.problems, strict=True)
    return torch.tensor([task.reward(c, f, p) for c, f, p in triples])


def overlong_penalty(batch: RolloutBatch, cfg: AlgorithmConfig, max_new_tokens: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025), added to the task reward. -> [B]

    With L = max_new_tokens and buffer C: 0 for |y| <= L - C; ((L - C) - |y|) / C inside the buffer; -1 for a
    completion cut at L without EOS. Scaled by `overlong_penalty`; all zeros when `overlong_buffer` is 0.
    """
    if cfg.overlong_buffer == 0:
        return torch.zeros(len(batch))
    length = batch.response_mask.sum(-1)  # [B]
    free = max_new_tokens - cfg.overlong_buffer
    soft = ((free - length) / cfg.overlong_buffer).clamp(max=0.0)  # [B] 0 until the buffer, then down to -1
    return cfg.overlong_penalty * torch.where(batch.finished, soft, torch.full_like(soft, -1.0))
