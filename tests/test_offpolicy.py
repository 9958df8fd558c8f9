"""Behaviour-policy corrections (issue 21, lesson 24): hand-computed truncated and masked IS, every weight exactly 1
when the engine samples from the trainer's policy, and an on-policy run whose corrected loss equals the uncorrected."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlcore.algorithm import IS_CORRECTIONS, mismatch_stats
from rlcore.config import AlgorithmConfig
from rlcore.loading import load_experiment
from rlcore.tracking import tracking_settings

CFG = AlgorithmConfig(is_cap=2.0, is_low=0.5, is_high=2.0)


def weights(name: str, w: list[list[float]], mask: list[list[float]] | None = None) -> list[float]:
    """The correction's weights for these per-token ratios pi_prox/mu, flattened row by row."""
    log_w = torch.tensor(w).log()
    m = torch.ones_like(log_w) if mask is None else torch.tensor(mask)
    return IS_CORRECTIONS[name](log_w * m, m, CFG).flatten().tolist()


def test_no_gap_means_every_weight_is_exactly_one() -> None:
    log_w = torch.zeros(3, 5)  # mu = pi_prox
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4])
    for name, fn in IS_CORRECTIONS.items():
        w = fn(log_w, mask, CFG)
        assert torch.equal(w, torch.ones_like(w)), name  # so the corrected loss is the uncorrected one, bit for bit
    stats = mismatch_stats(log_w, torch.ones_like(log_w), mask)
    assert float(stats["mismatch/kl_k1"].abs().sum()) == 0 and float(stats["mismatch/kl_k3"].sum()) == 0


def test_truncated_is_by_hand() -> None:
    assert weights("tis_token", [[0.5, 3.0]]) == pytest.approx([0.5, 2.0])  # min(w, C = 2)
    assert weights("tis_seq", [[0.5, 3.0]]) == pytest.approx([1.5, 1.5])  # min(0.5 * 3, 2) on every token
    assert weights("tis_seq", [[3.0, 3.0]]) == pytest.approx([2.0, 2.0])  # 9, capped
    # a padded token does not enter the sequence product
    assert weights("tis_seq", [[0.5, 3.0]], [[1.0, 0.0]]) == pytest.approx([0.5, 0.5])
    assert weights("decoupled", [[0.5, 3.0]]) == pytest.approx([0.5, 3.0])  # untruncated


def test_masked_is_by_hand() -> None:
    assert weights("mis_token", [[0.4, 1.0, 2.5]]) == pytest.approx([0.0, 1.0, 0.0])  # outside [0.5, 2]: rejected
    # sequence test on the geometric mean: sqrt(0.25 * 4) = 1 is kept, sqrt(4 * 4) = 4 is not
    assert weights("mis_seq", [[0.25, 4.0], [4.0, 4.0]]) == pytest.approx([0.25, 4.0, 0.0, 0.0])
    w = torch.tensor([[0.0, 1.0, 0.0]])
    stats = mismatch_stats(torch.tensor([[0.4, 1.0, 2.5]]).log(), w, torch.ones(1, 3))
    assert float(stats["is/masked_frac"].mean()) == pytest.approx(2 / 3)
    k1 = stats["mismatch/kl_k1"]  # log mu - log pi_prox = -log w
    assert k1.flatten().tolist() == pytest.approx([-math.log(0.4), 0.0, -math.log(2.5)])
    assert (stats["mismatch/kl_k3"] >= 0).all()


def test_an_unknown_correction_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown 'tis', valid: decoupled, mis_seq, mis_token, none, tis_seq, tis_token"):
        AlgorithmConfig(behaviour_correction="tis")


def test_on_policy_the_corrected_run_matches_the_uncorrected(lab: Path) -> None:
    """The engine samples with the trainer's own weights: the only gap is float rounding between the sampler's
    incremental forward and the trainer's full one, so every weight is 1 to ~1e-6 and the losses agree."""
    from rlcore.controller import run

    base = ["trainer.steps=3", "logging.eval_every=3", "logging.num_samples=0", "logging.experiment=test-is"]
    plain = run(load_experiment(lab / "rl.yaml", base), root=lab)
    tis = run(load_experiment(lab / "rl.yaml", [*base, "algorithm.behaviour_correction=tis_token"]), root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])

    def h(run_id: str, key: str) -> list[float]:
        return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]

    assert "is/ess" not in c.get_run(plain.run_id).data.metrics  # nothing logged without a correction
    assert all(abs(w - 1) < 1e-4 for w in h(tis.run_id, "is/weight_max"))
    assert all(e > 1 - 1e-6 for e in h(tis.run_id, "is/ess"))
    assert all(abs(k) < 1e-6 for k in h(tis.run_id, "mismatch/kl_k3"))
    assert h(tis.run_id, "actor/loss") == pytest.approx(h(plain.run_id, "actor/loss"), rel=1e-4, abs=1e-6)
    assert h(tis.run_id, "reward/mean") == h(plain.run_id, "reward/mean")


def _hist(lab: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def test_simulated_staleness_samples_with_old_weights_and_resumes_exactly(lab: Path) -> None:
    """`rollout.staleness: 2`: step 1 samples with the start weights (as on-policy), step 2 with them again (lag 1),
    from step 3 on with the weights of two updates ago (lag 2); the gap shows in the mismatch metrics; a run stopped
    at step 4 and resumed from its checkpoint continues with the same engine history, bit for bit."""
    from rlcore import checkpoint
    from rlcore.controller import run

    base = ["trainer.steps=6", "logging.eval_every=2", "logging.num_samples=0", "trainer.checkpoint_every=2",
            "logging.experiment=test-stale", "algorithm.behaviour_correction=tis_token"]
    on = run(load_experiment(lab / "rl.yaml", base), root=lab)
    stale_cfg = load_experiment(lab / "rl.yaml", [*base, "rollout.staleness=2"])
    whole = run(stale_cfg, root=lab)
    assert [v for _, v in _hist(lab, whole.run_id, "rollout/staleness")] == [0, 1, 2, 2, 2, 2]
    assert not _hist(lab, on.run_id, "rollout/staleness")  # an on-policy run logs no staleness
    r_on, r_st = _hist(lab, on.run_id, "reward/mean"), _hist(lab, whole.run_id, "reward/mean")
    assert r_on[0] == r_st[0] and r_on[2:] != r_st[2:]  # the same first batch; then other weights sample
    kl = [v for _, v in _hist(lab, whole.run_id, "mismatch/kl_k3")]
    assert kl[0] < 1e-6 and min(kl[2:]) > 10 * max(kl[0], 1e-9)  # on-policy at step 1, a real gap once stale

    stopped = run(stale_cfg, root=lab, on_eval=lambda step, _m: step >= 4)
    assert stopped.steps_done == 4
    ckpt = next(p for p, rid in checkpoint.candidates(lab / "outputs", stale_cfg.config_hash()) if rid == stopped.run_id)
    assert ckpt.stem.endswith("4")
    resumed = run(stale_cfg, root=lab, resume=ckpt)
    assert resumed.run_id == stopped.run_id and [s for s, _ in _hist(lab, resumed.run_id, "reward/mean")][-2:] == [5, 6]
    for key in ("reward/mean", "actor/loss", "mismatch/kl_k3", "is/weight_mean", "rollout/staleness"):
        assert _hist(lab, resumed.run_id, key)[-2:] == _hist(lab, whole.run_id, key)[-2:], key


def test_a_bfloat16_sampler_is_off_policy_from_the_first_step(lab: Path) -> None:
    """`rollout.dtype: bfloat16`: the engine's copy samples in bfloat16 while the trainer computes in float32, so the
    behaviour policy differs from the proximal one before any update (lesson 24's mismatch), and the weights show it."""
    from rlcore.controller import run

    base = ["trainer.steps=2", "logging.eval_every=2", "logging.num_samples=0", "logging.experiment=test-bf16",
            "algorithm.behaviour_correction=tis_token"]
    fp32 = run(load_experiment(lab / "rl.yaml", base), root=lab)
    bf16 = run(load_experiment(lab / "rl.yaml", [*base, "rollout.dtype=bfloat16"]), root=lab)
    k32, k16 = _hist(lab, fp32.run_id, "mismatch/kl_k3"), _hist(lab, bf16.run_id, "mismatch/kl_k3")
    assert k32[0][1] < 1e-6 and k16[0][1] > 100 * max(k32[0][1], 1e-9)  # step 1: on-policy, yet a gap
    assert _hist(lab, bf16.run_id, "is/weight_max")[0][1] > 1.01


def test_weight_sync_checksum_catches_a_corrupted_tensor(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push that changes one element of one tensor on its way to the engine stops the run FAILED, naming the tensor;
    an intact push is counted in sync/verified_tensors."""
    import rlcore.rollout as rollout
    from rlcore.config import RunFailed
    from rlcore.controller import run

    base = ["trainer.steps=2", "logging.eval_every=2", "logging.num_samples=0", "logging.experiment=test-sync",
            "rollout.engine=separate"]
    good = run(load_experiment(lab / "rl.yaml", base), root=lab)
    n = _hist(lab, good.run_id, "sync/verified_tensors")
    assert [s for s, _ in n] == [1, 2] and n[0][1] > 10  # every tensor of the tiny Llama, every push

    real = rollout.transfer

    def corrupting(dst: torch.Tensor, src: torch.Tensor) -> None:
        real(dst, src)
        if dst.dim() == 2 and dst.shape[0] == dst.shape[1]:  # one square projection: a single flipped value
            dst.view(-1)[7] += 1.0

    monkeypatch.setattr(rollout, "transfer", corrupting)
    with pytest.raises(RunFailed, match=r"weight-sync: model\.layers\.\S+ differs on the rollout engine after the push"):
        run(load_experiment(lab / "rl.yaml", [*base, "logging.run_name=corrupt"]), root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    bad = c.search_runs([c.get_experiment_by_name("test-sync").experiment_id], "tags.mlflow.runName = 'corrupt'")
    assert bad[0].info.status == "FAILED"


def test_pushing_every_n_updates_makes_the_engine_lag(lab: Path) -> None:
    """weight_sync.every: 3 pushes after updates 3 and 6: the batches of steps 1-6 are 0, 1, 2, 0, 1, 2 updates old."""
    from rlcore.controller import run

    r = run(load_experiment(lab / "rl.yaml", ["trainer.steps=6", "logging.eval_every=6", "logging.num_samples=0",
                                               "logging.experiment=test-sync", "weight_sync.every=3"]), root=lab)
    assert [v for _, v in _hist(lab, r.run_id, "rollout/staleness")] == [0, 1, 2, 0, 1, 2]
    assert [s for s, _ in _hist(lab, r.run_id, "sync/verified_tensors")] == [3, 6]
    mb = [v for _, v in _hist(lab, r.run_id, "perf/sync_mb")]
    assert mb[0] == mb[1] == 0 and mb[2] > 0  # nothing moves between pushes


def test_another_attention_kernel_in_the_sampler(lab: Path) -> None:
    """`rollout.attention: eager`: the engine's copy runs transformers' eager attention while the trainer keeps sdpa;
    the gap is measured (mismatch/*), and on CPU it is float rounding."""
    from rlcore.controller import build_for, run

    cfg = load_experiment(lab / "rl.yaml", ["rollout.attention=eager", "trainer.steps=1", "logging.eval_every=1",
                                            "logging.num_samples=0", "logging.experiment=test-attn"])
    loop = build_for(cfg, lab)
    assert loop.engine.model.config._attn_implementation == "eager"
    assert loop.trainer.unwrapped.config._attn_implementation == "sdpa"
    r = run(cfg, root=lab)
    k3 = _hist(lab, r.run_id, "mismatch/kl_k3")
    assert len(k3) == 1 and 0 <= k3[0][1] < 1e-6
