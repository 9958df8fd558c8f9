"""Critic: the learned value function V(s_t) that PPO's GAE advantages need (lesson 09).

A separate value model: a copy of the starting policy's transformer trunk with a fresh scalar head. Why not a
value head on the policy's own trunk? A shared trunk lets the value loss's gradient move the policy, so it needs a
tuned value-loss weight and couples the two learning rates; separate models are what InstructGPT, verl and OpenRLHF
run, at the price of one more forward/backward per step, which the `timing/values` and `timing/update` metrics show.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from rlcore.batch import RolloutBatch
from rlcore.rollout import positions

if TYPE_CHECKING:
    from rlcore.algorithm import AggNorm
    from rlcore.config import ExperimentConfig


class ValueModel(torch.nn.Module):
    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        self.trunk = copy.deepcopy(policy.base_model)  # the decoder stack without the LM head
        self.trunk.requires_grad_(True)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32)
        # A zero head starts every value at 0: the first advantages are the plain reward-to-go, not noise.
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, batch: RolloutBatch) -> torch.Tensor:
        """V(s_t) for each response position t: the state is the prompt plus the response before token t. -> [B, T]"""
        device = self.device
        mask = batch.attention_mask.to(device)
        hidden = self.trunk(input_ids=batch.input_ids.to(device), attention_mask=mask,
                            position_ids=positions(mask), use_cache=False).last_hidden_state  # [B, P+T, H]
        P, T = batch.prompt_len, batch.response_mask.shape[1]
        return self.head(hidden[:, P - 1 : P + T - 1].float()).squeeze(-1)  # [B, T], aligned like the log-probs


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) and its metrics. [B, T] each.

    Value clipping as in PPO's reference implementation (Schulman et al. 2017, openai/baselines): a value estimate
    cannot move more than c from the one the advantages were computed with. `clip: None` is the plain squared error.
    """
    loss = (values - returns) ** 2  # [B, T]
    metrics = {"critic/vpred": values.detach()}
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)  # [B, T]
        clipped_loss = (clipped - returns) ** 2
        metrics["critic/clipfrac"] = (clipped_loss > loss).float().detach()
        loss = torch.maximum(loss, clipped_loss)
    return 0.5 * loss, metrics


def explained_variance(batch: RolloutBatch) -> float:
    """1 - Var(R - V) / Var(R) over every response token of the global batch, with V the values the advantages
    used: 1 is a perfect critic, 0 no better than a constant, < 0 worse than one."""
    m = batch.response_mask
    r, d = batch.returns * m, (batch.returns - batch.values) * m  # [B, T]
    n, sr, sr2, sd, sd2 = batch.reduce_sum(torch.stack([m.sum(), r.sum(), (r * r).sum(), d.sum(), (d * d).sum()]))
    var_r = sr2 / n - (sr / n) ** 2
    var_d = sd2 / n - (sd / n) ** 2
    return float(1 - var_d / var_r) if var_r > 1e-12 else 0.0


class Critic:
    """The value role: its own model, optimizer and loss. The trainer steps it with the policy (one backward over
    both disjoint graphs), without knowing what it is."""

    name = "critic"

    def __init__(self, policy: PreTrainedModel, cfg: ExperimentConfig, acc: Accelerator):
        # Built from the policy *before* any update, so it starts from the same trunk.
        model = ValueModel(policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.algorithm.critic_lr, betas=cfg.trainer.betas)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.cfg, self.acc = cfg, acc

    @torch.no_grad()
    def values(self, micro_batches: list[RolloutBatch]) -> torch.Tensor:
        """V(s_t) before the update (V_old of value clipping), over the batch's micro-batches. -> [B, T]"""
        model = self.acc.unwrap_model(self.model)
        return torch.cat([model(m).cpu() for m in micro_batches])

    def loss(self, m: RolloutBatch, norm: AggNorm) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """Clipped value loss of one micro-batch, token mean over the global token count, and its metrics."""
        dev = self.acc.device
        mask = m.response_mask.to(dev)  # [b, T]
        values = self.model(m)  # [b, T]
        per_token, metrics = value_loss(values, m.values.to(dev), m.returns.to(dev), self.cfg.algorithm.value_clip)
        tok = float(mask.sum())
        stats = {k: (float((v * mask).sum()), tok) for k, v in metrics.items()}
        stats["critic/value_loss"] = (float((per_token.detach() * mask).sum()), tok)
        return (per_token * mask).sum() / norm.tokens, stats

    def state_dict(self) -> dict:
        return {"critic": self.acc.unwrap_model(self.model).state_dict(), "critic_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.acc.unwrap_model(self.model).load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["critic_optimizer"])
