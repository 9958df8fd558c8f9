"""Loading experiments: text files read with care, YAML parsed strictly, `--set` overrides applied, the result
validated against the schema (rlcore.config), warm starts and model paths checked. Every problem is one
`ConfigError` naming the file or the key.
"""

from __future__ import annotations

import contextvars
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlcore.config import ConfigError, ExperimentConfig, ModelConfig

# ---------------------------------------------------------------------------------------------- untrusted editing

# Set while the dashboard validates what a person is typing: user reward modules are then neither imported nor
# called (their top level would run at every keystroke), and every file the config names must lie inside this
# folder (the page is a door into the project, not into the disk). `rlcore run` validates fully when it starts.
_confined: contextvars.ContextVar[Path | None] = contextvars.ContextVar("confined", default=None)


@contextmanager
def confined_to(root: Path) -> Iterator[None]:
    """Validate without running user code, reading only files under `root` (the dashboard's Launch form)."""
    token = _confined.set(root.resolve())
    try:
        yield
    finally:
        _confined.reset(token)


def check_inside(key: str, path: Path | str) -> None:
    """Under `confined_to`, refuse a path outside the project before anything reads it."""
    root = _confined.get()
    if root is not None and not Path(path).expanduser().resolve().is_relative_to(root):
        raise ConfigError(f"{key}: {str(path)!r} is outside the project (not allowed from the dashboard)")

# ---------------------------------------------------------------------------------------------- validation

_UNION_TAGS = {"float", "int", "categorical", "addition", "reasoning_gym", "dataset"}  # discriminator tags pydantic puts in locations


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
        "union_tag_invalid": lambda: f"must be one of {ctx.get('expected_tags')}, got {ctx.get('tag')!r}",
        "finite_number": lambda: f"must be a finite number, got {got!r}",
        "string_too_short": lambda: "must not be empty",
        "string_pattern_mismatch": lambda: (f"must not be blank, got {got!r}" if ctx.get("pattern") == r"\S"
                                            else f"must match {ctx.get('pattern')!r}, got {got!r}"),
        "string_too_long": lambda: f"must be at most {ctx.get('max_length')} characters",
    }
    if kind == "union_tag_invalid":  # the tag is the section's `name` (task.name)
        loc = f"{loc}.name"
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


MAX_DEPTH = 32  # an experiment is 3 levels deep; far deeper is a generated or broken file (and PyYAML recurses)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently) and absurd nesting."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.YAMLError(f"a mapping key must be a plain value (line {key_node.start_mark.line + 1})") from None
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1}, first on line "
                                     f"{seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load's result (same types), with duplicate keys and runaway nesting refused as a ConfigError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{line}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    raw = parse_yaml(read_text_file(path), str(path))
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of sections, got {type(raw).__name__}")
    if not raw:  # empty, only comments, `null` or `{}`: almost always the wrong file, never a useful experiment
        raise ConfigError(f"{path}: sets nothing (empty, only comments, or null); an experiment names at least "
                          "what it changes from the defaults")
    return raw


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    values: dict[str, Any] | None = None, _chain: tuple[Path, ...] = ()) -> ExperimentConfig:
    """Load, apply `--set` overrides, then typed `values` by key path (a sweep's trial parameters), and validate."""
    raw = load_yaml(path)
    for o in overrides:
        apply_override(raw, o)
    for key, value in (values or {}).items():
        set_value(raw, key, value)
    here = Path(path).resolve()
    cfg = validate_dict(raw, base_dir=here.parent)
    check_model_source(cfg.model)
    check_workload(cfg)
    if cfg.model.warm_start is not None:
        ws, chain = cfg.resolve_path(cfg.model.warm_start), (*_chain, here)
        if ws in chain:
            loop = " -> ".join(p.name for p in (*chain, ws))
            raise ConfigError(f"model.warm_start: a cycle of warm starts: {loop}")
        named_experiment(cfg, "model.warm_start", cfg.model.warm_start, "sft", chain)
    return cfg


def named_experiment(cfg: ExperimentConfig, key: str, rel: str, kind: str,
                     chain: tuple[Path, ...] = ()) -> ExperimentConfig:
    """The experiment that `key` names by path (relative to `cfg`'s file), loaded, validated and of the `kind` it
    must be; every problem is a ConfigError naming the key."""
    path = cfg.resolve_path(rel)
    check_inside(key, path)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {rel!r}")
    try:
        exp = load_experiment(path, _chain=chain)
    except ConfigError as e:
        raise ConfigError(f"{key}: {rel}: {e}") from None
    if exp.kind != kind:
        raise ConfigError(f"{key}: {rel!r} is not a `kind: {kind}` experiment")
    return exp


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def check_model_fit(cfg: ExperimentConfig) -> None:
    """What the model itself must have for the config to mean anything, where it can be read without loading it: a
    chat template for model.use_chat_template, and the linear layers model.lora.target_modules names (the tiny model
    and its warm starts are Llamas; a local folder says what it is in config.json)."""
    import json

    m = cfg.model
    folder = Path(m.name_or_path).expanduser() if m.name_or_path else None
    local = folder is not None and (folder / "config.json").is_file()
    if m.use_chat_template:
        if m.name_or_path is None:
            raise ConfigError("model.use_chat_template: the tiny model's character tokenizer has no chat template "
                              "(it is for Hugging Face models that ship one)")
        if local:
            tc = folder / "tokenizer_config.json"
            has = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file() or (
                tc.is_file() and "chat_template" in json.loads(tc.read_text(encoding="utf-8", errors="replace")))
            if not has:
                raise ConfigError(f"model.use_chat_template: {m.name_or_path!r} has no chat template (no "
                                  "chat_template in tokenizer_config.json, no chat_template.jinja)")
    if m.lora is not None:
        llama = m.name_or_path is None or (local and json.loads((folder / "config.json").read_text()).get(
            "model_type") in ("llama", "mistral", "qwen2"))
        if llama and (missing := [t for t in m.lora.target_modules if t not in LLAMA_LINEAR]):
            raise ConfigError(f"model.lora.target_modules: {missing[0]!r} is not a layer of this model (a Llama: "
                              f"{', '.join(LLAMA_LINEAR)})")


def check_workload(cfg: ExperimentConfig) -> None:
    """What the schema alone cannot see, checked before any run exists: the task builds (a reasoning-gym generator
    by that name and options, dataset files and columns that exist) and every reward function can be imported."""
    from rlcore.reward import BUILTINS, LEARNED, RewardImportError, resolve_fn, reward_search_path
    from rlcore.tasks import make_task

    check_model_fit(cfg)
    process = cfg.kind == "reward_model" and cfg.reward_model.type in ("process", "pointwise")
    if process and cfg.reward_model.pairs is not None:
        raise ConfigError(f"reward_model.pairs: a {cfg.reward_model.type} reward model trains on labelled answers, not "
                          "pairs (remove it, or set reward_model.type: outcome)")
    if process and not hasattr(make_task(cfg.task, cfg._base_dir), "prefix_right"):
        raise ConfigError(f"reward_model.type: {cfg.reward_model.type} needs a task that labels answer prefixes "
                          f"(prefix_right: addition); task {cfg.task.name!r} has none")
    if cfg.kind in ("reward_model", "dpo") and not process:
        key = f"{cfg.kind}.pairs"
        pairs = getattr(cfg, cfg.kind).pairs
        if pairs is None:
            raise ConfigError(f"{key}: required for `kind: {cfg.kind}` (a `kind: preferences` experiment)")
        named_experiment(cfg, key, pairs, "preferences")
    if cfg.kind == "search":
        s = cfg.search
        for key, path, want in (("search.reward_model", s.reward_model, "outcome"),
                                ("search.process_model", s.process_model, "process"),
                                ("search.pointwise_model", s.pointwise_model, "pointwise")):
            if path is not None:
                check_reward_model_path(cfg, key, path, want)
        if s.policy is not None:
            p = cfg.resolve_path(s.policy)
            check_inside("search.policy", p)
            if not (p / "config.json").is_file():
                raise ConfigError(f"search.policy: {s.policy!r} is not a model folder (no config.json)")
    if cfg.kind == "sft" and cfg.task.name != "addition":
        raise ConfigError(f"kind: sft trains the addition warm start; task.name {cfg.task.name!r} has no SFT path")
    for i, comp in enumerate(cfg.reward.components):
        if comp.fn == LEARNED:
            check_reward_model_path(cfg, f"reward.components.{i}.path", comp.path)
            continue
        if _confined.get() is not None and comp.fn not in BUILTINS:
            module, sep, name = comp.fn.partition(":")
            if not (sep and module and name):
                raise ConfigError(f"reward.components.{i}.fn: {comp.fn!r} is neither a built-in "
                                  f"({', '.join(BUILTINS)}) nor `module:function`")
            continue  # user code: imported and probed by `rlcore run` when the launch starts, not while typing
        try:
            resolve_fn(comp.fn, reward_search_path(cfg))
        except RewardImportError as e:
            raise ConfigError(f"reward.components.{i}.fn: {e}") from None
        if comp.fn == "math_verify" and importlib.util.find_spec("math_verify") is None:
            raise ConfigError(f"reward.components.{i}.fn: math_verify needs the math-verify package: "
                              'pip install -e ".[tasks]"')
    for key in ("train", "heldout"):
        if getattr(cfg.task, key, None):
            check_inside(f"task.{key}", cfg.resolve_path(getattr(cfg.task, key)))
    task = make_task(cfg.task, cfg._base_dir)  # raises ConfigError naming the key
    if hasattr(task, "check_budget"):
        task.check_budget(cfg.trainer.steps, cfg.rollout.prompts_per_step)
    if getattr(task, "heldout_duplicates", 0):
        print(f"note: task: {task.heldout_duplicates} held-out rows repeat a prompt; each prompt is evaluated once "
              f"({len(task.heldout)} held-out prompts)", file=sys.stderr)
    from rlcore.reward import probe

    if _confined.get() is not None:
        return  # the probe calls user code: `rlcore run` does it when the launch starts
    try:  # a reward that cannot score one right answer would train on zeros to the end
        probe(cfg.reward, task, reward_search_path(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_reward_model_path(cfg: ExperimentConfig, key: str, path: str, want: str | None = None) -> None:
    """A reward component's `path`: a trained reward-model folder, or a `kind: reward_model` experiment (trained
    on first use); with `want`, of that type (outcome or process). A policy folder is the usual mistake, said as
    such."""
    import json

    from rlcore.reward_model import MARKER

    p = cfg.resolve_path(path)
    check_inside(key, p)
    if p.suffix in (".yaml", ".yml"):
        got = named_experiment(cfg, key, path, "reward_model").reward_model.type
    elif not (p / MARKER).is_file():
        what = "a policy, not a reward model" if (p / "config.json").is_file() else "not a reward model folder"
        raise ConfigError(f"{key}: {path!r} is {what} (no {MARKER}; train one with kind: reward_model)")
    else:
        got = json.loads((p / MARKER).read_text()).get("type", "outcome")
    if want is not None and got != want:
        raise ConfigError(f"{key}: {path!r} is {'an' if got == 'outcome' else 'a'} {got} reward model; {key} takes "
                          f"{'an' if want == 'outcome' else 'a'} {want} one (reward_model.type: {want})")


def check_model_source(m: ModelConfig) -> None:
    """A local `name_or_path` must be a model directory (its config.json), caught here rather than as a tokenizer
    error after the run has been set up; a named source (rlcore.sources) must have its package installed."""
    if m.name_or_path is None:
        return
    from rlcore import sources

    if m.name_or_path in sources.SOURCES:
        try:
            sources.check(m.name_or_path)
        except sources.SourceUnavailable as e:
            raise ConfigError(f"model.name_or_path: {m.name_or_path!r} {e}") from None
        return
    p = Path(m.name_or_path).expanduser()
    check_inside("model.name_or_path", p)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"model.name_or_path: {m.name_or_path!r} is a file, not a model directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {m.name_or_path!r} is not a model directory (no config.json)")
    if not p.is_dir() and not m.allow_download:
        raise ConfigError(f"model.name_or_path: {m.name_or_path!r} is not a local directory "
                          "(set model.allow_download=true to fetch it)")
