"""Lesson controls: small widgets that recompute a lesson's illustration live with the same rlcore functions the
trainer uses, so the lesson and the code cannot disagree. One entry per lesson id; each renders itself."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st
import torch

from rlcore.algorithm import ADVANTAGES, LOSS_AGG, POLICY_LOSSES, AggNorm
from rlcore.config import AlgorithmConfig
from rlcore.reference import KL_ESTIMATORS
from rlcore.rollout import RolloutBatch

CONTROLS: dict[str, Callable[[], None]] = {}


def control(lesson: str):
    def deco(fn: Callable[[], None]) -> Callable[[], None]:
        CONTROLS[lesson] = fn
        return fn

    return deco


def batch_of(rewards: list[float], k: int, lengths: list[int] | None = None, T: int = 4) -> RolloutBatch:
    """A RolloutBatch carrying only what the advantage estimators read: rewards, groups, masks."""
    B = len(rewards)
    lengths = lengths or [1] * B
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    return RolloutBatch(input_ids=torch.zeros(B, 1 + T, dtype=torch.long),
                        attention_mask=torch.ones(B, 1 + T, dtype=torch.long), response_mask=mask,
                        group=torch.arange(B) // k, sampler_logp=torch.zeros(B, T),
                        finished=torch.ones(B, dtype=torch.bool), prompt_len=1,
                        rewards=torch.tensor(rewards, dtype=torch.float))


@control("02")
def degenerate_groups() -> None:
    """K samples at accuracy p: how often is a group all-equal (zero advantage, wasted)?"""
    k = st.slider("K samples per prompt", 2, 16, 8, key="c02_k")
    p = st.slider("Policy accuracy on the prompt", 0.0, 1.0, 0.55, 0.05, key="c02_p")
    zero_var = p**k + (1 - p) ** k
    st.metric("P(group has zero reward variance)", f"{zero_var:.1%}")
    st.caption("p^K + (1-p)^K: all right or all wrong. GRPO/RLOO give such a group 0 advantage on every token.")


@control("03")
def kl_estimators() -> None:
    """k1, k2, k3 for a token where the policy moved away from the reference."""
    log_ratio = st.slider("log pi_theta - log pi_ref at the sampled token", -3.0, 3.0, 0.5, 0.1, key="c03_lr")
    logp, ref = torch.tensor([log_ratio]), torch.tensor([0.0])
    rows = [{"estimator": name, "value": float(fn(logp, ref)[0])} for name, fn in KL_ESTIMATORS.items()]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="c03_table")
    st.caption("rlcore.reference.KL_ESTIMATORS: k1 can be negative per token; k2 and k3 never are.")


@control("04")
def estimators_side_by_side() -> None:
    """One group of K rewards under every advantage estimator of the registry."""
    text = st.text_input("Rewards of one group (comma-separated)", "1, 0, 0, 1, 1, 0, 0, 0", key="c04_r")
    try:
        rewards = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        st.error("rewards must be numbers")
        return
    if len(rewards) < 2:
        st.error("need at least 2 rewards")
        return
    cfg = AlgorithmConfig()
    table = {"reward": rewards}
    for name in ("grpo", "rloo", "reinforce", "reinforce_pp"):
        table[name] = ADVANTAGES[name](batch_of(rewards, len(rewards)), cfg)[:, 0].tolist()
    table["drgrpo"] = ADVANTAGES["grpo"](batch_of(rewards, len(rewards)), AlgorithmConfig(scale_by_std=False))[:, 0].tolist()
    st.dataframe(pd.DataFrame(table).round(3), hide_index=True, key="c04_table")


@control("10")
def clip_table() -> None:
    """Which branch of PPO's clipped objective is active, from rlcore's own loss and its gradient."""
    eps = st.slider("clip epsilon", 0.05, 0.5, 0.2, 0.05, key="c10_eps")
    cfg = AlgorithmConfig(clip_eps=eps)
    rows = []
    for adv in (1.0, -1.0):
        for ratio in (1 - 2 * eps, 1.0, 1 + 2 * eps):
            logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
            loss, metrics = POLICY_LOSSES["ppo_clip"](logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), cfg)
            loss.sum().backward()
            clipped = metrics["actor/clipfrac_low"].item() + metrics["actor/clipfrac_high"].item() > 0
            rows.append({"A": adv, "ratio": round(ratio, 3), "loss": round(loss.item(), 4),
                         "gradient flows": not clipped and logp.grad.abs().item() > 0})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="c10_table")


@control("11")
def grpo_group() -> None:
    """Group rewards -> mean, std, GRPO advantages (rlcore.algorithm.adv_grpo)."""
    k = st.slider("K", 2, 8, 4, key="c11_k")
    right = st.slider("How many of the K are right", 0, k, min(1, k), key="c11_right")
    rewards = [1.0] * right + [0.0] * (k - right)
    adv = ADVANTAGES["grpo"](batch_of(rewards, k), AlgorithmConfig())[:, 0]
    st.dataframe(pd.DataFrame({"reward": rewards, "advantage": adv.tolist()}).round(3), hide_index=True, key="c11_table")
    t = torch.tensor(rewards)
    st.caption(f"mean {t.mean():.3f}, std {t.std():.3f}" + (" — degenerate group: every advantage is 0"
                                                              if right in (0, k) else ""))


@control("12")
def rloo_vs_grpo() -> None:
    k = st.slider("K", 2, 16, 4, key="c12_k")
    right = st.slider("Right answers in the group", 0, k, 1, key="c12_right")
    rewards = [1.0] * right + [0.0] * (k - right)
    b = batch_of(rewards, k)
    st.dataframe(pd.DataFrame({"reward": rewards,
                               "GRPO": ADVANTAGES["grpo"](b, AlgorithmConfig())[:, 0].tolist(),
                               "RLOO": ADVANTAGES["rloo"](b, AlgorithmConfig())[:, 0].tolist()}).round(3),
                 hide_index=True, key="c12_table")
    st.caption(f"RLOO = K/(K-1) x (r - mean) = {k / (k - 1):.3f} x (r - mean)")


@control("14")
def aggregation_weights() -> None:
    """Per-token gradient weight of a short and a long answer under each loss aggregation."""
    short = st.slider("Short answer tokens", 1, 16, 2, key="c14_s")
    long = st.slider("Long answer tokens", 1, 32, 12, key="c14_l")
    T = max(short, long)
    mask = torch.tensor([[1.0] * short + [0.0] * (T - short), [1.0] * long + [0.0] * (T - long)])
    norm = AggNorm(tokens=float(mask.sum()), seqs=2.0, max_len=float(T))
    rows = []
    for name, agg in LOSS_AGG.items():
        per_token = torch.ones_like(mask, requires_grad=True)
        agg(per_token, mask, norm).backward()
        rows.append({"aggregation": name, "short: weight per token": per_token.grad[0, 0].item(),
                     "long: weight per token": per_token.grad[1, 0].item()})
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True, key="c14_table")
