"""Pairwise preference losses (Bradley-Terry / DPO sigmoid, IPO) on a 2-pair batch computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.pairwise import PAIR_LOSSES, ipo, sequence_logps, sigmoid

CHOSEN = [0.5, -0.2]  # scores s = log pi - log pi_ref (DPO) or r (reward model)
REJECTED = [0.1, 0.3]


def test_sigmoid_loss_gradient_and_trl_metrics_by_hand() -> None:
    beta = 0.1
    c = torch.tensor(CHOSEN, requires_grad=True)
    r = torch.tensor(REJECTED, requires_grad=True)
    loss, m = sigmoid(c, r, beta)
    # margins beta * (s_c - s_r) = [0.04, -0.05]; -log sigma(x) = log(1 + e^-x)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.04)), math.log(1 + math.exp(0.05))], rel=1e-6)
    loss.mean().backward()
    # d/ds_c of -log sigma(beta * (s_c - s_r)) = -beta * sigma(-margin); halved by the mean over 2 pairs
    sig = [1 / (1 + math.exp(x)) for x in (0.04, -0.05)]
    assert c.grad.tolist() == pytest.approx([-beta * s / 2 for s in sig], rel=1e-6)
    assert r.grad.tolist() == pytest.approx([beta * s / 2 for s in sig], rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1 * (0.5 - 0.2) / 2)
    assert float(m["rewards/rejected"]) == pytest.approx(0.1 * (0.1 + 0.3) / 2)
    assert float(m["rewards/margins"]) == pytest.approx((0.04 - 0.05) / 2)
    assert float(m["rewards/accuracies"]) == 0.5  # the first pair is ranked right, the second wrong


def test_bradley_terry_is_the_sigmoid_loss_at_beta_one() -> None:
    c, r = torch.tensor(CHOSEN), torch.tensor(REJECTED)
    loss, _ = sigmoid(c, r, 1.0)
    p_prefer = torch.sigmoid(c - r)  # the Bradley-Terry probability that chosen beats rejected
    assert torch.allclose(loss, -p_prefer.log())


def test_ipo_loss_and_gradient_by_hand() -> None:
    beta = 0.5  # target margin 1 / (2 beta) = 1
    c = torch.tensor(CHOSEN, requires_grad=True)
    r = torch.tensor(REJECTED, requires_grad=True)
    loss, m = ipo(c, r, beta)
    h = [0.4, -0.5]
    assert loss.tolist() == pytest.approx([(x - 1) ** 2 for x in h])
    loss.sum().backward()
    assert c.grad.tolist() == pytest.approx([2 * (x - 1) for x in h])
    assert r.grad.tolist() == pytest.approx([-2 * (x - 1) for x in h])
    # at the target margin the loss and its gradient are 0: IPO does not push separated pairs further
    at_target, _ = ipo(torch.tensor([1.0]), torch.tensor([0.0]), beta)
    assert float(at_target) == 0.0
    assert float(m["rewards/accuracies"]) == 0.5
    assert set(PAIR_LOSSES) == {"sigmoid", "ipo"}


def test_sequence_logps_sum_only_the_completion() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert sequence_logps(logp, mask).tolist() == [-6.0, -1.0]
