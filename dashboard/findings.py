"""Bottleneck and health findings: explicit rules over a run's logged metrics, each naming the lesson that explains it.

A rule sees the run's params (flattened config) and a frame of its per-step metrics; it returns a finding or None.
Thresholds are constants here, stated in each message, so a reader can check the arithmetic on the page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from rlcore.timing import PHASES


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "warn" or "info"
    message: str
    lesson: str


def phase_shares(steps: pd.DataFrame) -> pd.Series:
    """Share of the total step time spent in each phase, plus 'other' (step minus the phases); empty without
    step timings."""
    total = steps["timing/step"].sum() if "timing/step" in steps else 0.0
    shares = {p: steps.get(f"timing/{p}", pd.Series(dtype=float)).sum() / total for p in PHASES} if total else {}
    if shares:
        shares["other"] = max(0.0, 1 - sum(shares.values()))
    return pd.Series(shares, dtype=float)


Rule = Callable[[dict, pd.DataFrame], "Finding | None"]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _col(steps: pd.DataFrame, key: str) -> pd.Series:
    return steps[key].dropna() if key in steps else pd.Series(dtype=float)


@rule
def rollout_bound(params: dict, steps: pd.DataFrame) -> Finding | None:
    share = phase_shares(steps).get("rollout", 0.0)
    if share >= 0.5:
        return Finding("rollout_bound", "warn", f"Rollout is {share:.0%} of the step (>= 50 %): generation dominates. "
                       "Larger batches per forward, a faster engine (KV cache, continuous batching) or shorter "
                       "max_new_tokens buy the most here.", "28")
    return None


@rule
def reference_removable(params: dict, steps: pd.DataFrame) -> Finding | None:
    beta = float(params.get("algorithm.kl_coef", 0) or 0)
    kl = _col(steps, "kl/mean")
    if beta > 0 and len(kl) and kl.abs().mean() < 1e-3:
        ref = phase_shares(steps).get("reference", 0.0)
        return Finding("reference_removable", "info", f"beta = {beta:g} but the KL stays below 1e-3 nats "
                       f"(mean {kl.abs().mean():.2e}): the anchor does almost nothing while the reference forward "
                       f"costs {ref:.0%} of the step. Try algorithm.kl_coef=0 (drops the reference model).", "03")
    return None


@rule
def zero_variance_groups(params: dict, steps: pd.DataFrame) -> Finding | None:
    z = _col(steps, "reward/zero_var_group_frac")
    if len(z) and z.mean() >= 0.4:
        return Finding("zero_variance_groups", "warn", f"{z.mean():.0%} of groups have zero reward variance "
                       "(>= 40 %): their advantages are 0, so those samples are wasted compute. DAPO's dynamic "
                       "sampling (algorithm.group_filter=nonzero_std) or a larger K fixes it.", "13")
    return None


@rule
def length_cap(params: dict, steps: pd.DataFrame) -> Finding | None:
    c = _col(steps, "response/clip_ratio")
    if len(c) and c.tail(max(1, len(c) // 4)).mean() >= 0.2:
        return Finding("length_cap", "warn", f"{c.tail(max(1, len(c) // 4)).mean():.0%} of recent completions hit "
                       "rollout.max_new_tokens without EOS (>= 20 %): answers are cut, rewards truncated. Raise the "
                       "cap or add the overlong penalty.", "22b")
    return None


@rule
def entropy_collapse(params: dict, steps: pd.DataFrame) -> Finding | None:
    e = _col(steps, "actor/entropy")
    if len(e) >= 4 and e.iloc[0] > 0 and e.tail(max(1, len(e) // 4)).mean() < 0.2 * e.iloc[0]:
        return Finding("entropy_collapse", "warn", f"Entropy fell from {e.iloc[0]:.3f} to "
                       f"{e.tail(max(1, len(e) // 4)).mean():.3f} nats (< 20 % of its start): the policy stops "
                       "exploring. Clip-higher (algorithm.clip_eps_high=0.28) or a lower lr.", "13")
    return None


@rule
def kl_blowup(params: dict, steps: pd.DataFrame) -> Finding | None:
    kl = _col(steps, "kl/mean")
    if len(kl) >= 4:
        base = kl.iloc[: max(2, len(kl) // 2)].median()
        last = kl.iloc[-1]
        if last > 1.0 or (base > 0 and last > 10 * base and last > 0.01):
            return Finding("kl_blowup", "warn", f"KL to the reference jumped to {last:.3g} nats (early median "
                           f"{base:.3g}): the policy is leaving the anchor fast. Lower lr or raise beta.", "03")
    return None


@rule
def logging_overhead(params: dict, steps: pd.DataFrame) -> Finding | None:
    other = phase_shares(steps).get("other", 0.0)
    if other >= 0.15:
        return Finding("logging_overhead", "info", f"{other:.0%} of the step is outside every phase (>= 15 %): "
                       "metrics, logging and bookkeeping. Log less often or batch it.", "07")
    return None


@rule
def clipped_too_much(params: dict, steps: pd.DataFrame) -> Finding | None:
    hi, lo = _col(steps, "actor/clipfrac_high"), _col(steps, "actor/clipfrac_low")
    if len(hi) and len(lo) and (hi + lo).mean() > 0.3:
        return Finding("clipped_too_much", "warn", f"{(hi + lo).mean():.0%} of tokens are clipped (> 30 %): "
                       "pi_old is stale or the sampler and trainer disagree.", "10")
    return None


def diagnose(params: dict, steps: pd.DataFrame) -> list[Finding]:
    """All findings for one run. `steps`: one row per step, one column per metric."""
    return [f for r in RULES if (f := r(params, steps)) is not None]
