"""The claims lessons make about gradients and optimizers, checked by computation (issue 17's first must-show)."""

from __future__ import annotations

import torch

from rlcore.algorithm import kl_k1, kl_k2, kl_k3


def _expected_grad(estimator, logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """E_{y ~ pi_theta}[grad_theta k(y)] with y treated as a fixed sample (how a loss term sees it), by enumerating
    every token y of a small softmax and weighting by pi_theta(y) (the weights carry no gradient)."""
    theta = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)  # [V]
    per_token = estimator(logp, ref_logp)  # [V] the estimator's value at each possible sampled token
    (logp.exp().detach() * per_token).sum().backward()
    return theta.grad


def _grad(f, logits: torch.Tensor) -> torch.Tensor:
    theta = logits.clone().requires_grad_(True)
    f(torch.log_softmax(theta, -1)).backward()
    return theta.grad


def test_kl_estimators_as_loss_terms_have_these_gradients() -> None:
    """Lesson 03: as loss terms, k1's expected gradient is zero; k2's is the gradient of the reverse KL, KL(pi || pi_ref)
    (the learned policy first: mode-seeking, the KL RLHF's objective names); k3's is the gradient of the forward KL,
    KL(pi_ref || pi) (mass-covering), although k3's *value* estimates the reverse one."""
    gen = torch.Generator().manual_seed(0)
    logits, ref_logp = torch.randn(6, generator=gen), torch.log_softmax(torch.randn(6, generator=gen), -1)
    ref = ref_logp.exp()

    g1 = _expected_grad(kl_k1, logits, ref_logp)
    g2 = _expected_grad(kl_k2, logits, ref_logp)
    g3 = _expected_grad(kl_k3, logits, ref_logp)
    reverse = _grad(lambda lp: (lp.exp() * (lp - ref_logp)).sum(), logits)  # grad KL(pi || pi_ref)
    forward = _grad(lambda lp: (ref * (ref_logp - lp)).sum(), logits)  # grad KL(pi_ref || pi)
    assert torch.allclose(g1, torch.zeros(6), atol=1e-7)
    assert torch.allclose(g2, reverse, atol=1e-6)
    assert torch.allclose(g3, forward, atol=1e-6)
    assert not torch.allclose(forward, reverse, atol=1e-3)  # the two directions really differ here


def test_k3_values_estimate_the_reverse_kl() -> None:
    """Lesson 03: E_{y ~ pi}[k3(y)] = KL(pi || pi_ref) exactly (and k1's too): the value is the reverse KL."""
    gen = torch.Generator().manual_seed(1)
    logp, ref_logp = (torch.log_softmax(torch.randn(7, generator=gen), -1) for _ in range(2))
    reverse = float((logp.exp() * (logp - ref_logp)).sum())
    forward = float((ref_logp.exp() * (ref_logp - logp)).sum())
    assert abs(float((logp.exp() * kl_k3(logp, ref_logp)).sum()) - reverse) < 1e-6
    assert abs(float((logp.exp() * kl_k1(logp, ref_logp)).sum()) - reverse) < 1e-6
    assert abs(reverse - forward) > 1e-2


def test_kl_clamp_holds_k3_only_as_verl_does() -> None:
    """`algorithm.kl_clamp` clamps k3 (verl's low_var_kl clamps only it); k1 and k2 keep their value on tokens that
    drifted far, so the anchor still pulls hardest there (clamping k2 too gave a token mean of 0.543 where the
    unclamped value is several nats)."""
    from rlcore.algorithm import kl_estimate

    logp = torch.tensor([[-9.0, -0.1, -2.0, -0.5]])  # [1, 4] one token far below the reference, one far above
    ref = torch.tensor([[-0.2, -6.0, -2.1, -0.5]])
    d = logp - ref
    assert torch.equal(kl_estimate("k1", logp, ref, 10.0), d)
    assert torch.equal(kl_estimate("k2", logp, ref, 1.0), 0.5 * d ** 2)  # 38.7 and 17.4 nats: not held to 1
    k3 = kl_estimate("k3", logp, ref, 10.0)
    assert float(k3.max()) == 10.0 and float(k3[0, 1]) < 10.0  # e^8.8 - 1 - 8.8 held to 10


def test_adam_ignores_a_constant_gradient_scale() -> None:
    """Lessons 04, 05, 12: multiplying every gradient by a constant (GRPO's std scaling, were it constant) leaves
    Adam's steps unchanged up to eps: m / sqrt(v) is scale-free. What std scaling changes is how groups are weighted
    *against each other*, since each group has its own std."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen) for _ in range(10)]
    out = []
    for scale in (1.0, 2.0, 7.0):
        p = torch.nn.Parameter(torch.zeros(5))
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0)
        for g in grads:
            p.grad = g * scale
            opt.step()
        out.append(p.detach().clone())
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[0], out[2], atol=1e-6)


def test_scaling_the_advantages_moves_the_step_once_a_kl_term_or_gradient_clipping_is_in_the_loss() -> None:
    """Lessons 04, 12, 14: Adam cancels a constant scale on the *whole* gradient only. The loss is pg * s + beta * KL
    and the gradient is clipped to norm 1 first: scaling the advantages by s changes the PG:KL balance, and a norm
    above 1 (GRPO's 1.94 and 1.69) is clipped while a small one (Dr.GRPO's 0.28) is not."""
    gen = torch.Generator().manual_seed(0)
    pg_dirs = [torch.randn(5, generator=gen) for _ in range(10)]  # the policy-gradient part of each step's gradient
    target = torch.randn(5, generator=gen)  # where the KL term pulls (the reference)

    def train(scale: float, beta: float, clip: float | None) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(5))
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0)
        for d in pg_dirs:
            opt.zero_grad()
            loss = scale * (d * p).sum() + beta * 0.5 * ((p - target) ** 2).sum()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
        return p.detach().clone()

    assert torch.allclose(train(1.0, 0.0, None), train(0.25, 0.0, None), atol=1e-6)  # Adam alone: scale-free
    assert not torch.allclose(train(1.0, 0.5, None), train(0.25, 0.5, None), atol=1e-3)  # + KL: the balance moves
    # clipping alone: norms above 1 are divided by their own size, a factor that differs step to step, so Adam no
    # longer sees one constant scale (all norms below 1 would leave it scale-free again)
    assert not torch.allclose(train(1.0, 0.0, 1.0), train(0.1, 0.0, 1.0), atol=1e-3)
    assert torch.allclose(train(0.1, 0.0, 1.0), train(0.05, 0.0, 1.0), atol=1e-5)
    assert not torch.allclose(train(1.0, 0.5, 1.0), train(0.25, 0.5, 1.0), atol=1e-3)


def test_dropping_the_critic_saves_about_half_of_the_trainable_state() -> None:
    """Lesson 11: PPO trains a policy and a critic of the same size (the critic is a copy of the trunk plus a scalar
    head); each has weights, gradients and two AdamW moments (4 copies). GRPO keeps the policy's 4 copies and the
    frozen reference's 1, PPO both models' 4 plus the reference: 5 vs 9 model-sized tensors, about 56 %."""
    n = 1.0  # one model's parameters
    grpo = 4 * n + 1 * n  # policy: weights, grads, Adam m, v; + frozen reference weights
    ppo = grpo + 4 * n  # + critic: weights, grads, Adam m, v
    assert round(grpo / ppo, 2) == 0.56


def _control(lesson_id: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_string(f"from dashboard.controls import CONTROLS\nCONTROLS[{lesson_id!r}]()\n",
                             default_timeout=60).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_control_04_gives_zeros_for_an_all_right_group_under_every_estimator() -> None:
    """Lesson 04's 'Try': `1, 1, 1, 1` gives zeros everywhere in the control (the group is the whole batch)."""
    at = _control("04")
    at.text_input[0].set_value("1, 1, 1, 1").run()
    table = at.dataframe[0].value
    assert (table.drop(columns="reward").abs().to_numpy() < 1e-6).all()


def test_control_06_separates_outside_the_range_from_clipped() -> None:
    """Lesson 06's 'Try': from interval 1 to 8, 2.1 % -> 19.9 % of tokens outside the clip range, 1.2 % -> 10.1 % clipped."""
    at = _control("06")
    shown = {m.label: m.value for m in at.metric}
    assert shown == {"Outside the clip range": "2.1%", "Clipped tokens": "1.2%"}
    at.slider(key="c06_n").set_value(8).run()
    shown = {m.label: m.value for m in at.metric}
    assert shown == {"Outside the clip range": "19.9%", "Clipped tokens": "10.1%"}


def test_control_09_says_the_batch_mean_shrinks_the_estimate() -> None:
    """Lesson 09: with the sample's own reward in the batch mean, the mean gradient is (K-1)/K of the true one."""
    at = _control("09")
    table = at.dataframe[0].value.set_index("baseline")
    shrunk = table.loc["batch_mean", "mean gradient"]
    assert abs(shrunk - 0.05 * 7 / 8) < 0.004 and "(K-1)/K = 0.875" in at.caption[0].value


def test_best_of_n_closed_form_matches_a_simulation() -> None:
    """Lesson 17's control: the closed form of best-of-N with decoys agrees with drawing samples and ranking them."""
    from rlcore.search import best_of_n_accuracy

    g = torch.Generator().manual_seed(0)
    p, q, trials = 0.55, 0.1, 200_000
    for n in (1, 4, 16):
        u = torch.rand(trials, n, generator=g)
        right = u < p
        decoy = ~right & (torch.rand(trials, n, generator=g) < q)
        score = torch.where(decoy, 2.0, torch.where(right, 1.0, 0.0)) + 1e-3 * torch.rand(trials, n, generator=g)
        picked_right = right.gather(1, score.argmax(1, keepdim=True)).float().mean()
        want = best_of_n_accuracy(p, q, n)
        assert abs(float(picked_right) - want["best_of_n"]) < 0.005, n
        assert abs(float(right.any(1).float().mean()) - want["oracle"]) < 0.005
    curve = [best_of_n_accuracy(p, q, n)["best_of_n"] for n in (1, 2, 4, 8, 16, 64)]
    assert max(curve) > curve[0] and curve[-1] < curve[0]  # it rises, peaks, then falls below one sample
    assert best_of_n_accuracy(p, 0.0, 16)["best_of_n"] == best_of_n_accuracy(p, 0.0, 16)["oracle"]


def test_signal_density_matches_a_simulated_stream() -> None:
    """Lesson 18a's control: the wasted share of rollouts with and without the pass-rate band, against a simulation."""
    from rlcore.tasks import signal_density

    rates, k = [0.02, 0.3, 0.6, 0.97], 8
    d = signal_density(rates, k, 0.05, 0.95, 0.1)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    bucket = torch.randint(0, 4, (n,), generator=g)
    p = torch.tensor(rates)[bucket]
    passes = (torch.rand(n, k, generator=g) < p[:, None]).sum(1)
    zero = (passes == 0) | (passes == k)
    assert abs(float(zero.float().mean()) - d["none_wasted"]) < 0.005
    keep = (bucket == 1) | (bucket == 2) | (torch.rand(n, generator=g) < 0.1)
    assert abs(float(keep.float().mean()) - d["curation_kept"]) < 0.005
    assert abs(float(zero[keep].float().mean()) - d["curation_wasted"]) < 0.005
    assert d["curation_wasted"] < d["none_wasted"]


def test_kl_to_the_reference_is_measured_at_beta_0_without_changing_the_run(lab) -> None:
    """Lesson 15: `logging.kl_to_reference` logs the KL to the initial policy at beta = 0 (Gao et al.'s x axis) and
    changes nothing else: rewards and losses equal the run without it to the bit."""
    from mlflow.tracking import MlflowClient

    from rlcore.controller import run
    from rlcore.loading import load_experiment

    curves = {}
    for flag in ("false", "true"):
        cfg = load_experiment(lab / "rl.yaml", ["algorithm.kl_coef=0", f"logging.kl_to_reference={flag}",
                                                f"logging.experiment=kl-measured-{flag}"])
        res = run(cfg, root=lab)
        c = MlflowClient(res.tracking_uri)
        curves[flag] = {k: [m.value for m in c.get_metric_history(res.run_id, k)]
                        for k in ("reward/mean", "actor/pg_loss", "kl/k3_mean", "kl/k3_seq", "timing/reference")}
    assert curves["false"]["kl/k3_seq"] == [] and curves["false"]["kl/k3_mean"] == []
    assert curves["true"]["reward/mean"] == curves["false"]["reward/mean"]
    assert curves["true"]["actor/pg_loss"] == curves["false"]["actor/pg_loss"]
    seq, tok = curves["true"]["kl/k3_seq"], curves["true"]["kl/k3_mean"]
    assert len(seq) == 3 and seq[0] < 1e-6 < seq[-1]  # 0 at the first step (policy = reference), then it drifts
    assert all(s >= t for s, t in zip(seq, tok, strict=True))  # a sequence's sum over >= 1 token is at least the token mean
    assert curves["true"]["timing/reference"][-1] > 0 == curves["false"]["timing/reference"][-1]


def test_simulated_mismatch_weights_are_ratios_of_two_distributions() -> None:
    """Lesson 24's control: at the sampler's own tokens, w = pi_prox / mu averages 1, so KL(mu || pi_prox) >= 0 by
    either estimator and ESS <= 1, for every setting (its drift slider gave mean weights of 1.35 and a negative k1)."""
    from rlcore.algorithm import mismatch_stats
    from rlcore.topology import mismatch_log_weights

    for moved in (0.0, 0.1, 1.0):
        for size in (0.0, 0.5, 2.0):
            for noise in (0.0, 0.05, 1.0):
                log_w = mismatch_log_weights(moved, size, noise)
                w = log_w.exp()
                s = {k: float(v.mean()) for k, v in mismatch_stats(log_w, w, torch.ones_like(w)).items()}
                assert abs(s["is/weight_mean"] - 1) < 1e-5, (moved, size, noise, s)
                assert s["mismatch/kl_k1"] >= -1e-6 and s["mismatch/kl_k3"] >= 0
                assert s["is/weight_mean"] ** 2 / s["is/weight_sq_mean"] <= 1 + 1e-6
    assert float(mismatch_log_weights(0.0, 1.0, 0.0).abs().max()) < 1e-6  # nothing moved: no gap at all
    # the simulated KL grows with both causes (about moved * size^2 / 2 + noise^2 / 2 for small spreads)
    kl = [float((-mismatch_log_weights(m, 0.5, 0.05)).mean()) for m in (0.1, 0.3, 0.9)]
    assert kl == sorted(kl) and abs(kl[0] - (0.1 * 0.125 + 0.00125)) < 0.004, kl


def test_control_24_shows_weights_that_average_one_at_its_extremes() -> None:
    at = _control("24")
    for moved, size, noise in ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (0.3, 0.5, 0.0)):
        at.slider(key="c24_moved").set_value(moved)
        at.slider(key="c24_size").set_value(size)
        at.slider(key="c24_noise").set_value(noise).run()
        table = at.dataframe[0].value.set_index("correction")
        assert abs(table.loc["none", "weight mean"] - 1) < 1e-3 and (table["ESS"] <= 1 + 1e-4).all(), table
        shown = {m.label: float(m.value) for m in at.metric}
        assert min(shown.values()) >= 0, shown


def test_dapo_whole_batch_rounds_explain_lesson_18a_waste() -> None:
    """Lesson 18a: DAPO's filter wasted 49.6 % of rollouts in 1.98 rounds where the ideal 1 / (1 - z) filter would
    waste z = 10.5 %: each extra round is a whole batch of 32 prompts. The model from the raw run's z reproduces both."""
    from rlcore.tasks import dapo_whole_rounds, signal_density

    d = dapo_whole_rounds(0.105, 32, 3)
    assert abs(d["rounds"] - 1.98) < 0.05 and abs(d["wasted"] - 0.496) < 0.02, d
    assert dapo_whole_rounds(0.0, 32, 3) == {"rounds": 1.0, "wasted": 0.0, "short": 0.0}
    ideal = signal_density([0.5], 8, 0.05, 0.95, 0.1)  # z = 2 / 256
    assert dapo_whole_rounds(ideal["none_wasted"], 1, 50)["wasted"] < 2 * ideal["none_wasted"]  # one prompt a round


def test_lesson_17_closed_form_cannot_fit_both_n_with_one_decoy_rate() -> None:
    """Lesson 17: the control's best-of-N closed form, at the sampled accuracy of the table (0.555), needs a decoy
    rate of about 0.23 for the outcome model's 0.641 at N = 4 and about 0.13 for its 0.393 at N = 16; no single rate
    comes within 5 points of both."""
    from rlcore.search import best_of_n_accuracy

    def at(q: float, n: int) -> float:
        return best_of_n_accuracy(0.555, q, n)["best_of_n"]

    qs = [i / 1000 for i in range(1001)]
    q4 = min(qs, key=lambda q: abs(at(q, 4) - 0.641))
    q16 = min(qs, key=lambda q: abs(at(q, 16) - 0.393))
    assert abs(q4 - 0.226) < 0.005 and abs(q16 - 0.127) < 0.005, (q4, q16)
    worst = min(max(abs(at(q, 4) - 0.641), abs(at(q, 16) - 0.393)) for q in qs)
    assert worst > 0.05, worst
