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


# One model of what staleness does to a ratio taken against the sampler (lessons 06, 22c, 24), fitted on lesson 22c's
# coupled runs (lr 3e-4, no KL anchor): clip fraction 0.0080 one update stale, 0.0197 two updates stale.
STALE_TAIL = math.log2(0.0197 / 0.0080)  # 1.30


def stale_clip_fraction(clip_one: float, staleness: int, tail: float = STALE_TAIL) -> float:
    """Predicted clip fraction of a PPO ratio taken against a sampler `staleness` = k updates old, from the fraction
    at one update.

    Consecutive updates push the same tokens the same way (the same rewards keep favouring the same answers), so
    after k updates a token's log(pi/mu) is k times its one-update move delta: a drift, not a random walk (whose
    spread would grow like sqrt(k)). And delta is heavy-tailed: most tokens barely move, a few move a lot, with
    P(|delta| > x) ~ x^-a in the tail the clip cuts. A token is clipped where |k delta| > log(1 + eps), so
    clip(k) = clip(1) k^a, capped at 1; a = STALE_TAIL is fitted on lesson 22c's k = 1 and 2 runs. The model's
    other prediction, `stale_mismatch_kl`, is not fitted (22c says how well both hold)."""
    return 0.0 if staleness <= 0 else min(1.0, clip_one * staleness ** tail)


def stale_mismatch_kl(kl_one: float, staleness: int) -> float:
    """The same drift model's mismatch KL(mu || pi): for small moves KL ~ E[(k delta)^2] / 2 = k^2 KL(1) (a random
    walk would give k KL(1))."""
    return kl_one * max(staleness, 0) ** 2


def stale_log_ratios(staleness: int, delta: float, n: int = 4096, tail: float = STALE_TAIL,
                     seed: int = 0) -> torch.Tensor:
    """Per-token log(pi/mu) under the drift model, for lesson 06's control: k times a symmetric heavy-tailed move of
    scale delta, |move| = delta (U^(-1/a) - 1) (a Lomax law: P(|move| > x) = (1 + x / delta)^-a). [n, 1]"""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 1, generator=g).clamp_min(1e-12)  # [n, 1]
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)  # [n, 1]
    return staleness * delta * sign * (u ** (-1.0 / tail) - 1.0)  # [n, 1]


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
