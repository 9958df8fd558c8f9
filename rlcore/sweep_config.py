"""The sweep file's schema: a search space over any experiment key, the objective, sampler, pruner, budget and
storage; `load_sweep` validates every key path of the space against the experiment schema (each end of each range,
each choice), so a sweep cannot start with a point that no experiment accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from rlcore.config import ConfigError, _Section
from rlcore.loading import load_experiment, load_yaml, validate_model
from rlcore.metrics import BY_NAME


class FloatParam(_Section):
    type: Literal["float"]
    low: float = Field(description="Lower bound (inclusive).")
    high: float = Field(description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        return self


class IntParam(_Section):
    type: Literal["int"]
    low: int = Field(description="Lower bound (inclusive).")
    high: int = Field(description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: int = Field(1, gt=0, description="Spacing of the values (not with log).")

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        return self


class CategoricalParam(_Section):
    type: Literal["categorical"]
    choices: list[str | int | float | bool | None] = Field(min_length=1, description="The values to choose from.")


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low must be <= high, got low={low} > high={high}")
    if log and low <= 0:
        raise ValueError(f"a log scale needs low > 0, got low={low}")


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class ObjectiveConfig(_Section):
    metric: str = Field("eval/sampled_reward", description="Held-out eval metric the trial is scored by (its last value).")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="Whether larger is better.")

    @model_validator(mode="after")
    def _eval_metric(self) -> ObjectiveConfig:
        if not self.metric.startswith("eval/") or self.metric not in BY_NAME:
            evals = ", ".join(m for m in BY_NAME if m.startswith("eval/"))
            raise ValueError(f"metric must be a held-out eval metric ({evals}), got {self.metric!r}")
        return self


class SamplerConfig(_Section):
    name: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    seed: int = Field(0, description="Sampler seed (worker i uses seed + i, so workers do not propose the same point).")
    n_startup_trials: int = Field(4, ge=0, description="TPE: random trials before the model kicks in.")


class PrunerConfig(_Section):
    name: Literal["median", "hyperband", "none"] = Field("median", description="Optuna pruner fed by the periodic eval.")
    n_startup_trials: int = Field(3, ge=0, description="median: trials that finish unpruned before pruning starts.")
    n_warmup_steps: int = Field(0, ge=0, description="median: no pruning before this RL step.")


class SweepConfig(_Section):
    base: str = Field(description="The experiment YAML every trial starts from (relative to this sweep file).")
    overrides: list[str] = Field(default_factory=list, description="`key.path=value` applied to base in every trial.")
    study_name: str | None = Field(None, description="Optuna study name (default: the sweep file's stem).")
    space: dict[str, SearchParam] = Field(min_length=1, description="Search space: experiment key path -> distribution.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    n_trials: int = Field(12, gt=0, description="Trials in the study; a re-run only runs the missing ones.")
    timeout: float | None = Field(None, gt=0, description="Stop starting new trials after this many seconds.")
    workers: int = Field(1, ge=1, description="Worker processes on this machine sharing the study.")
    storage: str | None = Field(
        None, description="Optuna storage: None = journal file beside the MLflow store; `journal:PATH`; or an RDB "
        "URL such as postgresql://user@127.0.0.1/db for workers on several machines.",
    )
    mlflow_experiment: str | None = Field(None, description="MLflow experiment of the parent and trial runs "
                                                            "(default: the study name).")

    _path: Path = Path("sweep.yaml")

    @property
    def name(self) -> str:
        return self.study_name or self._path.stem

    @property
    def base_path(self) -> Path:
        p = Path(self.base)
        return p if p.is_absolute() else (self._path.parent / p).resolve()


def load_sweep(path: str | Path, trials: int | None = None, workers: int | None = None) -> SweepConfig:
    """Read and validate a sweep file, including every key path of its space against the experiment schema."""
    raw = load_yaml(path)
    if trials is not None:
        raw["n_trials"] = trials
    if workers is not None:
        raw["workers"] = workers
    try:
        sw = validate_model(SweepConfig, raw, "sweep")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    sw._path = Path(path).resolve()
    if not sw.base_path.is_file():
        raise ConfigError(f"{path}: base: no such experiment file {sw.base!r}")
    base = load_experiment(sw.base_path, sw.overrides)  # the base itself must be valid
    if base.kind != "rl":  # a trial is an RL run: a dpo.beta swept over it would be a key with no effect
        raise ConfigError(f"{path}: base: {sw.base!r} is a `kind: {base.kind}` experiment; a sweep's trials are RL "
                          "runs (kind: rl), so its keys would have no effect")
    for key, p in sw.space.items():
        probes = p.choices if isinstance(p, CategoricalParam) else [p.low, p.high]
        for value in probes:  # every end of every range must give a valid experiment
            try:
                load_experiment(sw.base_path, sw.overrides, {key: value})
            except ConfigError as e:
                raise ConfigError(f"{path}: space.{key}: {e}") from None
    return sw
