"""One typed schema for every experiment; each field is documented once, here.

An experiment YAML lists only what it changes from these defaults (the defaults are a GRPO run on the
addition task). `load_experiment` reads the YAML with `yaml.safe_load`, applies `--set key.path=value`
overrides and validates; any problem raises `ConfigError` whose message names the full key path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A user mistake in an experiment file or override; the CLI prints it on one line and exits 2."""


class _Section(BaseModel):
    # extra="forbid": a typo such as `algorithm.clip_epss` must fail, not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Shape of the default Llama-style model built from config (no download)."""

    hidden_size: int = Field(128, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(4, gt=0, description="Number of transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads per block (must divide hidden_size).")
    intermediate_size: int = Field(344, gt=0, description="Hidden width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(64, gt=0, description="Longest sequence (prompt + completion) the model sees.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads must divide hidden_size, got {self.num_heads} and {self.hidden_size}")
        return self


class ModelConfig(_Section):
    name_or_path: str | None = Field(
        None,
        description="A local directory or Hugging Face hub id loaded with AutoModelForCausalLM/AutoTokenizer. "
        "None builds the tiny model from `tiny` (or loads `warm_start`).",
    )
    warm_start: str | None = Field(
        None,
        description="Path (relative to this YAML) of a `kind: sft` experiment whose trained policy initialises this "
        "run. Built on first use and cached by the hash of its resolved config.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the built-from-config model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    allow_download: bool = Field(
        False, description="Let `name_or_path` fetch from the hub. Off by default: nothing downloads unless asked."
    )
    use_chat_template: bool = Field(
        False, description="Wrap prompts with the tokenizer's chat template (only for HF models that have one)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.name_or_path is not None and self.warm_start is not None:
            raise ValueError("set either name_or_path or warm_start, not both")
        return self


class TaskConfig(_Section):
    name: Literal["addition"] = Field("addition", description="Verifiable task: `A+B=` -> `C<eos>`, reward 1 iff exact.")
    min_digits: int = Field(1, ge=1, le=6, description="Fewest digits of an operand.")
    max_digits: int = Field(3, ge=1, le=6, description="Most digits of an operand.")
    heldout_size: int = Field(512, gt=0, description="Prompts in the fixed held-out set (never in any training stream).")
    heldout_seed: int = Field(1234, description="Seed of the held-out set; independent of the run seed so runs share it.")
    eval_samples: int = Field(
        8, gt=0, description="k samples per held-out prompt at T=1 for eval/sampled_reward (512 x 8: SE ~0.7 points)."
    )
    tool: Literal["none", "calculator"] = Field(
        "none", description="Agentic multi-turn (lesson 08): `calculator` lets the model write `[a+b]` mid-completion; "
        "the environment appends `(result)` as context the loss, KL and entropy never count.",
    )
    max_tool_calls: int = Field(1, ge=1, description="Turn cap: tool calls honoured per completion (later ones are text).")
    sft_tool_frac: float = Field(
        0.0, ge=0, le=1, description="Share of warm-start (SFT) examples written as a tool-use trace `[A+B](C)C`; the "
        "rest answer directly. Below 1 the warm start calls the tool only sometimes, which RL can then learn to do.",
    )

    @model_validator(mode="after")
    def _digits_order(self) -> TaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits must be <= max_digits, got {self.min_digits} > {self.max_digits}")
        return self


class RolloutConfig(_Section):
    prompts_per_step: int = Field(64, gt=0, description="Prompts per RL step (split across processes).")
    samples_per_prompt: int = Field(8, gt=0, description="K completions per prompt: the group of GRPO/RLOO.")
    max_new_tokens: int = Field(8, gt=0, description="Completion length cap; a completion that hits it is 'clipped'.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for training rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass for training rollouts (1 = off).")
    engine: Literal["shared", "separate"] = Field(
        "shared",
        description="`shared`: the sampler uses the policy's own weights. `separate`: the rollout engine holds its "
        "own copy, refreshed by weight-sync after every update (how vLLM/SGLang engines are fed).",
    )


class AlgorithmConfig(_Section):
    name: str = Field("grpo", description="Label of the preset (a tag in MLflow); the axes below define the algorithm.")
    advantage: str = Field("grpo", description="Advantage estimator, a key of rlcore.algorithm.ADVANTAGES.")
    scale_by_std: bool = Field(True, description="GRPO divides by the group std; Dr.GRPO (2025) turns this off.")
    policy_loss: str = Field("ppo_clip", description="Per-token objective, a key of rlcore.algorithm.POLICY_LOSSES.")
    loss_agg: str = Field("token_mean", description="How token losses become one number, a key of rlcore.algorithm.LOSS_AGG.")
    baseline: Literal["none", "batch_mean"] = Field(
        "batch_mean", description="REINFORCE's baseline (advantage `reinforce`): none, or the batch's mean reward."
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range epsilon (ratio kept within [1-eps, 1+eps]).")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip 1+eps_high; None = clip_eps. DAPO's clip-higher (2025) uses 0.28 so rare "
        "tokens with A>0 can still grow, which keeps entropy from collapsing.",
    )
    dual_clip: float | None = Field(
        None, gt=1, description="Dual-clip constant c > 1 (Ye et al. 2020): for A<0 the loss is capped at c|A|, so a "
        "huge ratio on a bad token cannot dominate the batch. None = off.",
    )
    kl_coef: float = Field(0.04, ge=0, description="beta of the KL anchor to the reference; 0 drops the reference model.")
    kl_estimator: str = Field("k3", description="KL estimator, a key of rlcore.reference.KL_ESTIMATORS (k1, k2, k3).")
    kl_placement: Literal["loss", "reward"] = Field(
        "loss", description="Where the anchor acts: `loss` adds beta*KL per token to the objective (GRPO); `reward` "
        "subtracts beta*KL from each token's reward before advantages (PPO-RLHF, REINFORCE++).",
    )
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO's soft overlong punishment (2025): within the last N tokens before "
        "rollout.max_new_tokens the reward falls linearly to -overlong_penalty; a completion cut without EOS gets "
        "-overlong_penalty. 0 = off.",
    )
    overlong_penalty: float = Field(1.0, ge=0, description="Size of the overlong penalty (see overlong_buffer).")
    group_filter: str = Field(
        "none", description="Which groups the update uses, a key of rlcore.algorithm.GROUP_FILTERS (`nonzero_std`: "
        "DAPO's dynamic sampling, resampling until the batch is full of groups with reward variance).",
    )
    max_sample_rounds: int = Field(
        4, ge=1, description="Cap on rollout rounds per step for a group filter; if still short, filtered groups fill "
        "the batch (counted in rollout/filler_groups).",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount (advantage `gae`); 1 for a reward at the end.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 = Monte-Carlo return minus V, 0 = one-step TD.")
    critic_lr: float = Field(5e-4, gt=0, description="AdamW learning rate of the value model (advantage `gae`).")
    value_clip: float | None = Field(
        0.2, gt=0, description="PPO value clipping: V may move at most this far from V_old per update. None = off."
    )
    ppo_epochs: int = Field(1, gt=0, description="Passes over each rollout batch; > 1 needs old log-probs.")
    minibatches: int = Field(1, gt=0, description="Optimizer steps per pass over the rollout batch.")

    @field_validator("advantage", "policy_loss", "loss_agg", "kl_estimator", "group_filter")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        from rlcore import algorithm, reference  # late import: the registries import this module's types

        registry = {"advantage": algorithm.ADVANTAGES, "policy_loss": algorithm.POLICY_LOSSES,
                    "loss_agg": algorithm.LOSS_AGG, "kl_estimator": reference.KL_ESTIMATORS,
                    "group_filter": algorithm.GROUP_FILTERS}[info.field_name]
        if value not in registry:
            raise ValueError(f"unknown {value!r}, valid: {', '.join(sorted(registry))}")
        return value


class TrainerConfig(_Section):
    steps: int = Field(100, gt=0, description="RL steps (or SFT steps for `kind: sft`).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps, then constant.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    micro_batch_size: int = Field(
        128, gt=0, description="Sequences per forward/backward; the rollout batch is accumulated over micro-batches."
    )
    sft_batch_size: int = Field(128, gt=0, description="Examples per SFT step (`kind: sft` only).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="SFT cross-entropy label smoothing (`kind: sft` only): this share of each target's "
        "probability is spread over the vocabulary, so the warm start samples less surely than it answers greedily.",
    )
    checkpoint_every: int = Field(
        25, ge=0, description="Write a checkpoint every N steps (and when stopped by SIGTERM/Ctrl-C); 0 = never. "
        "`rlcore run FILE --resume` continues the same MLflow run from the newest one.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per run (older ones are deleted).")
    max_nonfinite: int = Field(
        3, ge=1, description="NaN/inf guard: a non-finite gradient skips the update; this many steps in a row stop the "
        "run as FAILED.",
    )


class LoggingConfig(_Section):
    experiment: str = Field("rlcore", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; None: <algorithm>-s<seed>-<config hash>.")
    eval_every: int = Field(20, gt=0, description="Held-out evaluation every N steps (and at step 0 and the end).")
    samples_every: int = Field(20, gt=0, description="Log a table of sample completions every N steps.")
    num_samples: int = Field(16, ge=0, description="Completions per sample table.")
    output_dir: str = Field("outputs", description="Where final weights go (relative to the project root).")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow tags.")


class ExperimentConfig(_Section):
    kind: Literal["rl", "sft"] = Field("rl", description="`rl`: the RL loop. `sft`: supervised warm start.")
    seed: int = Field(0, description="Seeds python, numpy, torch and the sampler; same seed + config = same numbers.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _overlong_fits(self) -> ExperimentConfig:
        if self.algorithm.overlong_buffer >= self.rollout.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer must be < rollout.max_new_tokens, got "
                             f"{self.algorithm.overlong_buffer} >= {self.rollout.max_new_tokens}")
        return self

    # Not a YAML key: the directory relative paths (warm_start) resolve against.
    _base_dir: Path = Path(".")

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self, sections: tuple[str, ...] | None = None, changed_only: bool = False) -> str:
        """Hash of the resolved config, or of only its top-level `sections`. `changed_only` hashes only the values
        that differ from the schema's defaults, so adding a new option (with a default) keeps old hashes valid."""
        d = self.model_dump(mode="json", exclude_defaults=True) if changed_only else self.to_dict()
        if sections is not None:
            d = {k: v for k, v in d.items() if k in sections}
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def training_hash(self) -> str:
        """Hash of what decides the numbers apart from the seed: the config without `seed` and without `logging`
        (names, tags, eval cadence and output paths do not change what is trained)."""
        return self.model_copy(update={"seed": 0, "logging": LoggingConfig()}).config_hash()

    def seed_group(self) -> str:
        """The MLflow tag `rlcore.group`: equal for runs whose configs differ only in their seed (or logging)."""
        return f"{self.logging.experiment}-{self.training_hash()[:8]}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; the form MLflow params and the dashboard's config diff use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------- loading

_UNION_TAGS = {"float", "int", "categorical"}  # discriminator tags pydantic puts in a location (sweep params)


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error -> 'key.path: must be > 0, got -0.2'."""
    loc = ".".join(str(p) for p in err["loc"]
                   if not str(p).startswith("function-after") and str(p) not in _UNION_TAGS)
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    messages = {
        "greater_than": lambda: f"must be > {ctx.get('gt')}, got {got!r}",
        "greater_than_equal": lambda: f"must be >= {ctx.get('ge')}, got {got!r}",
        "less_than": lambda: f"must be < {ctx.get('lt')}, got {got!r}",
        "less_than_equal": lambda: f"must be <= {ctx.get('le')}, got {got!r}",
        "extra_forbidden": lambda: "unknown key",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}, got {got!r}",
        "missing": lambda: "required key is missing",
    }
    if kind in messages:
        msg = messages[kind]()
    elif kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    else:  # type errors: keep pydantic's wording but show what was given
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"
    return f"{loc}: {msg}" if loc else msg


def _unknown_key_hint(loc: tuple, model: type[BaseModel]) -> str:
    """List the valid keys of the section that received an unknown key."""
    section: Any = model
    for part in loc[:-1]:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        section = field.annotation
    return f" (valid: {', '.join(section.model_fields)})"


def validate_model(cls: type[BaseModel], raw: Any, what: str) -> Any:
    """Validate `raw` against a schema; the first problem becomes a one-line ConfigError naming its key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a YAML mapping, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        msg = _describe(first)
        if first["type"] == "extra_forbidden":
            msg += _unknown_key_hint(first["loc"], cls)
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ConfigError(msg + more) from None


def validate_dict(raw: Any, base_dir: Path = Path(".")) -> ExperimentConfig:
    cfg = validate_model(ExperimentConfig, raw, "experiment")
    cfg._base_dir = base_dir
    return cfg


def set_value(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key 'a.b.c', creating sections as needed."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{key!r}: empty key")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = child
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` (value parsed as YAML, so 3 is an int and null is None)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    key, _, text = assignment.partition("=")
    if not all(key.strip().split(".")):
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    set_value(raw, key, value)


MAX_FILE_BYTES = 1_000_000  # an experiment is a few hundred bytes; a megabyte is a wrong file, not a config


def read_text_file(path: str | Path, what: str = "experiment file") -> str:
    """The file's text, or a one-line ConfigError: missing, a directory, too large, binary."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such {what}")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: too large ({size / 1e6:.1f} MB; {what}s are at most {MAX_FILE_BYTES / 1e6:.0f} MB)")
    data = p.read_bytes()
    if b"\x00" in data:
        raise ConfigError(f"{path}: not a text file (binary content)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of sections, got {type(raw).__name__}")
    return raw or {}


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    values: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load, apply `--set` overrides, then typed `values` by key path (a sweep's trial parameters), and validate."""
    raw = load_yaml(path)
    for o in overrides:
        apply_override(raw, o)
    for key, value in (values or {}).items():
        set_value(raw, key, value)
    cfg = validate_dict(raw, base_dir=Path(path).resolve().parent)
    if cfg.model.warm_start is not None:
        ws = cfg.resolve_path(cfg.model.warm_start)
        if not ws.is_file():
            raise ConfigError(f"model.warm_start: no such file {cfg.model.warm_start!r}")
        try:
            sft = load_experiment(ws)
        except ConfigError as e:
            raise ConfigError(f"model.warm_start: {cfg.model.warm_start}: {e}") from None
        if sft.kind != "sft":
            raise ConfigError(f"model.warm_start: {cfg.model.warm_start!r} is not a `kind: sft` experiment")
    return cfg
