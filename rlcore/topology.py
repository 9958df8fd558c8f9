"""Time models of where the rollout engine runs (lessons 19 and 22c), and what staleness does to a clipped ratio.

The step time of each topology from its roles' times, with the idle share of each role:

    colocated, separate:  T = t_rollout + t_train + t_sync        (one role at a time)
    async (k >= 1):       T = max(t_rollout, t_train + t_sync)     (the engine samples step n+1 while step n trains)

In separate mode the trainer idles while the engine samples (t_rollout / T) and the engine idles while the trainer
trains (t_train / T); in async the shorter role waits for the longer one. Steady state only: the first k steps of
an async run are not overlapped, and any step whose rollout is unusually long (a long tail) shows through unless the
queue is deeper than one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepTime:
    step_s: float  # seconds per step
    trainer_idle: float  # share of the step the trainer waits for samples
    engine_idle: float  # share of the step the engine has nothing to sample

    @property
    def steps_per_hour(self) -> float:
        return 3600.0 / self.step_s if self.step_s > 0 else math.inf


def step_time(mode: str, rollout_s: float, train_s: float, sync_s: float = 0.0, staleness: int = 1) -> StepTime:
    """T and each role's idle share for `mode` (colocated | separate | async) from the roles' seconds per step;
    async with staleness 0 is separate (the engine waits for every update)."""
    busy_train = train_s + sync_s
    if mode == "colocated":
        return StepTime(rollout_s + busy_train, 0.0, 0.0)  # one process does both: nobody waits for anybody
    if mode == "separate" or (mode == "async" and staleness == 0):
        t = rollout_s + busy_train
        return StepTime(t, rollout_s / t, train_s / t)
    if mode == "async":
        t = max(rollout_s, busy_train)
        return StepTime(t, (t - busy_train) / t, (t - rollout_s) / t)
    raise ValueError(f"rollout.mode: unknown {mode!r}, valid: async, colocated, separate")


def stale_clip_fraction(clip_one: float, staleness: int) -> float:
    """Predicted clip fraction of a PPO ratio taken against a sampler `staleness` updates old, from the fraction at
    one update: each update moves the probabilities of the tokens it trained on, and a token is clipped if any of the
    k updates since the sampler's weights moved it past the clip, so 1 - (1 - c1)^k (about k * c1). Measured here:
    0.0080 at one update, 0.0197 at two, where this predicts 0.0160 (lesson 22c)."""
    return 1.0 - (1.0 - clip_one) ** staleness


def gaussian_clip_fraction(kl_k3: float, eps_low: float = 0.2, eps_high: float | None = None) -> float:
    """The naive prediction: log(pi/mu) ~ N(0, sigma^2) with sigma^2 = 2 k3 (k3 ~ sigma^2 / 2 for small gaps), the
    advantage's sign independent of it: 1/2 P(X > log(1 + eps_high)) + 1/2 P(X < log(1 - eps_low)). It misses both
    ways here (0.0017 against 0.0080 at one update, 0.055 against 0.0197 at two): per-token gaps are heavy-tailed,
    most tokens do not move and a few move a lot, so the mean KL says little about the tail the clip cuts."""
    sigma = math.sqrt(2.0 * max(kl_k3, 0.0))
    if sigma <= 0:
        return 0.0
    hi = math.log1p(eps_high if eps_high is not None else eps_low)
    lo = math.log1p(-eps_low)

    def tail(z: float) -> float:  # P(N(0, 1) > z)
        return 0.5 * math.erfc(z / math.sqrt(2.0))

    return 0.5 * tail(hi / sigma) + 0.5 * tail(-lo / sigma)


def mismatch_log_weights(moved: float, size: float, noise: float, shape: tuple[int, int] = (256, 8),
                         seed: int = 0) -> torch.Tensor:
    """Simulated log w = log pi_prox(y) - log mu(y) at tokens y drawn from the sampler mu (lesson 24's control).

    A share `moved` of the tokens had their probability moved by the updates the sampler missed (staleness), with a
    spread `size`; every token also carries a precision gap of spread `noise`. Each part is log-normal with mean
    -sigma^2 / 2, so E_mu[w] = 1 as it must be for a ratio of two distributions under mu's own samples; the batch is
    then normalised so that its own mean weight is exactly 1. Hence KL(mu || pi_prox) = E_mu[-log w] >= 0 and
    ESS <= 1 for any setting (a free drift gave mean weights of 1.35 and a negative KL). [*shape]"""
    g = torch.Generator().manual_seed(seed)
    precision = noise * torch.randn(shape, generator=g) - noise ** 2 / 2  # [B, T]
    hit = (torch.rand(shape, generator=g) < moved).float()  # [B, T] tokens the missed updates moved
    stale = hit * (size * torch.randn(shape, generator=g) - size ** 2 / 2)  # [B, T]
    log_w = precision + stale  # [B, T]
    return log_w - torch.logsumexp(log_w.flatten(), 0) + math.log(log_w.numel())  # [B, T] mean of e^log_w is 1
