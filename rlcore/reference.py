"""Reference: a frozen copy of the starting policy, whose log-probs the KL anchor compares against.

The KL estimators (k1, k2, k3) are an algorithm axis and live with the others in rlcore/algorithm.py.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from rlcore.batch import RolloutBatch
from rlcore.rollout import token_logprobs


class Reference:
    """Frozen copy of the policy at the start of training (never updated, never in the optimizer)."""

    def __init__(self, policy: PreTrainedModel):
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
        """Reference log-prob of every response token, computed in micro-batches. -> [B, T]"""
        chunks = [token_logprobs(self.model, batch.rows(slice(i, i + micro_batch_size)))[0].cpu()
                  for i in range(0, len(batch), micro_batch_size)]
        return torch.cat(chunks)
