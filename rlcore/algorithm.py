"""Algorithm: registries of advantage estimators, policy losses and loss aggregations.

An algorithm is a preset over these axes (see experiments/*.yaml); nothing outside this module branches on an
algorithm's name. Every entry of a registry has that registry's one signature:

- advantage:   fn(batch, cfg) -> adv [B, T] (or (adv, returns) for an estimator that trains a critic)
- policy loss: fn(logp, inputs: LossInputs, cfg) -> (per-token loss [B, T], {metric: per-token value [B, T]}); the
  inputs are a view of the micro-batch (old log-probs, advantages, mask, the sampler's log-probs)
- group filter: fn(rewards [B], k) -> keep [B / k] bool, which groups of K samples the update may use.
- aggregation: fn(per_token_loss, mask, norm) -> scalar, where `norm` holds *global* counts over the whole
  rollout batch (all micro-batches, all processes), so gradient accumulation never changes the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlcore.batch import LossInputs, RolloutBatch

if TYPE_CHECKING:  # the schema imports these registries to validate names; a runtime import would be a cycle
    from rlcore.config import AlgorithmConfig

ADVANTAGES: dict[str, Callable[[RolloutBatch, AlgorithmConfig], torch.Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
LOSS_AGG: dict[str, Callable[..., torch.Tensor]] = {}
GROUP_FILTERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}
IS_CORRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, AlgorithmConfig], torch.Tensor]] = {}


def _register(registry: dict, name: str, needs: tuple[str, ...] = ()):
    """Add `fn` to `registry` under `name`, with what it needs from the other roles (see `requirements`):
    `values` (a critic), `group` (K >= 2 samples per prompt), `resample` (more rollout rounds), `old_logp`."""
    def deco(fn):
        if name in registry:
            raise ValueError(f"{name!r} registered twice")
        fn.needs = frozenset(needs)
        registry[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class Needs:
    """The phases a configured algorithm needs, derived from what its registry entries declare."""

    reference: bool  # a KL anchor (beta > 0): the reference model's log-probs
    old_logp: bool  # pre-update log-probs: the batch is reused (epochs, minibatches) or KL sits in the reward
    values: bool  # a critic's values (and its own update)
    resample: bool  # a group filter that draws more rollout rounds
    group: bool  # K >= 2 samples per prompt


# Where the KL anchor acts, and what it needs: in the reward it is computed from the rollout-time log-probs.
KL_PLACEMENTS: dict[str, frozenset[str]] = {"loss": frozenset(), "reward": frozenset({"old_logp"})}


def requirements(cfg: AlgorithmConfig) -> Needs:
    """What the configured axes need from the other roles: the one place phases are decided."""
    declared = ADVANTAGES[cfg.advantage].needs | GROUP_FILTERS[cfg.group_filter].needs
    anchored = cfg.kl_coef > 0
    if anchored:
        declared |= KL_PLACEMENTS[cfg.kl_placement]
    reused = cfg.ppo_epochs > 1 or cfg.minibatches > 1  # a second pass needs the policy the batch came from
    return Needs(reference=anchored, old_logp=reused or "old_logp" in declared, values="values" in declared,
                 resample="resample" in declared, group="group" in declared)


def advantages(batch: RolloutBatch, cfg: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The configured estimator's advantages [B, T], and the critic's targets [B, T] when it makes them (GAE)."""
    out = ADVANTAGES[cfg.advantage](batch, cfg)
    return out if isinstance(out, tuple) else (out, None)


def lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}, valid: {', '.join(sorted(registry))}")
    return registry[name]


# ------------------------------------------------------------------------------------------ KL estimators

# Schulman, "Approximating KL Divergence" (2020): with r = pi_ref / pi_theta evaluated at tokens sampled from
# pi_theta, each is an estimate of KL(pi_theta || pi_ref) per token.
KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl(name: str, clamped: bool = False) -> Callable[[KLEstimator], KLEstimator]:
    """`clamped`: `algorithm.kl_clamp` applies to it. Only k3 is (as verl's `low_var_kl`): its e^x can explode for
    one token; k1 and k2 stay unclamped, so they keep pulling hardest on the tokens that drifted most."""
    def deco(fn: KLEstimator) -> KLEstimator:
        if name in KL_ESTIMATORS:
            raise ValueError(f"KL estimator {name!r} registered twice")
        fn.clamped = clamped
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


@register_kl("k3", clamped=True)
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r with r = pi_ref / pi_theta. Unbiased, low variance, >= 0 (GRPO, DeepSeekMath 2024).

    [B, T] -> [B, T]. The log-ratio is held to [-20, 20] before exp (as verl's `low_var_kl`), so one token with
    pi_ref >> pi gives a large finite value (then `kl_clamp`), not inf and a NaN gradient.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # [B, T]
    return log_ratio.exp() - 1 - log_ratio


def kl_estimate(name: str, logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """The configured estimator's per-token KL; one registered `clamped` (k3) is clamped to [-clamp, clamp]
    (`algorithm.kl_clamp`). [B, T] -> [B, T]"""
    fn = KL_ESTIMATORS[name]
    kl = fn(logp, ref_logp)  # [B, T]
    return kl if clamp is None or not fn.clamped else kl.clamp(-clamp, clamp)



# ------------------------------------------------------------------------------------------ presets

# What makes each preset the algorithm it is, over the axes (experiments/<name>.yaml sets the rest: KL, clip
# ranges, epochs). Most specific first: an unnamed config is labelled with the first preset it matches.
PRESETS: dict[str, dict[str, object]] = {
    "dapo": {"advantage": "grpo", "policy_loss": "ppo_clip", "group_filter": "nonzero_std"},
    "grpo": {"advantage": "grpo", "scale_by_std": True, "policy_loss": "ppo_clip", "group_filter": "none"},
    "drgrpo": {"advantage": "grpo", "scale_by_std": False, "policy_loss": "ppo_clip", "group_filter": "none"},
    "gspo": {"advantage": "grpo", "policy_loss": "gspo"},
    "rloo": {"advantage": "rloo"},
    "reinforce": {"advantage": "reinforce"},
    "reinforce_pp": {"advantage": "reinforce_pp"},
    "ppo": {"advantage": "gae", "policy_loss": "ppo_clip"},
}


def preset_mismatch(name: str, cfg: AlgorithmConfig) -> str:
    """Which of preset `name`'s defining axes `cfg` sets differently ('' when it is that preset)."""
    diff = [f"{axis} is {getattr(cfg, axis)!r} ({name} uses {want!r})"
            for axis, want in PRESETS[name].items() if getattr(cfg, axis) != want]
    return "; ".join(diff)


# ------------------------------------------------------------------------------------------ group filters

@_register(GROUP_FILTERS, "none")
def keep_all(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Every group is used. [B] -> [B / k]"""
    return torch.ones(len(rewards) // k, dtype=torch.bool)


@_register(GROUP_FILTERS, "nonzero_std", needs=("resample",))
def keep_informative(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """DAPO's dynamic sampling (Yu et al., 2025): drop groups whose K rewards are all equal. [B] -> [B / k]

    Under GRPO/RLOO/Dr.GRPO such a group has zero advantage on every token: it costs a forward/backward and only
    dilutes the token-mean. The controller keeps sampling until the batch is full of informative groups.
    """
    g = rewards.view(-1, k)  # rows are prompt-major: one group per row of this view
    return g.max(1).values != g.min(1).values


# ------------------------------------------------------------------------------------------ advantages

def group_stats(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std and size of the row's group. [B], [B] -> ([B], [B], [B])"""
    _, inv = group.unique(return_inverse=True)  # [B] dense group index
    n = torch.zeros(int(inv.max()) + 1).index_add_(0, inv, torch.ones_like(rewards))  # [G]
    s = torch.zeros_like(n).index_add_(0, inv, rewards)  # [G]
    mean = s / n  # [G]
    sq = torch.zeros_like(n).index_add_(0, inv, (rewards - mean[inv]) ** 2)  # [G]
    std = (sq / (n - 1).clamp(min=1)).sqrt()  # [G] unbiased, as torch.std
    return mean[inv], std[inv], n[inv]


def token_rewards(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """Per-token rewards [B, T]: the sequence reward on the last response token, minus beta*KL on every token when
    `kl_placement: reward` (KL of the rollout-time policy, batch.old_logp, to the reference)."""
    mask = batch.response_mask  # [B, T]
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # [B, T] the final counted token
    r = last.float() * batch.rewards[:, None]  # [B, T]
    if cfg.kl_placement == "reward" and cfg.kl_coef > 0:  # (ref_logp is also there when only logged)
        r = r - cfg.kl_coef * kl_estimate(cfg.kl_estimator, batch.old_logp, batch.ref_logp, cfg.kl_clamp) * mask
    return r


def sequence_returns(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """What sequence-level estimators score: the sum of token rewards [B] (= the reward when KL is in the loss)."""
    return token_rewards(batch, cfg).sum(-1)


@_register(ADVANTAGES, "grpo", needs=("group",))
def adv_grpo(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of completion i.

    GRPO: Shao et al., "DeepSeekMath" (2024). With `scale_by_std: false` this is Dr.GRPO's estimator
    (Liu et al., "Understanding R1-Zero-Like Training", 2025), which drops the std division.
    >>> r = [1, 0, 0, 1] in one group -> A = [0.866, -0.866, -0.866, 0.866] (std 0.577)
    """
    returns = sequence_returns(batch, cfg)  # [B]
    mean, std, _ = group_stats(returns, batch.group)  # [B]
    adv = returns - mean  # [B]
    if cfg.scale_by_std:
        adv = adv / (std + 1e-6)
    return adv[:, None] * batch.response_mask  # [B, T]


@_register(ADVANTAGES, "rloo", needs=("group",))
def adv_rloo(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j = K/(K-1) (r_i - mean(r_group)). Ahmadian et al., "Back to Basics" (2024)."""
    returns = sequence_returns(batch, cfg)  # [B]
    mean, _, n = group_stats(returns, batch.group)  # [B]
    adv = (returns - mean) * n / (n - 1).clamp(min=1)  # [B]
    return adv[:, None] * batch.response_mask  # [B, T]


@_register(ADVANTAGES, "reinforce")
def adv_reinforce(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """A_i = r_i - b, with b = 0 (`baseline: none`) or the mean reward of the whole batch (`batch_mean`).

    Williams, "Simple statistical gradient-following algorithms" (REINFORCE, 1992). The batch mean is taken over
    every process's rows (`batch.reduce_sum`), so the baseline does not depend on how the batch was split.
    """
    adv = sequence_returns(batch, cfg)  # [B]
    if cfg.baseline == "batch_mean":
        total, count = batch.reduce_sum(torch.stack([adv.sum(), torch.tensor(float(len(batch)))]))
        adv = adv - total / count
    return adv[:, None] * batch.response_mask  # [B, T]


@_register(ADVANTAGES, "reinforce_pp")
def adv_reinforce_pp(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """A_t = (G_t - mean G) / std G, G_t = sum_{s >= t} r_s over token rewards, normalised over every response token
    of the global batch. Hu, "REINFORCE++" (2025); pair it with `kl_placement: reward` (its KL is per token).
    """
    mask = batch.response_mask  # [B, T]
    G = token_rewards(batch, cfg).flip(-1).cumsum(-1).flip(-1) * mask  # [B, T] return-to-go
    total, count = batch.reduce_sum(torch.stack([(G * mask).sum(), mask.sum()]))
    mean = total / count
    (sq,) = batch.reduce_sum(torch.stack([((G - mean) ** 2 * mask).sum()]))
    return (G - mean) / ((sq / count).sqrt() + 1e-8) * mask  # [B, T]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. [B, T] x3 -> (advantages [B, T], returns [B, T]).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lam)^l delta_{t+l},  R_t = A_t + V_t (the critic's
    target). Schulman et al., "High-Dimensional Continuous Control Using GAE" (2015). Positions with mask 0 (padding,
    and tool output in agentic rollouts) are skipped: the recursion links each counted token to the next counted one,
    so the environment's tokens are a transition, not actions with values of their own.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B)  # A of the next counted token
    next_value = torch.zeros(B)  # V of the next counted token (0 after the last one: the episode ends)
    for t in reversed(range(T)):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * running
        adv[:, t] = torch.where(m, a, 0.0)
        running = torch.where(m, a, running)
        next_value = torch.where(m, values[:, t], next_value)
    return adv, (adv + values) * mask


@_register(ADVANTAGES, "gae", needs=("values",))
def adv_gae(batch: RolloutBatch, cfg: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lam) with the critic's values (PPO as in InstructGPT, 2022), whitened over the global batch, and
    the critic's regression targets R_t = A_t + V_t (un-whitened), from the one recursion. -> ([B, T], [B, T])

    Needs `batch.values`: it declares `values`, so the controller runs the critic.
    """
    mask = batch.response_mask  # [B, T]
    adv, returns = gae(token_rewards(batch, cfg), batch.values, mask, cfg.gamma, cfg.lam)  # [B, T] each
    total, count = batch.reduce_sum(torch.stack([(adv * mask).sum(), mask.sum()]))
    mean = total / count
    (sq,) = batch.reduce_sum(torch.stack([((adv - mean) ** 2 * mask).sum()]))
    return (adv - mean) / ((sq / count).sqrt() + 1e-8) * mask, returns  # [B, T], [B, T]


# ---------------------------------------------------------------------------------------- policy losses

@_register(POLICY_LOSSES, "pg")
def loss_pg(logp: torch.Tensor, x: LossInputs, cfg: AlgorithmConfig):
    """Vanilla policy gradient, -A * ratio with ratio = pi/pi_old (= -A log pi in gradient when on-policy).

    Williams, "Simple statistical gradient-following algorithms" (REINFORCE, 1992).
    """
    ratio = clamp_log_ratio(logp - x.old_logp, cfg).exp()  # [B, T]
    return -x.adv * ratio, {"actor/ratio": ratio.detach()}


def clamp_log_ratio(log_ratio: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """log(pi/pi_old) held to [-c, c] (`log_ratio_clamp`) so exp cannot overflow. [B, T] -> [B, T]"""
    c = cfg.log_ratio_clamp
    return log_ratio if c is None else log_ratio.clamp(-c, c)


def clipped_objective(log_ratio: torch.Tensor, adv: torch.Tensor, cfg: AlgorithmConfig):
    """-min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A), optionally dual-clipped; shared by PPO and GSPO.

    Returns the per-token loss [B, T] and its metrics (per-token indicators and values, [B, T] each).
    """
    log_ratio = clamp_log_ratio(log_ratio, cfg)  # [B, T]
    ratio = log_ratio.exp()  # [B, T]
    high = cfg.clip_eps_high if cfg.clip_eps_high is not None else cfg.clip_eps
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1 - cfg.clip_eps, 1 + high)  # [B, T]
    loss = torch.maximum(unclipped, clipped)  # [B, T] max of negatives = min of objectives
    with torch.no_grad():
        is_clipped = clipped > unclipped  # [B, T]
        metrics = {
            "actor/clipfrac_low": (is_clipped & (ratio < 1)).float(),
            "actor/clipfrac_high": (is_clipped & (ratio > 1)).float(),
            "actor/ratio": ratio.detach(),
            "actor/ppo_kl": log_ratio.exp() - 1 - log_ratio,  # k3 of pi_old vs pi, per token
        }
    if cfg.dual_clip is not None:
        capped = -adv * cfg.dual_clip  # [B, T] the loss bound c|A| for A < 0
        with torch.no_grad():
            metrics["actor/clipfrac_dual"] = ((adv < 0) & (loss > capped)).float()
        loss = torch.where(adv < 0, torch.minimum(loss, capped), loss)
    return loss, metrics


@_register(POLICY_LOSSES, "ppo_clip")
def loss_ppo_clip(logp: torch.Tensor, x: LossInputs, cfg: AlgorithmConfig):
    """Token-level clipped ratio pi/pi_old. Schulman et al., "Proximal Policy Optimization" (2017).

    With `clip_eps_high` this is DAPO's clip-higher (Yu et al., 2025); with `dual_clip`, Ye et al. (2020).
    Metrics: actor/clipfrac_low (ratio < 1-eps, A < 0 clipped), actor/clipfrac_high (ratio > 1+eps_high, A > 0).
    """
    return clipped_objective(logp - x.old_logp, x.adv, cfg)  # [B, T]


@_register(POLICY_LOSSES, "gspo")
def loss_gspo(logp: torch.Tensor, x: LossInputs, cfg: AlgorithmConfig):
    """Sequence-level ratio s_i = exp(mean_t(log pi - log pi_old)), clipped per sequence.

    Zheng et al., "Group Sequence Policy Optimization" (GSPO, 2025). Token form: s_i,t = sg[s_i] pi_t / sg[pi_t], so
    every token of a sequence shares one ratio value while its gradient still flows through its own log-prob.
    GSPO uses far smaller clip ranges than PPO (the paper: 3e-4 / 4e-4).
    """
    seq_log_ratio = ((logp - x.old_logp) * x.mask).sum(-1) / x.mask.sum(-1).clamp(min=1)  # [B]
    log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()  # [B, T] value s_i, gradient d log pi_t
    return clipped_objective(log_ratio, x.adv, cfg)


# ------------------------------------------------------------------------ behaviour-policy corrections
# An engine that samples with other weights than the trainer's (stale by k updates, another precision or kernel)
# draws from a behaviour policy mu, not from pi_prox, the trainer's policy before the update. Every entry maps
# log w = log pi_prox - log mu [B, T] (and the mask) to detached per-token weights [B, T] that multiply the policy
# loss; with mu = pi_prox every weight is exactly 1 and the loss is unchanged.


def _seq_log_weight(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the sequence weight prod_t w_t, broadcast to every token: [B, T] -> [B, T]"""
    return (log_w * mask).sum(-1, keepdim=True).expand_as(log_w)


@_register(IS_CORRECTIONS, "none")
def is_none(log_w: torch.Tensor, mask: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """No correction: the samples are treated as the proximal policy's own (biased when mu != pi_prox)."""
    return torch.ones_like(log_w)


@_register(IS_CORRECTIONS, "tis_token")
def is_tis_token(log_w: torch.Tensor, mask: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """Truncated IS per token, min(pi_prox/mu, C) (Ionides 2008; Yao et al. 2025 "Your efficient RL framework
    secretly brings you off-policy RL training"): bias traded for a bounded variance."""
    return log_w.clamp(max=math.log(cfg.is_cap)).exp()


@_register(IS_CORRECTIONS, "tis_seq")
def is_tis_seq(log_w: torch.Tensor, mask: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """Truncated IS per sequence, min(prod_t pi_prox/mu, C) on every token of the sequence (unbiased for a sequence
    reward up to the cap; its variance grows with length)."""
    return _seq_log_weight(log_w, mask).clamp(max=math.log(cfg.is_cap)).exp()


@_register(IS_CORRECTIONS, "mis_token")
def is_mis_token(log_w: torch.Tensor, mask: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """Masked IS per token: the weight pi_prox/mu where it is inside [low, high], else 0 (rejection: a token the two
    policies disagree on too much teaches nothing rather than something wrong)."""
    w = log_w.clamp(-20, 20).exp()
    return torch.where((w >= cfg.is_low) & (w <= cfg.is_high), w, torch.zeros_like(w))


@_register(IS_CORRECTIONS, "mis_seq")
def is_mis_seq(log_w: torch.Tensor, mask: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """Masked IS per sequence: token weights pi_prox/mu, and the whole sequence rejected (0) when its geometric-mean
    weight exp(mean_t log w) is outside [low, high] (a length-independent test, like verl's `geo_mask`)."""
    geo = ((log_w * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).exp()  # [B, 1]
    keep = ((geo >= cfg.is_low) & (geo <= cfg.is_high)).float()  # [B, 1]
    return log_w.clamp(-20, 20).exp() * keep


@_register(IS_CORRECTIONS, "decoupled")
def is_decoupled(log_w: torch.Tensor, mask: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    """Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"; AReaL, 2025): three
    policies. The clip keeps pi near the proximal pi_prox (the ratio of the policy loss), and the untruncated weight
    pi_prox/mu moves the expectation from the behaviour mu to pi_prox. (log w held to [-20, 20] so exp stays finite.)"""
    return log_w.clamp(-20, 20).exp()


def mismatch_stats(log_w: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token values whose masked means are the metrics: KL(mu || pi_prox) by k1 = log mu - log pi_prox and
    k3 = r - 1 - log r with r = pi_prox/mu (samples are mu's), the weights, their squares (ESS), the rejected share."""
    r_log = log_w.clamp(-20, 20)
    return {"mismatch/kl_k1": -log_w, "mismatch/kl_k3": r_log.exp() - 1 - r_log, "is/weight_mean": w,
            "is/weight_sq_mean": w * w, "is/masked_frac": (w == 0).float() * mask}


# ---------------------------------------------------------------------------------------- aggregation

@dataclass(frozen=True)
class AggNorm:
    """Global normalisers over the whole rollout batch (every micro-batch, every process)."""

    tokens: float  # response tokens counted by the loss
    seqs: float  # sequences
    max_len: float  # rollout.max_new_tokens (Dr.GRPO's constant)


@_register(LOSS_AGG, "token_mean")
def agg_token_mean(loss: torch.Tensor, mask: torch.Tensor, norm: AggNorm) -> torch.Tensor:
    """sum over all tokens / total tokens: every token weighs the same (DAPO, 2025)."""
    return (loss * mask).sum() / norm.tokens


@_register(LOSS_AGG, "seq_mean_token_mean")
def agg_seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, norm: AggNorm) -> torch.Tensor:
    """mean over sequences of each sequence's token mean (original GRPO; short answers weigh more per token)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.sum() / norm.seqs


@_register(LOSS_AGG, "seq_mean_token_sum")
def agg_seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor, norm: AggNorm) -> torch.Tensor:
    """mean over sequences of each sequence's token sum (the REINFORCE sequence log-likelihood)."""
    return (loss * mask).sum() / norm.seqs


@_register(LOSS_AGG, "seq_mean_token_sum_norm")
def agg_seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, norm: AggNorm) -> torch.Tensor:
    """sum over tokens / (sequences x max_len): Dr.GRPO's constant normaliser, no length bias (2025)."""
    return (loss * mask).sum() / (norm.seqs * norm.max_len)
