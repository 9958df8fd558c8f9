"""Curation (lesson 18a): prompts from buckets the policy always or never solves are skipped before rollout."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlcore.batch import Problem
from rlcore.config import ConfigError, CurationConfig
from rlcore.loading import load_experiment
from rlcore.tasks import AdditionTask, CuratedStream
from rlcore.tracking import tracking_settings


def test_addition_buckets_count_digits_and_carries() -> None:
    assert AdditionTask.bucket(Problem("12+34=", "46")) == "2+2 c0"
    assert AdditionTask.bucket(Problem("95+7=", "102")) == "2+1 c2"
    assert AdditionTask.bucket(Problem("999+1=", "1000")) == "3+1 c3"


class Cycle:
    """An endless stream alternating an easy and a hard problem."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> Problem:
        self.position += 1
        return Problem("easy" if self.position % 2 else "hard", "1")

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_curated_stream_skips_solved_buckets_explores_and_resumes_exactly() -> None:
    cfg = CurationConfig(enabled=True, min_groups=2, explore=0.25)
    s = CuratedStream(Cycle(), lambda p: p.prompt, cfg, seed=0)
    first = s.take(4)
    assert [p.prompt for p in first] == ["easy", "hard", "easy", "hard"]  # nothing known yet: keep all
    s.observe(first, [1.0] * 4 + [0.0, 1.0, 0.0, 1.0] + [1.0] * 4 + [1.0, 0.0, 0.0, 1.0], k=4)
    assert s.rate["easy"] == pytest.approx(1.0) and s.seen == {"easy": 2, "hard": 2}
    assert s.metrics()["curation/skipped_buckets"] == 1.0  # easy: always solved
    state = s.state_dict()
    nxt = s.take(40)
    share = sum(p.prompt == "easy" for p in nxt) / len(nxt)
    assert 0.0 < share < 0.35  # easy prompts only by the explore coin (0.25 / 1.25 of the draws kept)
    again = CuratedStream(Cycle(), lambda p: p.prompt, cfg, seed=0)
    again.load_state_dict(state)
    assert again.take(40) == nxt  # the same choices after a resume
    assert s.metrics()["curation/kept_frac"] < 1.0


def test_curation_and_a_resampling_group_filter_are_refused_together() -> None:
    from rlcore.loading import validate_dict

    with pytest.raises(ConfigError, match="curation.enabled and algorithm.group_filter 'nonzero_std' both filter"):
        validate_dict({"curation": {"enabled": True}, "algorithm": {"group_filter": "nonzero_std", "name": "x"}})


def test_a_curated_run_logs_what_it_kept(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlcore.controller import run

    monkeypatch.chdir(lab)
    cfg = load_experiment(lab / "rl.yaml", ["curation.enabled=true", "curation.min_groups=1", "curation.high=0.5",
                                            "trainer.steps=3", "trainer.checkpoint_every=0",
                                            "logging.experiment=test-curation"])
    res = run(cfg, root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    kept = [m.value for m in sorted(c.get_metric_history(res.run_id, "curation/kept_frac"), key=lambda m: m.step)]
    assert len(kept) == 3 and kept[0] == 1.0 and kept[-1] < 1.0  # the warm start solves most 1-digit sums
