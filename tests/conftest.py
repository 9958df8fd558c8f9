"""Shared fixtures: a throwaway lab (project root with its own MLflow store) and a tiny cached warm start."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# Tests never read the developer's tracking server or write to the project's store.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SFT_YAML = """\
kind: sft
model:
  tiny: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 32}
task: {min_digits: 1, max_digits: 1, heldout_size: 16}
trainer: {steps: 150, lr: 1.0e-2, warmup_steps: 10, sft_batch_size: 64}
logging: {experiment: test-warm-start}
"""

RL_YAML = """\
model: {warm_start: sft.yaml}
task: {min_digits: 1, max_digits: 1, heldout_size: 16, eval_samples: 2}
rollout: {prompts_per_step: 8, samples_per_prompt: 4, max_new_tokens: 4}
trainer: {steps: 3, micro_batch_size: 8, lr: 1.0e-3}
algorithm: {kl_coef: 0.05}
logging: {experiment: test-rl, eval_every: 2, samples_every: 2, num_samples: 4}
"""


def write_lab(root: Path) -> Path:
    (root / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_location: mlruns/artifacts\n"
                                     "flush_interval_s: 0.2\nfinish_timeout_s: 90\n")
    (root / "sft.yaml").write_text(SFT_YAML)
    (root / "rl.yaml").write_text(RL_YAML)
    return root


def write_course(root: Path, lessons: dict[str, str]) -> Path:
    """A lab that is also a small course: experiments/ holds its rl.yaml and sft.yaml, lessons/ these pages
    (file name -> text), as `rlcore lesson` and the dashboard's Lessons page expect."""
    root.mkdir(parents=True, exist_ok=True)
    write_lab(root)
    (root / "experiments").mkdir()
    for f in ("rl.yaml", "sft.yaml"):
        (root / "experiments" / f).write_text((root / f).read_text())
    (root / "lessons").mkdir()
    for name, text in lessons.items():
        (root / "lessons" / name).write_text(text)
    return root


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Path:
    """A project root with mlflow.yml, sft.yaml and rl.yaml; the warm start is built once per session."""
    from rlcore.loading import load_experiment
    from rlcore.sft import warm_start_dir

    root = write_lab(tmp_path_factory.mktemp("lab"))
    warm_start_dir(load_experiment(root / "rl.yaml"), root, quiet=True)
    return root


def dedent(s: str) -> str:
    return textwrap.dedent(s).lstrip()
