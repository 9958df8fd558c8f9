"""Reference: a frozen copy of the starting policy, and the KL estimators that anchor the policy to it.

The estimators follow Schulman, "Approximating KL Divergence" (2020): with r = pi_ref / pi_theta evaluated at
tokens sampled from pi_theta, each is an estimate of KL(pi_theta || pi_ref) per token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from rlcore.rollout import RolloutBatch, token_logprobs

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl(name: str) -> Callable[[KLEstimator], KLEstimator]:
    def deco(fn: KLEstimator) -> KLEstimator:
        if name in KL_ESTIMATORS:
            raise ValueError(f"KL estimator {name!r} registered twice")
        KL_ESTIMATORS[name] = fn
        return fn

    return deco


@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref. Unbiased, high variance, can be negative per token. [B, T] -> [B, T]"""
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log pi_theta - log pi_ref)^2. Biased, low variance, >= 0. [B, T] -> [B, T]"""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r with r = pi_ref / pi_theta. Unbiased, low variance, >= 0 (GRPO, DeepSeekMath 2024).

    [B, T] -> [B, T]. The log-ratio is held to [-20, 20] before exp (as verl's `low_var_kl`), so one token with
    pi_ref >> pi gives a large finite value (then `kl_clamp`), not inf and a NaN gradient.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # [B, T]
    return log_ratio.exp() - 1 - log_ratio


def kl_estimate(name: str, logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """The configured estimator's per-token KL, clamped to [-clamp, clamp] (`algorithm.kl_clamp`). [B, T] -> [B, T]"""
    kl = KL_ESTIMATORS[name](logp, ref_logp)
    return kl if clamp is None else kl.clamp(-clamp, clamp)


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
