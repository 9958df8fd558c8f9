"""Reference: a frozen copy of the starting policy, whose log-probs the KL anchor compares against.

The KL estimators (k1, k2, k3) are an algorithm axis and live with the others in rlcore/algorithm.py.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from transformers import PreTrainedModel

from rlcore.batch import RolloutBatch
from rlcore.model import is_lora
from rlcore.rollout import token_logprobs


class Reference:
    """Frozen copy of the policy at the start of training (never updated, never in the optimizer). With LoRA there
    is no copy: the reference is the policy with its adapters disabled, which is the base model exactly."""

    def __init__(self, policy: PreTrainedModel):
        self.shared = is_lora(policy)
        if self.shared:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
        """Reference log-prob of every response token, computed in micro-batches. -> [B, T]"""
        with self.model.disable_adapter() if self.shared else nullcontext():
            was_training = self.model.training
            self.model.eval()  # adapter dropout off; the frozen copy is always in eval mode
            chunks = [token_logprobs(self.model, batch.rows(slice(i, i + micro_batch_size)))[0].cpu()
                      for i in range(0, len(batch), micro_batch_size)]
            self.model.train(was_training)
        return torch.cat(chunks)
