"""Process reward model (lesson 17): step labels the task checks exactly, the step loss, PRM-guided beam search at
an equal budget, and the search table with both kinds of reward model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlcore.loading import load_experiment
from tests.conftest import dedent


def test_step_loss_on_a_hand_computed_case() -> None:
    from rlcore.reward_model import prm_loss

    logits = torch.tensor([[0.0, 2.0, 9.0], [-1.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, -1.0]])  # -1: not an answer token
    loss = prm_loss(logits, labels)
    # BCE(0, 1) = log 2; BCE(2, 0) = log(1 + e^2); BCE(-1, 0) = log(1 + e^-1); mean over the 3 labelled steps
    want = (math.log(2) + math.log(1 + math.e**2) + math.log(1 + math.e**-1)) / 3
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    loss.backward()
    sig = torch.sigmoid(logits.detach())
    # d/dlogit of BCE = sigma(logit) - label, over n; unlabelled positions get none
    want_grad = [float(sig[0, 0] - 1) / 3, float(sig[0, 1]) / 3, 0.0, float(sig[1, 0]) / 3, 0.0, 0.0]
    assert logits.grad.flatten().tolist() == pytest.approx(want_grad, abs=1e-6)
    assert float(prm_loss(logits.detach(), labels, n=6)) == pytest.approx(want / 2, abs=1e-6)  # a share of 6 steps


class _Tok:
    """Digits 0-9 are tokens 0-9, EOS 10, PAD 11, '+' 12, '=' 13."""
    eos_token_id, pad_token_id = 10, 11

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(str(t) if t < 10 else "" for t in ids)


def test_prm_beam_with_an_exact_process_model_finds_answers_random_sampling_misses() -> None:
    """A policy that picks among six tokens uniformly writes a given 3-digit sum + EOS once in 6^4 = 1,296 tries;
    beam search guided by an exact process model (1 iff the digits so far are a prefix of the sum) keeps the right
    prefixes and finds it often (it loses a right prefix when none of its M = 4 draws continues it), at N candidate
    tokens a step. Best-of-16 of whole samples would find it about 16 / 1,296 of the time."""
    from rlcore.search import prm_beam

    tok = _Tok()
    answers = {(1, 2): [5, 7, 9], (3, 4): [1, 1, 0]}  # prompt ids -> the right digits

    def policy(input_ids, attention_mask, position_ids):
        logits = torch.full((*input_ids.shape, 14), -1e9)
        logits[..., [0, 1, 5, 7, 9, 10]] = 0.0  # five digits and EOS, uniformly
        return SimpleNamespace(logits=logits)

    def prm(ids, mask, steps=True):
        out = torch.zeros(ids.shape)
        for i, row in enumerate(ids.tolist()):
            row = row[: int(mask[i].sum())]
            want = answers[tuple(row[:2])]
            for t in range(2, len(row)):
                got = row[2 : t + 1]
                ok = got[:-1] == want if got[-1] == 10 else got == want[: len(got)]
                out[i, t] = 10.0 if ok else -10.0
        return out

    prompts = [[1, 2], [3, 4]] * 10
    right = [[5, 7, 9, 10], [1, 1, 0, 10]] * 10
    chosen, spent = prm_beam(policy, prm, tok, prompts, 16, 6, torch.Generator().manual_seed(0))
    found = sum(c == r for c, r in zip(chosen, right, strict=True))
    assert found >= 6, chosen
    assert 16 * 20 * 4 <= spent <= 16 * 20 * 6  # N candidates a step per prompt, for at least the 4 steps an answer takes
    chosen1, spent1 = prm_beam(policy, prm, tok, prompts, 1, 6, torch.Generator().manual_seed(0))
    assert sum(c == r for c, r in zip(chosen1, right, strict=True)) <= 3 and spent1 <= 20 * 6  # a budget of 1: luck


def test_process_reward_model_trains_on_exact_step_labels_and_search_uses_it(lab: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from rlcore.model import build_policy
    from rlcore.prompts import PromptFormat
    from rlcore.rm_training import step_labels, train_reward_model
    from rlcore.search import evaluate_search
    from rlcore.sft import warm_start_dir
    from rlcore.tasks import make_task

    monkeypatch.chdir(lab)
    exp = tmp_path / "prm.yaml"
    exp.write_text(dedent(f"""
        kind: reward_model
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 2, heldout_size: 16}}
        rollout: {{max_new_tokens: 4}}
        reward_model: {{type: process, prompts: 48, samples_per_prompt: 4, epochs: 2, batch_size: 16}}
        trainer: {{lr: 1.0e-3, micro_batch_size: 64}}
        logging: {{experiment: test-prm, eval_every: 5}}
    """))
    cfg = load_experiment(exp)
    policy, tok = build_policy(cfg.model, warm_start_dir(cfg, lab))
    rows = step_labels(cfg, policy, tok, PromptFormat(cfg.prompt, False))
    task = make_task(cfg.task, cfg._base_dir)
    assert len(rows) == 48 * 4
    flips = 0
    for r in rows:
        text = tok.decode(r["ids"], skip_special_tokens=True)
        ended = r["ids"][-1] == tok.eos_token_id
        digits = r["labels"][:-1] if ended else r["labels"]
        assert digits == sorted(digits, reverse=True)  # once a digit is wrong, every later one is
        flips += 0 < sum(digits) < len(digits)
        if ended:
            assert r["labels"][-1] == task.verify(text, r["answer"], finished=True)
            assert r["labels"][-1] <= min(digits, default=1.0)  # a right answer has only right digits
    assert flips > 0  # some answers go wrong part-way: the labels are per step, not per answer
    run_id, metrics, out = train_reward_model(cfg, lab)
    assert 0.5 < metrics["prm/heldout_step_accuracy"] <= 1.0
    search = load_experiment(lab / "rl.yaml", ["task.heldout_size=16", "task.min_digits=1", "task.max_digits=2"])
    table = {r["method"]: r for r in evaluate_search(search, lab, 4, None, process_model=out)}
    assert {"best_of_n_prm", "prm_beam", "oracle"} <= set(table) and "best_of_n" not in table
    prm, beam = table["best_of_n_prm"], table["prm_beam"]
    assert prm["samples"] == beam["samples"] == 4 * 16 and prm["tokens"] == table["oracle"]["tokens"]
    assert prm["accuracy"] <= table["oracle"]["accuracy"]  # no ranker beats pass@N on the same samples
    assert 0 < beam["tokens"] <= 4 * 16 * search.rollout.max_new_tokens


def test_prm_beam_dedup_ranks_each_distinct_prefix_once() -> None:
    """Lesson 17: candidates are drawn with replacement, so without de-duplication one beam can fill with copies of
    one prefix; `dedup` scores each distinct candidate once per prompt and step, on the same draws and budget."""
    from rlcore.search import prm_beam

    tok = _Tok()

    def policy(input_ids, attention_mask, position_ids):  # two tokens and EOS: copies are the rule
        logits = torch.full((*input_ids.shape, 14), -1e9)
        logits[..., [1, 5, 10]] = 0.0
        return SimpleNamespace(logits=logits)

    scored: list[list[tuple[int, ...]]] = []

    def prm(ids, mask, steps=True):
        scored.append([tuple(r[: int(m.sum())]) for r, m in zip(ids.tolist(), mask, strict=True)])
        return torch.zeros(ids.shape)

    prompts = [[1, 2], [3, 4]]
    budget = None
    for dedup in (False, True):
        scored.clear()
        _, spent = prm_beam(policy, prm, tok, prompts, 16, 3, torch.Generator().manual_seed(0), dedup=dedup)
        copies = sum(len(call) - len(set(call)) for call in scored)
        assert (copies == 0) if dedup else (copies > 0), (dedup, copies)
        assert spent >= 16 * 2  # every draw is paid for either way
        budget = budget or spent
    assert spent == budget  # the same budget


def test_search_kind_logs_every_method_at_each_n_and_the_pointwise_model_sees_only_final_labels(
        lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kind: search` makes lesson 17's table as an MLflow run (search/<method> at step N), with majority voting and
    an outcome model trained pointwise on the process model's own answers beside the PRM."""
    from mlflow.tracking import MlflowClient

    from rlcore.cli import run_any
    from rlcore.reward_model import load_reward_model  # noqa: F401 - the saved folders load as reward models

    monkeypatch.chdir(lab)
    for kind in ("process", "pointwise"):
        (tmp_path / f"{kind}.yaml").write_text(dedent(f"""
            kind: reward_model
            model: {{warm_start: {lab / 'sft.yaml'}}}
            task: {{min_digits: 1, max_digits: 1, heldout_size: 16}}
            rollout: {{max_new_tokens: 4}}
            reward_model: {{type: {kind}, prompts: 16, samples_per_prompt: 2, epochs: 1, batch_size: 8}}
            logging: {{experiment: test-prm, eval_every: 5}}
        """))
    (tmp_path / "search.yaml").write_text(dedent(f"""
        kind: search
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16}}
        rollout: {{max_new_tokens: 4}}
        search: {{n: [2, 4], process_model: process.yaml, pointwise_model: pointwise.yaml}}
        logging: {{experiment: test-search}}
    """))
    res = run_any(load_experiment(tmp_path / "search.yaml"), lab)
    c = MlflowClient(res.tracking_uri)
    run = c.get_run(res.run_id)
    assert run.data.tags["rlcore.kind"] == "search" and run.info.status == "FINISHED"
    methods = ["greedy", "sample", "majority", "best_of_n_pointwise", "best_of_n_prm", "prm_beam", "prm_beam_dedup",
               "oracle"]
    hist = {m: {p.step: p.value for p in c.get_metric_history(res.run_id, f"search/{m}")} for m in methods}
    assert all(set(h) == {2, 4} for h in hist.values()), hist
    assert c.get_metric_history(res.run_id, "search/best_of_n") == []  # no outcome model named: no such row
    assert hist["greedy"][2] == hist["greedy"][4]  # one greedy answer whatever N
    for n in (2, 4):
        ranked = ("majority", "best_of_n_pointwise", "best_of_n_prm", "sample")  # choose among the same N samples
        assert all(hist[m][n] <= hist["oracle"][n] + 1e-9 for m in ranked), {m: hist[m][n] for m in methods}
    assert hist["oracle"][4] >= hist["oracle"][2]  # pass@N cannot fall with N (the first samples are shared)
    tokens = {p.step: p.value for p in c.get_metric_history(res.run_id, "search_tokens/oracle")}
    assert tokens[4] > tokens[2] > 0
    # the pointwise model trained on one label per answer: its logged step accuracy is its final accuracy
    pw = [r for r in c.search_runs([c.get_experiment_by_name("test-prm").experiment_id])
          if r.data.tags.get("rlcore.rm.type") == "pointwise"]
    assert pw and pw[0].data.metrics["prm/heldout_step_accuracy"] == pw[0].data.metrics["prm/heldout_final_accuracy"]
