"""Advantages, policy losses, aggregation and KL on hand-computed batches."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.algorithm import ADVANTAGES, GROUP_FILTERS, KL_ESTIMATORS, LOSS_AGG, POLICY_LOSSES, AggNorm, gae
from rlcore.batch import LossInputs, RolloutBatch
from rlcore.config import AlgorithmConfig


def make_batch(rewards, group, lengths, T=3) -> RolloutBatch:
    B = len(rewards)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])  # [B, T]
    return RolloutBatch(
        input_ids=torch.zeros(B, 1 + T, dtype=torch.long), attention_mask=torch.ones(B, 1 + T, dtype=torch.long),
        response_mask=mask, group=torch.tensor(group), sampler_logp=torch.zeros(B, T),
        finished=torch.ones(B, dtype=torch.bool), prompt_len=1, rewards=torch.tensor(rewards, dtype=torch.float))


def test_grpo_advantages_hand_computed() -> None:
    b = make_batch([1, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], [3, 1, 2, 2, 1, 1, 1, 1])
    adv = ADVANTAGES["grpo"](b, AlgorithmConfig())
    s = 0.5 / math.sqrt(1 / 3)  # mean 0.5, unbiased std sqrt(1/3)
    expected_seq = torch.tensor([s, -s, -s, s, 0, 0, 0, 0])
    assert torch.allclose(adv[:, 0], expected_seq, atol=1e-5)
    assert torch.equal(adv == 0, b.response_mask == 0) or torch.all(adv[b.response_mask == 0] == 0)
    # Dr.GRPO: no std division
    adv_dr = ADVANTAGES["grpo"](b, AlgorithmConfig(scale_by_std=False))
    assert torch.allclose(adv_dr[:4, 0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_rloo_is_leave_one_out() -> None:
    b = make_batch([1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1])
    adv = ADVANTAGES["rloo"](b, AlgorithmConfig())[:, 0]
    assert torch.allclose(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert abs(float(adv.sum())) < 1e-6


def test_grpo_loss_and_gradient_hand_computed() -> None:
    """ratio = 1: per-token loss is -A; token_mean divides by all 8 response tokens."""
    b = make_batch([1, 0, 0, 1], [0, 0, 0, 0], [3, 1, 2, 2])
    cfg = AlgorithmConfig()
    adv = ADVANTAGES["grpo"](b, cfg)
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    per_tok, metrics = POLICY_LOSSES["ppo_clip"](logp, LossInputs(logp.detach(), adv, b.response_mask), cfg)
    norm = AggNorm(tokens=8, seqs=4, max_len=3)
    loss = LOSS_AGG["token_mean"](per_tok, b.response_mask, norm)
    s = 0.5 / math.sqrt(1 / 3)
    assert float(loss.detach()) == pytest.approx(-(3 * s - s - 2 * s + 2 * s) / 8, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -adv * b.response_mask / 8, atol=1e-6)
    assert float((metrics["actor/clipfrac_low"] + metrics["actor/clipfrac_high"]).sum()) == 0


def test_ppo_clip_clips_only_outside_the_trust_region() -> None:
    cfg = AlgorithmConfig(clip_eps=0.2)
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, m = POLICY_LOSSES["ppo_clip"](logp, LossInputs(old, adv, mask), cfg)
    assert torch.allclose(loss, torch.tensor([[-1.2, -1.1, 0.8, 0.9]]), atol=1e-6)
    assert m["actor/clipfrac_high"].tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert m["actor/clipfrac_low"].tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_kl_estimators_hand_computed() -> None:
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert float(KL_ESTIMATORS["k1"](logp, ref)) == pytest.approx(0.5)
    assert float(KL_ESTIMATORS["k2"](logp, ref)) == pytest.approx(0.125)
    assert float(KL_ESTIMATORS["k3"](logp, ref)) == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    x = torch.randn(1000) * 3
    assert bool((KL_ESTIMATORS["k3"](x, torch.randn(1000)) >= 0).all())


@pytest.mark.parametrize("agg", sorted(LOSS_AGG))
def test_aggregation_is_identical_with_1_and_4_micro_batches(agg: str) -> None:
    """The global normaliser: summing micro-batch losses equals the full-batch loss (not a mean of means)."""
    torch.manual_seed(0)
    per_tok = torch.randn(8, 5)
    lengths = [5, 1, 3, 2, 4, 5, 1, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    norm = AggNorm(tokens=float(mask.sum()), seqs=8, max_len=5)
    full = LOSS_AGG[agg](per_tok, mask, norm)
    parts = sum(LOSS_AGG[agg](per_tok[i : i + 2], mask[i : i + 2], norm) for i in range(0, 8, 2))
    assert float(full) == pytest.approx(float(parts), abs=1e-6)


def test_reinforce_baselines() -> None:
    b = make_batch([1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1])
    none = ADVANTAGES["reinforce"](b, AlgorithmConfig(advantage="reinforce", baseline="none"))[:, 0]
    mean = ADVANTAGES["reinforce"](b, AlgorithmConfig(advantage="reinforce", baseline="batch_mean"))[:, 0]
    assert none.tolist() == [1, 0, 0, 1, 1, 1]
    assert torch.allclose(mean, torch.tensor([1, 0, 0, 1, 1, 1]) - 4 / 6)


def test_reinforce_batch_mean_is_global_across_processes() -> None:
    """With two processes each holding half the batch, reduce_sum makes the baseline the global mean."""
    cfg = AlgorithmConfig(advantage="reinforce")
    full = make_batch([1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1])
    halves = [make_batch([1, 1], [0, 0], [1, 1]), make_batch([1, 0], [1, 1], [1, 1])]
    total = torch.stack([torch.tensor([2.0, 2.0]), torch.tensor([1.0, 2.0])]).sum(0)  # what an all-reduce returns
    for h in halves:
        h.reduce_sum = lambda t, total=total: total
    joined = torch.cat([ADVANTAGES["reinforce"](h, cfg) for h in halves])
    assert torch.allclose(joined, ADVANTAGES["reinforce"](full, cfg))


def test_clip_higher_is_asymmetric() -> None:
    """DAPO: with eps_low 0.2 and eps_high 0.28, a ratio of 1.25 with A > 0 is not clipped; 1.3 is."""
    cfg = AlgorithmConfig(clip_eps=0.2, clip_eps_high=0.28)
    logp = torch.log(torch.tensor([[1.25, 1.3, 0.75]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, m = POLICY_LOSSES["ppo_clip"](logp, LossInputs(torch.zeros(1, 3), adv, torch.ones(1, 3)), cfg)
    assert torch.allclose(loss, torch.tensor([[-1.25, -1.28, 0.8]]), atol=1e-6)
    assert m["actor/clipfrac_high"].tolist() == [[0.0, 1.0, 0.0]] and m["actor/clipfrac_low"].tolist() == [[0, 0, 1.0]]


def test_dual_clip_caps_negative_advantage_losses() -> None:
    cfg = AlgorithmConfig(dual_clip=3.0)
    logp = torch.log(torch.tensor([[10.0, 2.0, 10.0]]))  # ratios far above 1
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, m = POLICY_LOSSES["ppo_clip"](logp, LossInputs(torch.zeros(1, 3), adv, torch.ones(1, 3)), cfg)
    # A<0: max(10, 1.2*... ) = 10 -> capped at 3; ratio 2 -> loss 2 (< 3, kept); A>0: clipped at -1.2 as usual
    assert torch.allclose(loss, torch.tensor([[3.0, 2.0, -1.2]]), atol=1e-6)
    assert m["actor/clipfrac_dual"].tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", ["pg", "ppo_clip", "gspo"])
def test_ratio_one_gives_the_vanilla_policy_gradient(name: str) -> None:
    """At pi = pi_old every objective's gradient is -A d log pi (per token, before aggregation)."""
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.randn(3, 1).expand(3, 4).contiguous()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    loss, _ = POLICY_LOSSES[name](logp, LossInputs(logp.detach(), adv, mask), AlgorithmConfig())
    assert torch.allclose(loss.detach(), -adv)
    (loss * mask).sum().backward()
    assert torch.allclose(logp.grad, -adv * mask)


def test_gspo_shares_one_ratio_per_sequence() -> None:
    cfg = AlgorithmConfig(clip_eps=0.2)
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.3, -0.3, 0.6], [0.0, 0.0, 5.0]])  # row 2's third token is padding
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    _, m = POLICY_LOSSES["gspo"](logp, LossInputs(old, torch.ones(2, 3), mask), cfg)
    assert torch.allclose(m["actor/ratio"][0], torch.full((3,), math.exp(0.2)))  # exp(mean(0.3, -0.3, 0.6))
    assert torch.allclose(m["actor/ratio"][1, :2], torch.ones(2))  # padding does not enter the sequence ratio


def test_token_rewards_put_the_reward_last_and_kl_on_every_token() -> None:
    b = make_batch([1.0, 0.0], [0, 0], [2, 3])
    b.old_logp = torch.full((2, 3), -1.0)
    b.ref_logp = torch.full((2, 3), -1.5)
    from rlcore.algorithm import token_rewards

    in_loss = token_rewards(b, AlgorithmConfig(kl_placement="loss", kl_coef=0.1))
    assert in_loss.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    in_reward = token_rewards(b, AlgorithmConfig(kl_placement="reward", kl_coef=0.1, kl_estimator="k1"))
    assert torch.allclose(in_reward, torch.tensor([[-0.05, 0.95, 0.0], [-0.05, -0.05, -0.05]]))


def test_reinforce_pp_returns_to_go_are_batch_normalised() -> None:
    b = make_batch([1.0, 0.0], [0, 1], [2, 1])
    adv = ADVANTAGES["reinforce_pp"](b, AlgorithmConfig(advantage="reinforce_pp"))
    G = torch.tensor([1.0, 1.0, 0.0])  # returns-to-go of the 3 response tokens
    expected = (G - G.mean()) / (G.var(unbiased=False).sqrt() + 1e-8)
    assert torch.allclose(adv[b.response_mask.bool()], expected, atol=1e-6)
    assert float(adv[b.response_mask == 0].abs().sum()) == 0


def test_overlong_penalty_hand_computed() -> None:
    """L = 8, buffer 4: lengths 3, 4 free; 6 -> (4-6)/4 = -0.5; 8 with EOS -> -1; cut without EOS -> -1."""
    from rlcore.reward import overlong_penalty

    b = make_batch([1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [3, 4, 6, 8, 8], T=8)
    b.finished = torch.tensor([True, True, True, True, False])
    cfg = AlgorithmConfig(overlong_buffer=4, overlong_penalty=0.5)
    assert overlong_penalty(b, cfg, 8).tolist() == [0.0, 0.0, -0.25, -0.5, -0.5]
    assert overlong_penalty(b, AlgorithmConfig(), 8).tolist() == [0.0] * 5


def test_gae_hand_computed() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)  # lam = 1: Monte-Carlo return minus V
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5]])) and torch.allclose(ret, torch.ones(1, 3))
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.0)  # lam = 0: one-step TD error
    assert torch.allclose(adv, torch.tensor([[0.0, 0.0, 0.5]]))
    adv, _ = gae(r, v, m, gamma=0.5, lam=1.0)  # discounting: A_0 = 0.25 - 0.5
    assert torch.allclose(adv, torch.tensor([[-0.25, 0.0, 0.5]]))


def test_gae_skips_masked_tool_tokens() -> None:
    """A masked position (tool output) is a transition: its value never enters the recursion."""
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.2, 9.0, 0.6]])
    adv, _ = gae(r, v, torch.tensor([[1.0, 0.0, 1.0]]), gamma=1.0, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[0.4, 0.0, 0.4]]))  # t0 bootstraps from V(t2) = 0.6, not 9.0


def test_gae_estimator_is_whitened_and_returns_are_targets() -> None:
    b = make_batch([1, 0, 1, 0], [0, 0, 1, 1], [3, 2, 1, 3])
    b.values = torch.full((4, 3), 0.25)
    adv, ret = ADVANTAGES["gae"](b, AlgorithmConfig(lam=1.0))
    m = b.response_mask.bool()
    assert abs(float(adv[m].mean())) < 1e-5 and abs(float(adv[m].std(unbiased=False)) - 1) < 1e-4
    assert torch.allclose(ret[0], torch.ones(3)) and torch.allclose(ret[1, :2], torch.zeros(2))


def test_value_loss_clipping_hand_computed() -> None:
    from rlcore.critic import value_loss

    v, old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    loss, metrics = value_loss(v, old, ret, clip=0.2)
    assert torch.allclose(loss, torch.tensor([[0.32]])) and metrics["critic/clipfrac"].item() == 1.0  # (0.2-1)^2/2
    loss, _ = value_loss(v, old, ret, clip=None)
    assert loss.item() == 0.0


def test_explained_variance() -> None:
    from rlcore.critic import explained_variance

    b = make_batch([1, 0], [0, 0], [3, 3])
    b.returns = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    b.values = b.returns.clone()
    assert abs(explained_variance(b) - 1.0) < 1e-6
    b.values = torch.full((2, 3), 0.5)
    assert abs(explained_variance(b)) < 1e-6  # a constant explains nothing


def test_group_filters() -> None:
    rewards = torch.tensor([1.0, 1, 0, 1, 0, 0, 0.5, 0])
    assert GROUP_FILTERS["nonzero_std"](rewards, 2).tolist() == [False, True, False, True]
    assert GROUP_FILTERS["none"](rewards, 2).tolist() == [True] * 4


def test_cat_repads_prompts_and_responses() -> None:
    """Batches of different prompt/response widths concatenate without changing any token's log-prob."""
    from rlcore.batch import Problem
    from rlcore.config import ModelConfig, TinyModelConfig
    from rlcore.model import char_tokenizer, tiny_model
    from rlcore.rollout import RolloutEngine, Sampling, token_logprobs

    torch.manual_seed(0)
    tok = char_tokenizer()
    model = tiny_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64)), tok)
    e = RolloutEngine(model, tok, seed=0)
    a = e.generate([Problem("1+2=", "3")] * 2, 2, Sampling(3, temperature=3.0))
    b = e.generate([Problem("123+456=", "579")], 2, Sampling(6, temperature=3.0), group_offset=2)
    c = RolloutBatch.cat([a, b], tok.pad_token_id)
    assert len(c) == 6 and c.prompt_len == b.prompt_len and c.group.tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        lc, la, lb = (token_logprobs(model, x)[0] for x in (c, a, b))
    ta = a.response_mask.shape[1]
    assert torch.allclose(lc[:4, :ta] * a.response_mask, la * a.response_mask, atol=1e-5)
    assert torch.allclose(lc[4:] * b.response_mask, lb * b.response_mask, atol=1e-5)
    assert c.completions == a.completions + b.completions and (c.response_mask[:4, ta:] == 0).all()


def test_group_properties_rloo_sums_to_zero_and_equal_rewards_give_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(32, generator=gen) < 0.5).float().tolist()
    b = make_batch(rewards, [i // 8 for i in range(32)], [2] * 32)
    rloo = ADVANTAGES["rloo"](b, AlgorithmConfig())[:, 0].view(4, 8)
    assert torch.allclose(rloo.sum(1), torch.zeros(4), atol=1e-6)  # RLOO advantages sum to 0 in every group
    same = make_batch([1.0] * 8 + [0.0] * 8, [0] * 8 + [1] * 8, [2] * 16)
    for cfg in (AlgorithmConfig(advantage="grpo"), AlgorithmConfig(advantage="rloo"),
                AlgorithmConfig(advantage="grpo", scale_by_std=False)):  # GRPO, RLOO, Dr.GRPO
        assert torch.equal(ADVANTAGES[cfg.advantage](same, cfg), torch.zeros(16, 3))


def test_k3_gradient_matches_the_formula() -> None:
    """d k3 / d log pi = 1 - pi_ref / pi (from k3 = r - 1 - log r, r = pi_ref / pi); k3 >= 0 everywhere."""
    gen = torch.Generator().manual_seed(1)
    logp = (torch.randn(500, generator=gen) * 2).requires_grad_(True)
    ref = torch.randn(500, generator=gen) * 2
    k3 = KL_ESTIMATORS["k3"](logp, ref)
    k3.sum().backward()
    assert bool((k3 >= 0).all())
    assert torch.allclose(logp.grad, 1 - (ref - logp.detach()).exp(), rtol=1e-5, atol=1e-6)


def test_phases_come_from_what_the_axes_declare() -> None:
    from rlcore.algorithm import requirements

    grpo = requirements(AlgorithmConfig())
    assert (grpo.reference, grpo.old_logp, grpo.values, grpo.resample, grpo.group) == (True, False, False, False, True)
    ppo = requirements(AlgorithmConfig(advantage="gae", kl_placement="reward", name="ppo"))
    assert ppo.values and ppo.old_logp and not ppo.group  # the critic, and KL from the rollout-time log-probs
    assert requirements(AlgorithmConfig(ppo_epochs=2)).old_logp  # a reused batch needs the policy it came from
    assert not requirements(AlgorithmConfig(kl_coef=0, kl_placement="reward")).old_logp  # no anchor, no need
    dapo = requirements(AlgorithmConfig(group_filter="nonzero_std", kl_coef=0))
    assert dapo.resample and not dapo.reference
