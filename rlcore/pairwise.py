"""Pairwise preference losses: one registry for the reward model and for direct preference optimisation.

Every loss has one signature, `loss(chosen, rejected, beta) -> (per_pair_loss [N], metrics)`, over a *score* per
completion: a reward model's scalar r(x, y), or for DPO/IPO the policy's log-ratio to the frozen reference,
s = log pi(y|x) - log pi_ref(y|x) summed over the completion's tokens. The two are one idea: DPO's implicit reward is
beta * s, and its loss is the Bradley-Terry loss on that reward.

Metrics follow TRL's names where they exist (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`), each a mean over pairs of the implicit (or learned) reward beta * s, so runs compare with TRL's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PairLoss = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _metrics(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    rc, rr = beta * chosen.detach(), beta * rejected.detach()  # [N] rewards (implicit for DPO/IPO)
    return {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
            "rewards/accuracies": (rc > rr).float().mean()}


def sigmoid(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry (1952) / DPO (Rafailov et al., 2023): -log sigma(beta * (s_chosen - s_rejected)). [N]

    With beta = 1 and s a reward model's score this is the reward model's loss; with s the policy/reference log-ratio
    it is DPO. The gradient on the margin is -beta * sigma(-beta * margin): pairs already ranked right fade out.
    """
    return -F.logsigmoid(beta * (chosen - rejected)), _metrics(chosen, rejected, beta)


def ipo(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al., 2023): (h - 1 / (2 beta))^2 with h = s_chosen - s_rejected. [N]

    A squared loss with a finite target margin 1/(2 beta): unlike the sigmoid loss it does not push the log-ratio gap
    to infinity on pairs that are already separated (DPO's overfitting on deterministic preferences).
    """
    h = chosen - rejected
    return (h - 1.0 / (2.0 * beta)) ** 2, _metrics(chosen, rejected, beta)


PAIR_LOSSES: dict[str, PairLoss] = {"sigmoid": sigmoid, "ipo": ipo}


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the completion's token log-probs: [N, T] x [N, T] -> [N] (DPO's log pi(y|x))."""
    return (logp * mask).sum(-1)
