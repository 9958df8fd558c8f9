"""Preference data from the task: the simulated annotator's labels, and the versioned data set a run writes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlcore.config import PreferencesConfig
from rlcore.loading import load_experiment
from rlcore.preferences import CARD, PAIRS, build, label_pairs, run_preferences
from rlcore.tracking import tracking_settings
from tests.conftest import dedent


def test_annotator_prefers_the_true_reward_breaks_ties_and_flips_at_the_noise_rate() -> None:
    rng = random.Random(0)
    clean = PreferencesConfig(label_noise=0.0)
    for _ in range(200):
        scores = [rng.choice([0.0, 1.0]) for _ in range(4)]
        for p in label_pairs(scores, [1, 2, 3, 4], clean, rng):
            assert len({p["chosen"], p["rejected"]}) == 2 and not p["flipped"]
            assert p["tie"] == (scores[p["chosen"]] == scores[p["rejected"]])
            assert p["tie"] or scores[p["chosen"]] > scores[p["rejected"]]
    longer = PreferencesConfig(bias="longer")
    pairs = label_pairs([1.0, 1.0, 1.0, 1.0], [5, 2, 7, 3], longer, random.Random(1))
    assert len(pairs) == 2 and all(p["tie"] and p["chosen"] in (0, 2) or p["chosen"] == 3 for p in pairs)
    assert all([5, 2, 7, 3][p["chosen"]] > [5, 2, 7, 3][p["rejected"]] for p in pairs)
    noisy = PreferencesConfig(label_noise=0.3)
    rng = random.Random(2)
    labels = [p for _ in range(3000) for p in label_pairs([1.0, 0.0], [1, 1], noisy, rng)]
    wrong = sum(p["chosen"] == 1 for p in labels) / len(labels)
    assert abs(wrong - 0.3) < 0.03 and all(p["flipped"] == (p["chosen"] == 1) for p in labels)
    assert label_pairs([1.0, 1.0], [1, 1], PreferencesConfig(skip_ties=True), rng) == []


def _prefs(lab: Path, tmp_path: Path, noise: float, skip_ties: bool = False) -> Path:
    exp = tmp_path / f"prefs{noise}{skip_ties}.yaml"
    exp.write_text(dedent(f"""
        kind: preferences
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16}}
        rollout: {{max_new_tokens: 4}}
        preferences: {{prompts: 24, samples_per_prompt: 4, label_noise: {noise}, skip_ties: {str(skip_ties).lower()}}}
        logging: {{experiment: test-prefs}}
    """))
    return exp


def test_preference_run_writes_a_versioned_data_set_once(lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(lab)
    cfg = load_experiment(_prefs(lab, tmp_path, 0.0))
    out, card, run_id = run_preferences(cfg, lab)
    rows = [json.loads(line) for line in (out / PAIRS).read_text().splitlines()]
    assert len(rows) == card["pairs"] == 24 * 2  # K = 4: two disjoint pairs per prompt
    decided = [r for r in rows if not r["tie"]]
    assert card["ties"] == len(rows) - len(decided) and card["true_agreement"] == 1.0
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in decided) and card["flipped"] == 0
    assert all(r["chosen"] != r["rejected"] or r["tie"] for r in rows)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    run = c.get_run(run_id)
    assert run.data.tags["rlcore.kind"] == "preferences" and run.data.tags["rlcore.prefs.pairs"] == "48"
    assert {a.path for a in c.list_artifacts(run_id)} >= {PAIRS, CARD, "config.yaml"}
    # the same config is the same data set: found, not rebuilt; built elsewhere it is byte-identical
    again, card2 = build(cfg, lab)
    assert again == out and card2["sha256"] == card["sha256"]
    elsewhere, card3 = build(cfg, tmp_path)
    assert elsewhere != out and card3["sha256"] == card["sha256"]
    # a damaged copy (a truncated write, a bad disk) is rebuilt, never read
    good = (out / PAIRS).read_bytes()
    (out / PAIRS).write_bytes(good[: len(good) // 2])
    again, card5 = build(cfg, lab)
    assert again == out and (out / PAIRS).read_bytes() == good and card5["sha256"] == card["sha256"]
    noisy = load_experiment(_prefs(lab, tmp_path, 0.5))
    _, card4 = build(noisy, lab)
    assert card4["flipped"] > 0 and card4["true_agreement"] < 1.0


def test_reward_model_trains_on_the_pairs_logs_heldout_accuracy_and_reloads(lab: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from rlcore.reward_model import heldout_metrics, load_reward_model, pair_scores
    from rlcore.rm_training import load_pairs, train_reward_model

    monkeypatch.chdir(lab)
    prefs = _prefs(lab, tmp_path, 0.0)
    exp = tmp_path / "rm.yaml"
    exp.write_text(dedent(f"""
        kind: reward_model
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16}}
        reward_model: {{pairs: {prefs.name}, epochs: 4, batch_size: 8, heldout_frac: 0.25}}
        trainer: {{lr: 1.0e-3, micro_batch_size: 64}}
        logging: {{experiment: test-rm, eval_every: 5}}
    """))
    cfg = load_experiment(exp)
    run_id, metrics, out = train_reward_model(cfg, lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    loss = [m.value for m in sorted(c.get_metric_history(run_id, "rm/loss"), key=lambda m: m.step)]
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6)  # a zero head scores every completion 0
    assert sum(loss[-3:]) / 3 < loss[0]  # the Bradley-Terry loss falls on the training pairs
    held = c.get_metric_history(run_id, "rm/heldout_accuracy")
    assert [m.step for m in held][0] == 0 and len(held) >= 2
    assert c.get_run(run_id).data.tags["rlcore.kind"] == "reward_model"
    # the saved model scores exactly as the trained one did
    model, tok, fmt = load_reward_model(out)
    rows = load_pairs(cfg, lab)
    assert heldout_metrics(model, tok, fmt, rows[:16], 64) == pytest.approx(
        heldout_metrics(model, tok, fmt, rows[:16], 5))  # chunking changes nothing
    with torch.no_grad():
        chosen, rejected = pair_scores(model, tok, fmt, rows[:4])
    assert chosen.shape == rejected.shape == (4,) and torch.isfinite(chosen).all()


@pytest.mark.parametrize("loss,first", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.5)) ** 2)])
def test_dpo_and_ipo_start_at_the_reference_and_widen_the_margin(loss: str, first: float, lab: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from rlcore.dpo import train_dpo

    monkeypatch.chdir(lab)
    prefs = _prefs(lab, tmp_path, 0.0, skip_ties=True)  # pairs the true reward decides (no same-text ties)
    exp = tmp_path / f"{loss}.yaml"
    exp.write_text(dedent(f"""
        kind: dpo
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16, eval_samples: 2}}
        rollout: {{max_new_tokens: 4}}
        dpo: {{pairs: {prefs.name}, loss: {loss}, beta: 0.5, epochs: 3, batch_size: 16}}
        trainer: {{lr: 1.0e-3}}
        logging: {{experiment: test-dpo, eval_every: 100}}
    """))
    run_id, before, after, out = train_dpo(load_experiment(exp), lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])

    def hist(key: str) -> list[float]:
        return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]

    # step 1: the policy is the reference, every log-ratio is 0: sigmoid log 2, IPO (1/(2 beta))^2, no pair ranked
    assert hist("dpo/loss")[0] == pytest.approx(first, abs=1e-5)
    assert hist("rewards/accuracies")[0] == 0.0 and hist("rewards/margins")[0] == 0.0
    last = len(hist("dpo/loss")) // 3  # the last epoch
    assert sum(hist("rewards/margins")[-last:]) / last > 0.05  # it learned the preferences
    assert sum(hist("rewards/accuracies")[-last:]) / last > 0.6
    evals = c.get_metric_history(run_id, "eval/greedy_accuracy")
    assert sorted(m.step for m in evals) == [0, len(hist("dpo/loss"))] and before and after
    assert (out / "model.safetensors").is_file()
    assert c.get_run(run_id).data.tags["algorithm"] == ("dpo" if loss == "sigmoid" else "ipo")


def test_rl_on_a_learned_reward_logs_the_truth_beside_the_proxy(lab: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The reward names a reward-model experiment: it is trained on first use and cached; the RL run's reward is its
    score, and reward/true, eval/true_accuracy (the verifier) and eval/proxy_reward are logged beside it."""
    from rlcore.controller import run
    from rlcore.reward_model import MARKER

    monkeypatch.chdir(lab)
    prefs = _prefs(lab, tmp_path, 0.0, skip_ties=True)
    (tmp_path / "rm.yaml").write_text(dedent(f"""
        kind: reward_model
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16}}
        reward_model: {{pairs: {prefs.name}, epochs: 2, batch_size: 8}}
        logging: {{experiment: test-rm}}
    """))
    exp = tmp_path / "rl_rm.yaml"
    exp.write_text((lab / "rl.yaml").read_text().replace("model: {warm_start: sft.yaml}",
                                                           f"model: {{warm_start: {lab / 'sft.yaml'}}}")
                   + "reward:\n  components:\n    - {name: rm, fn: reward_model, path: rm.yaml}\n")
    cfg = load_experiment(exp, ["trainer.steps=2", "logging.eval_every=2", "trainer.checkpoint_every=0"])
    res = run(cfg, root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    got = c.get_run(res.run_id).data.metrics
    assert {"reward/true", "eval/true_accuracy", "eval/proxy_reward"} <= set(got)
    assert got["eval/greedy_accuracy"] == got["eval/true_accuracy"]  # accuracy is the verifier's, not the RM score
    assert 0.0 <= got["reward/true"] <= 1.0 and got["eval/proxy_reward"] != got["eval/true_accuracy"]
    built = list((lab / ".rlcore_cache" / "reward_model").glob(f"*/{MARKER}"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime
    run(cfg, root=lab)  # a second run reuses the cached reward model
    assert built[0].stat().st_mtime == stamp and len(list((lab / ".rlcore_cache" / "reward_model").glob("*"))) <= 2


def test_search_at_evaluation_ranks_by_the_reward_model(lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Best-of-N keeps the reward model's pick: with a reward model that scores the truth it equals the oracle
    (pass@N), with one that scores the opposite it keeps the worst; the budget is N samples a prompt."""
    import torch

    import rlcore.reward as reward
    from rlcore.search import evaluate_search

    monkeypatch.chdir(lab)
    cfg = load_experiment(lab / "rl.yaml", ["task.heldout_size=16"])
    oracle_scores = {}

    def scores_by_truth(model, tok, fmt, prompts, texts, chunk=64):
        right = [t == str(sum(int(x) for x in p[:-1].split("+"))) for p, t in zip(prompts, texts, strict=True)]
        return oracle_scores["sign"] * torch.tensor(right, dtype=torch.float32)

    monkeypatch.setattr(reward, "learned_scores", scores_by_truth)
    monkeypatch.setattr("rlcore.reward_model.load_reward_model", lambda path: (None, None, None))
    out = {}
    for sign in (1.0, -1.0):
        oracle_scores["sign"] = sign
        out[sign] = {r["method"]: r for r in evaluate_search(cfg, lab, 4, tmp_path)}
    good, bad = out[1.0], out[-1.0]
    assert good["best_of_n"]["accuracy"] == good["oracle"]["accuracy"] >= good["sample"]["accuracy"]
    assert bad["best_of_n"]["accuracy"] <= bad["sample"]["accuracy"] <= bad["oracle"]["accuracy"]
    assert good["best_of_n"]["samples"] == 4 * 16 and good["greedy"]["samples"] == 16
    assert good["greedy"]["tokens"] > 0 and good["best_of_n"]["tokens"] == good["oracle"]["tokens"]
