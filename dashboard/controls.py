"""Lesson controls: small widgets that recompute a lesson's illustration live with the same rlcore functions the
trainer uses, so the lesson and the code cannot disagree. One entry per lesson id; each renders itself."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st
import torch

from rlcore.algorithm import ADVANTAGES, GROUP_FILTERS, KL_ESTIMATORS, LOSS_AGG, POLICY_LOSSES, AggNorm
from rlcore.batch import LossInputs, RolloutBatch
from rlcore.config import AlgorithmConfig

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
            loss, metrics = POLICY_LOSSES["ppo_clip"](logp, LossInputs(torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1)), cfg)
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


@control("01")
def bandit() -> None:
    """A 3-armed softmax policy trained by REINFORCE: rlcore's batch-mean advantage and its `pg` loss."""
    lr = st.slider("Step size", 0.05, 2.0, 0.5, 0.05, key="c01_lr")
    steps = st.slider("Updates", 0, 100, 20, key="c01_steps")
    pay = torch.tensor([0.2, 0.5, 0.8])  # success probability of each arm
    logits = torch.zeros(3, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        probs = logits.softmax(-1)
        arms = torch.multinomial(probs.detach(), 16, replacement=True, generator=gen)  # [16] sampled actions
        rewards = (torch.rand(16, generator=gen) < pay[arms]).float()
        adv = ADVANTAGES["reinforce"](batch_of(rewards.tolist(), 16, T=1), AlgorithmConfig())  # [16, 1]
        logp = probs.log()[arms][:, None]  # [16, 1]
        loss, _ = POLICY_LOSSES["pg"](logp, LossInputs(logp.detach(), adv, torch.ones(16, 1)), AlgorithmConfig())
        logits.grad = None
        loss.mean().backward()
        with torch.no_grad():
            logits -= lr * logits.grad
        history.append(float(rewards.mean()))
    probs = logits.detach().softmax(-1)
    st.dataframe(pd.DataFrame({"arm": ["20 %", "50 %", "80 %"], "pi(arm)": probs.tolist()}).round(3),
                 hide_index=True, key="c01_table")
    if history:
        st.line_chart(pd.Series(history, name="batch reward"), height=150)


@control("05")
def loss_assembly() -> None:
    """The per-token loss, column by column, from rlcore's PPO loss and KL estimator."""
    eps = st.slider("clip epsilon", 0.05, 0.5, 0.2, 0.05, key="c05_eps")
    beta = st.slider("beta (KL coefficient)", 0.0, 0.5, 0.04, 0.01, key="c05_beta")
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.2, -0.3, -2.0, 0.0]])
    new = torch.tensor([[-0.9, -0.35, -2.6, 0.0]])
    ref = torch.tensor([[-1.0, -0.4, -1.8, 0.0]])
    adv = torch.tensor([[0.8, 0.8, 0.8, 0.0]])
    cfg = AlgorithmConfig(clip_eps=eps, kl_coef=beta)
    pg, m = POLICY_LOSSES["ppo_clip"](new, LossInputs(old, adv, mask), cfg)
    kl = KL_ESTIMATORS["k3"](new, ref)
    total = (pg + beta * kl) * mask
    st.dataframe(pd.DataFrame({"mask": mask[0], "old logp": old[0], "ref logp": ref[0], "new logp": new[0],
                               "A": adv[0], "ratio": m["actor/ratio"][0], "PG term": pg[0], "KL (k3)": kl[0],
                               "loss": total[0]}).round(4), hide_index=True, key="c05_table")
    st.caption(f"token-mean loss = {float(total.sum() / mask.sum()):.4f}; the masked 4th token contributes 0")


@control("06")
def stale_policy() -> None:
    """Clip fraction when pi_old lags the policy by n updates, under the drift model of rlcore.topology (each update
    moves a token's log-prob by a heavy-tailed delta, in the same direction every time: n updates move it n delta)."""
    from rlcore.topology import stale_log_ratios

    interval = st.slider("Sync every n updates", 1, 16, 1, key="c06_n")
    delta = st.slider("Per-update log-prob move (scale of its heavy-tailed law)", 0.001, 0.1, 0.01, 0.001,
                      format="%.3f", key="c06_d")
    gen = torch.Generator().manual_seed(1)
    log_ratio = stale_log_ratios(interval, delta)  # [4096, 1] log pi - log pi_old after n updates
    adv = torch.where(torch.rand(4096, 1, generator=gen) < 0.5, 1.0, -1.0)
    _, m = POLICY_LOSSES["ppo_clip"](log_ratio, LossInputs(torch.zeros_like(log_ratio), adv, torch.ones_like(adv)), AlgorithmConfig())
    frac = float((m["actor/clipfrac_low"] + m["actor/clipfrac_high"]).mean())
    eps = AlgorithmConfig().clip_eps
    outside = float(((log_ratio.exp() < 1 - eps) | (log_ratio.exp() > 1 + eps)).float().mean())
    st.metric("Outside the clip range", f"{outside:.1%}")
    st.metric("Clipped tokens", f"{frac:.1%}")
    st.caption("A token outside the range is clipped only when its advantage pushes it further out (about half of "
               "them). Above ~30 % clipped, the update is mostly clipped: pi_old is too stale (lesson 28's canary). "
               "The law's tail (rlcore.topology.STALE_TAIL = 1.30) is fitted on lesson 22c's runs.")


@control("07")
def step_through() -> None:
    """One step, phase by phase: which fields of the RolloutBatch each role fills."""
    from rlcore.timing import PHASES

    fills = {"rollout": "input_ids, attention_mask, response_mask, group, sampler_logp, finished, completions",
             "reward": "rewards (+ shaping)", "reference": "ref_logp (skipped when beta = 0)",
             "old_logprob": "old_logp (when the batch is reused or KL is in the reward)",
             "values": "values (only with a critic: advantage gae)", "advantage": "adv (+ returns for the critic)",
             "update": "(the weights) via the policy loss over micro-batches",
             "sync": "(the rollout engine's copy of the weights, when separate)"}
    phase = st.select_slider("Phase", list(PHASES), value=PHASES[0], key="c07_phase")
    done = PHASES[: PHASES.index(phase) + 1]
    st.dataframe(pd.DataFrame({"phase": list(PHASES), "fills": [fills[p] for p in PHASES],
                               "done": [p in done for p in PHASES]}), hide_index=True, key="c07_table")


@control("08")
def token_strip() -> None:
    """A tool-use completion as tokens: which ones the loss sees (the tool's output is masked out)."""
    from rlcore.tools import Calculator

    masked = st.toggle("Mask the tool's tokens (as rlcore does)", value=True, key="c08_mask")
    call, out, answer = Calculator().trace("12+345=", "357")
    rows = [(c, "model") for c in call] + [(c, "tool") for c in out] + [(c, "model") for c in answer + "⏎"]
    st.dataframe(pd.DataFrame({"token": [t for t, _ in rows], "from": [w for _, w in rows],
                               "in loss/KL/entropy": [w == "model" or not masked for _, w in rows]}).T,
                 key="c08_table")
    n = sum(1 for _, w in rows if w == "model" or not masked)
    st.caption(f"{n} of {len(rows)} tokens trained on" + ("" if masked else
               " — unmasked, the policy would be trained to *predict the calculator*, not to call it"))


@control("09")
def reinforce_noise() -> None:
    """Spread of the REINFORCE gradient estimate for a 2-armed bandit, with and without the batch-mean baseline."""
    k = st.slider("Samples per estimate (K)", 2, 64, 8, key="c09_k")
    p = torch.tensor([0.5, 0.5])  # the policy
    pay = torch.tensor([0.9, 0.7])  # rewards are high for both arms: the no-baseline case pushes both up
    gen = torch.Generator().manual_seed(0)
    rows = []
    for baseline in ("none", "batch_mean"):
        grads = []
        for _ in range(400):
            arms = torch.multinomial(p, k, replacement=True, generator=gen)
            r = (torch.rand(k, generator=gen) < pay[arms]).float()
            adv = ADVANTAGES["reinforce"](batch_of(r.tolist(), k, T=1), AlgorithmConfig(baseline=baseline))[:, 0]
            score = torch.where(arms == 0, 1 - p[0], -p[0])  # d log pi(arm) / d logit_0
            grads.append(float((adv * score).mean()))
        g = torch.tensor(grads)
        rows.append({"baseline": baseline, "mean gradient": float(g.mean()), "std of the estimate": float(g.std())})
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True, key="c09_table")
    st.caption(f"True gradient: 0.5 x 0.5 x (0.9 - 0.7) = 0.05. The batch mean includes each sample's own reward, so "
               f"its estimate shrinks by (K-1)/K = {(k - 1) / k:.3f}, to {0.05 * (k - 1) / k:.4f} on average (a "
               "leave-one-out mean, RLOO's, would not shrink it); in exchange its spread is far smaller.")


@control("13")
def dapo_fixes() -> None:
    """DAPO's four fixes as config keys; dynamic sampling's effect on the share of informative groups."""
    clip_higher = st.toggle("clip-higher (eps_high 0.28)", True, key="c13_clip")
    dynamic = st.toggle("dynamic sampling", True, key="c13_dyn")
    token_level = st.toggle("token-level loss", True, key="c13_tok")
    overlong = st.toggle("overlong shaping", True, key="c13_long")
    cfg = AlgorithmConfig(clip_eps_high=0.28 if clip_higher else None,
                          group_filter="nonzero_std" if dynamic else "none",
                          loss_agg="token_mean" if token_level else "seq_mean_token_mean",
                          overlong_buffer=2 if overlong else 0)
    diff = {k: v for k, v in cfg.model_dump().items() if v != AlgorithmConfig().model_dump()[k]}
    st.code("\n".join(f"algorithm.{k}: {v}" for k, v in diff.items()) or "(the GRPO defaults)", language="yaml")
    p, k = 0.55, 8
    zero = p**k + (1 - p) ** k
    keep = GROUP_FILTERS[cfg.group_filter](torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    st.metric("Informative groups in the update", "100 %" if dynamic else f"{1 - zero:.1%}",
              help=f"at accuracy {p} and K={k}; filter on a toy batch keeps {keep.tolist()}")


@control("15")
def bradley_terry() -> None:
    """The Bradley-Terry loss of one pair at a reward margin, and the margin a reward model can reach under label noise."""
    from rlcore.pairwise import PAIR_LOSSES

    margin = st.slider("r(chosen) - r(rejected)", -4.0, 4.0, 0.5, 0.1, key="c15_margin")
    noise = st.slider("Label noise (share of pairs flipped)", 0.0, 0.45, 0.1, 0.05, key="c15_noise")
    m = torch.tensor([margin], requires_grad=True)
    loss, _ = PAIR_LOSSES["sigmoid"](m, torch.zeros(1), 1.0)
    loss.sum().backward()
    # With a share `noise` of labels flipped, the expected loss (1-e) * l(m) + e * l(-m) is lowest at
    # m* = log((1-e)/e): the model cannot be more sure than its annotators.
    best = float(torch.log(torch.tensor((1 - noise) / noise))) if noise > 0 else float("inf")
    st.dataframe(pd.DataFrame([{"P(chosen preferred) = sigma(m)": float(torch.sigmoid(m.detach())[0]),
                                "loss -log sigma(m)": float(loss.detach()[0]), "d loss / d m": float(m.grad[0]),
                                "best margin under this noise": best}]).round(3), hide_index=True, key="c15_table")
    st.caption(f"The ceiling of held-out pair accuracy against these labels is 1 - noise = {1 - noise:.0%}; a margin "
               "beyond log((1-e)/e) only costs loss on the flipped pairs. rlcore.pairwise.sigmoid at beta = 1.")


@control("16")
def dpo_vs_ipo() -> None:
    """DPO's and IPO's loss and gradient against the implicit reward gap h = s_chosen - s_rejected."""
    from rlcore.pairwise import PAIR_LOSSES

    beta = st.slider("beta", 0.05, 1.0, 0.1, 0.05, key="c16_beta")
    gap = st.slider("Log-ratio gap h = s(chosen) - s(rejected), nats", -10.0, 20.0, 2.0, 0.5, key="c16_gap")
    rows = []
    for name in ("sigmoid", "ipo"):
        h = torch.tensor([gap], requires_grad=True)
        loss, metrics = PAIR_LOSSES[name](h, torch.zeros(1), beta)
        loss.sum().backward()
        rows.append({"loss": "DPO (sigmoid)" if name == "sigmoid" else "IPO", "value": float(loss.detach()[0]),
                     "d loss / d h": float(h.grad[0]), "implicit reward margin": float(metrics["rewards/margins"])})
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True, key="c16_table")
    grid = torch.linspace(-10, 20, 61)
    curve = pd.DataFrame({"h": grid.tolist(), "DPO": PAIR_LOSSES["sigmoid"](grid, torch.zeros(61), beta)[0].tolist(),
                          "IPO": PAIR_LOSSES["ipo"](grid, torch.zeros(61), beta)[0].clamp(max=5).tolist()})
    st.line_chart(curve, x="h", y=["DPO", "IPO"], height=180)
    st.caption(f"DPO's gradient never reaches 0: it keeps widening the gap. IPO's loss is lowest at h = 1/(2 beta) = "
               f"{1 / (2 * beta):.1f} nats and pulls back beyond it (rlcore.pairwise.sigmoid, rlcore.pairwise.ipo).")


@control("17")
def search_budget() -> None:
    """Best-of-N with an oracle, with a reward model that prefers some wrong answers (decoys), and one sample."""
    from rlcore.search import best_of_n_accuracy

    p = st.slider("Per-sample accuracy p (T = 1)", 0.05, 0.95, 0.55, 0.05, key="c17_p")
    decoy = st.slider("Decoy rate: share of wrong answers the RM ranks above right ones", 0.0, 0.5, 0.1, 0.01,
                      key="c17_q")
    ns = [1, 2, 4, 8, 16, 32, 64]
    rows = [{"N": n, **best_of_n_accuracy(p, decoy, n)} for n in ns]
    df = pd.DataFrame(rows)
    st.dataframe(df.round(3), hide_index=True, key="c17_table")
    st.line_chart(df, x="N", y=["oracle", "best_of_n", "sample"], height=180)
    peak = max(rows, key=lambda r: r["best_of_n"])
    st.caption(f"Best-of-N peaks at N = {peak['N']} ({peak['best_of_n']:.3f}) and falls after: each extra sample is "
               "another chance to draw a decoy. rlcore.search.best_of_n_accuracy; the measured table is on the page.")


@control("18")
def leaky_group() -> None:
    """One GRPO group under the timeout-counts-as-pass verifier: the exploit earns a right answer's advantage."""
    from rlcore.reward import timeout_pass
    from rlcore.tasks import AdditionTask

    k = 8
    cut = st.slider("Samples that run to the length cap (no EOS)", 0, k, 1, key="c18_cut")
    right = st.slider("Finished samples that are right", 0, k, 4, key="c18_right")
    right = min(right, k - cut)
    answer = "579"
    samples = ([("57957957", False)] * cut + [(answer, True)] * right + [("578", True)] * (k - cut - right))
    leaky = [timeout_pass(t, answer, extracted=t, finished=f) for t, f in samples]
    true = [AdditionTask.verify(t, answer, finished=f) for t, f in samples]
    adv = ADVANTAGES["grpo"](batch_of(leaky, k), AlgorithmConfig())[:, 0]
    st.dataframe(pd.DataFrame({"completion": [t + ("" if f else " …(cut)") for t, f in samples],
                               "leaky reward": leaky, "true reward": true, "GRPO advantage": adv.tolist()}).round(3),
                 hide_index=True, key="c18_table")
    st.caption(f"training reward {sum(leaky) / k:.3f} vs true {sum(true) / k:.3f}: the cut-off sample gets the "
               "advantage of a right answer, so every update makes not stopping more likely "
               "(rlcore.reward.timeout_pass, rlcore.algorithm.adv_grpo).")


@control("18a")
def signal_density_control() -> None:
    """Policy strength, curation band and K -> prompts kept and rollouts wasted on zero-variance groups."""
    from rlcore.tasks import dapo_whole_rounds, signal_density

    strength = st.slider("Policy strength (logit of the pass rate on the middle bucket)", -4.0, 6.0, 1.0, 0.5,
                         key="c18a_strength")
    k = st.slider("K samples per prompt", 2, 16, 8, key="c18a_k")
    high = st.slider("Curation: skip buckets passing at least", 0.5, 1.0, 0.9, 0.05, key="c18a_high")
    batch = st.slider("Prompts per step (DAPO rolls out whole batches of them per round)", 4, 64, 32, 4,
                      key="c18a_batch")
    difficulty = torch.linspace(-3, 3, 7)  # seven buckets, easy to hard
    rates = torch.sigmoid(strength - difficulty).tolist()
    d = signal_density(rates, k, 0.05, high, 0.1)
    rounds = dapo_whole_rounds(d["none_wasted"], batch, AlgorithmConfig().max_sample_rounds)
    st.dataframe(pd.DataFrame([
        {"stream": "raw (GRPO)", "prompts kept": 1.0, "rollouts wasted": d["none_wasted"], "rounds": 1.0},
        {"stream": "curated", "prompts kept": d["curation_kept"], "rollouts wasted": d["curation_wasted"],
         "rounds": 1.0},
        {"stream": "DAPO filter, ideal (one group at a time)", "prompts kept": 1.0,
         "rollouts wasted": d["none_wasted"], "rounds": d["dapo_rollouts_per_group"]},
        {"stream": "DAPO filter, whole-batch rounds (rlcore)", "prompts kept": 1.0,
         "rollouts wasted": rounds["wasted"], "rounds": rounds["rounds"]},
    ]).round(3), hide_index=True, key="c18a_table")
    st.caption("bucket pass rates " + ", ".join(f"{r:.2f}" for r in rates) + ". Ideally DAPO would roll out "
               f"{d['dapo_rollouts_per_group']:.2f} groups per informative group and waste only the degenerate "
               "ones; drawing a whole batch per extra round, as rlcore (and DAPO's own code) does, throws away the "
               "surplus of the last round too (rlcore.tasks.signal_density, dapo_whole_rounds).")


@control("24")
def canaries() -> None:
    """The infra engineer's canaries on a simulated batch: a sampler whose log-probs differ from the trainer's by a
    drift (staleness) and a noise (precision), read as rlcore reads them (mismatch KL, IS weights, ESS, rejections)."""
    from rlcore.algorithm import IS_CORRECTIONS, mismatch_stats
    from rlcore.topology import mismatch_log_weights

    moved = st.slider("Share of tokens the missed updates moved (a stale sampler)", 0.0, 1.0, 0.1, 0.01,
                      key="c24_moved")
    size = st.slider("How far they moved: spread of log pi_prox - log mu on those tokens", 0.0, 2.0, 0.5, 0.01,
                     key="c24_size")
    noise = st.slider("Spread of the gap on every token (a lower-precision sampler)", 0.0, 1.0, 0.05, 0.01,
                      key="c24_noise")
    log_w = mismatch_log_weights(moved, size, noise)  # [B, T] log pi_prox - log mu at mu's own samples
    mask = torch.ones(256, 8)
    cfg = AlgorithmConfig()
    rows = []
    for name in ("none", "tis_token", "tis_seq", "mis_token", "mis_seq", "decoupled"):
        w = IS_CORRECTIONS[name](log_w, mask, cfg)
        s = {k: float(v.mean()) for k, v in mismatch_stats(log_w, w, mask).items()}
        rows.append({"correction": name, "weight mean": s["is/weight_mean"], "weight max": float(w.max()),
                     "ESS": s["is/weight_mean"] ** 2 / s["is/weight_sq_mean"], "rejected": s["is/masked_frac"]})
    s = mismatch_stats(log_w, torch.ones_like(log_w), mask)
    c1, c2 = st.columns(2)
    c1.metric("mismatch KL (k3), nats per token", f"{float(s['mismatch/kl_k3'].mean()):.4f}")
    c2.metric("mismatch KL (k1)", f"{float(s['mismatch/kl_k1'].mean()):.4f}")
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True, key="c24_table")
    st.caption("Healthy: k3 below ~1e-3, ESS near 1, nothing rejected. The weights are ratios of two distributions "
               "at the sampler's own tokens, so uncorrected they average exactly 1 (rlcore.topology."
               "mismatch_log_weights); rlcore.algorithm.IS_CORRECTIONS and mismatch_stats on 256 x 8 simulated "
               "tokens, the same functions the trainer runs.")


@control("19")
def topology() -> None:
    """Rollout, train and sync seconds per step -> step time, steps per hour and each role's idle share in the three
    places an engine can run (rlcore.topology.step_time, the model bench/topology.py checks against real runs)."""
    from rlcore.topology import step_time

    # defaults: this lab's separate runs (lesson 19), each role on one thread
    roll = st.slider("Rollout: seconds to sample one step's batch", 0.05, 10.0, 0.20, 0.05, key="c19_roll")
    train = st.slider("Train: seconds of reference, log-probs and update", 0.05, 10.0, 0.50, 0.05, key="c19_train")
    sync = st.slider("Sync: seconds to push the weights", 0.0, 5.0, 0.03, 0.01, key="c19_sync")
    rows = []
    for mode in ("colocated", "separate", "async"):
        t = step_time(mode, roll, train, sync)
        rows.append({"mode": mode, "s/step": t.step_s, "steps/hour": t.steps_per_hour,
                     "trainer idle": t.trainer_idle, "engine idle": t.engine_idle})
    st.dataframe(pd.DataFrame(rows).round(3), hide_index=True, key="c19_table")
    st.caption("Colocated and separate run the roles one after the other (sum); async overlaps them (max), so it "
               "pays most when rollout and train take about equally long. Separate needs twice the weights' memory "
               "and pays the push; what it buys is an engine you can scale and tune apart from the trainer.")


@control("22c")
def pipelining() -> None:
    """max_staleness and the roles' times -> step time and idle shares; the clip fraction at one update of staleness
    -> the share of tokens a PPO clip on pi/mu cuts at k (rlcore.topology.step_time, stale_clip_fraction)."""
    from rlcore.topology import stale_clip_fraction, stale_mismatch_kl, step_time

    roll = st.slider("Rollout seconds per step", 0.05, 10.0, 0.20, 0.05, key="c22c_roll")
    train = st.slider("Train + sync seconds per step", 0.05, 10.0, 0.40, 0.05, key="c22c_train")
    c1 = st.slider("Clip fraction of a ratio against a sampler one update stale", 0.0, 0.2, 0.008, 0.001,
                   format="%.3f", key="c22c_c1")
    kl1 = st.slider("Mismatch KL one update stale", 0.0, 0.05, 0.0022, 0.0001, format="%.4f", key="c22c_kl1")
    rows = []
    for k in range(4):
        t = step_time("async", roll, train, staleness=k)
        rows.append({"max_staleness": k, "s/step": t.step_s, "steps/hour": t.steps_per_hour,
                     "trainer idle": t.trainer_idle, "engine idle": t.engine_idle,
                     "clip fraction": stale_clip_fraction(c1, k), "mismatch KL": stale_mismatch_kl(kl1, k)})
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True, key="c22c_table")
    st.caption("The first update of staleness buys all the overlap in this model; more only hides uneven rollouts "
               "(a long tail) and costs clipped tokens, c1 k^1.30 under the drift model (rlcore.topology; measured: "
               "0.0080, 0.0197 and 0.0313 at one, two and three updates; the model, fitted on the first two, said "
               "0.0336 for three) and mismatch KL, about KL1 k^2 (measured 0.0022, 0.0078, 0.0155).")
