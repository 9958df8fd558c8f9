"""Lessons: markdown files under lessons/ with a YAML front matter validated like experiments.

    ---
    id: "11"
    title: GRPO — drop the critic
    part: II
    force: estimator
    question: What replaces the critic?
    experiments: [grpo.yaml, ppo.yaml]      # under experiments/
    metrics: [eval/sampled_reward, kl/mean] # from rlcore.metrics.CATALOGUE
    look_for: GRPO matches PPO's reward without the critic's memory and time.
    ---
    body (markdown, $LaTeX$)
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from rlcore.config import ConfigError, _Section
from rlcore.loading import load_experiment, parse_yaml, read_text_file, validate_model
from rlcore.metrics import NAMED

PARTS = {"0": "Orientation", "I": "Part I — the framework", "II": "Part II — algorithms", "III": "Part III — production",
         "IV": "Part IV — the engineer", "V": "Part V — synthesis"}


def _known(value: list[str]) -> list[str]:
    unknown = [m for m in value if m not in NAMED]  # a lesson names catalogue entries, not a family's members
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (not in rlcore.metrics.CATALOGUE)")
    return value


class _Plan(_Section):
    """What `rlcore lesson NN` runs and the page charts: experiments x variants x seeds, with their metrics."""

    experiments: list[str] = Field(default_factory=list, description="Paired experiment files, relative to experiments/.")
    overrides: list[str] = Field(default_factory=list, description="`key=value` applied to every paired run (the "
                                 "lesson's budget: most lessons use 30 steps of 32 prompts; `rlcore lesson 01-14` prints the CPU time it took).")
    variants: list[list[str]] = Field(default_factory=lambda: [[]], description="Override sets; each experiment runs "
                                      "once per variant (e.g. beta = 0 / 0.04 / 0.2).")
    seeds: list[int] = Field(default_factory=lambda: [0], description="Seeds per (experiment, variant): >= 3 where the "
                             "effect is small.")
    metrics: list[str] = Field(default_factory=list, description="Metrics to chart beside the text.")
    versus: list[tuple[str, str]] = Field(default_factory=list, description="(y, x) metric pairs drawn against each "
                                          "other, one point a step; `sqrt:` before x draws its square root.")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        return _known(value)

    @field_validator("versus")
    @classmethod
    def _known_pairs(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        _known([m for pair in value for m in (pair[0], pair[1].removeprefix("sqrt:"))])
        return value


class Study(_Plan):
    """A second set of runs a page quotes (a table, a sweep) that the main plan's variants cannot make, because its
    experiments or its overrides are of their own: its runs are in `rlcore lesson NN` and its charts on the page.
    The lesson's own overrides do not apply to it (a study may use other kinds)."""

    name: str = Field(min_length=1, description="What it measures: the heading of its charts on the page.")
    experiments: list[str] = Field(min_length=1, description="Experiment files, relative to experiments/.")


class LessonMeta(_Plan):
    id: str = Field(pattern=r"^\d\d[a-z]?$", description="Two digits (plus a letter for sub-lessons): 00, 11, 18a.")
    title: str = Field(min_length=1)
    part: Literal["0", "I", "II", "III", "IV", "V"]
    force: Literal["signal", "estimator", "cost", "all"] = Field(description="Which of the three forces it is about.")
    question: str = Field(min_length=1, description="The question the lesson answers.")
    look_for: str = Field("", description="What the reader should see in the paired runs' charts.")
    studies: list[Study] = Field(default_factory=list, description="Further runs the page quotes, each with its own "
                                 "experiments, overrides, variants and seeds.")

    def blocks(self) -> list[Study]:
        """The main plan (as a study named "paired runs") and every study: what `rlcore lesson` runs and the page
        draws."""
        if not self.experiments:
            return list(self.studies)
        main = Study(name="paired runs", experiments=self.experiments, overrides=self.overrides,
                     variants=self.variants, seeds=self.seeds, metrics=self.metrics, versus=self.versus)
        return [main, *self.studies]


@dataclass
class Lesson:
    meta: LessonMeta
    body: str
    path: Path


def parse(path: Path) -> Lesson:
    text = read_text_file(path, "lesson file")
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        raise ConfigError(f"{path}: missing front matter (a YAML block between '---' lines at the top)")
    head, _, body = text[4:].partition("\n---")
    raw = parse_yaml(head, f"{path}: front matter")
    try:
        meta = validate_model(LessonMeta, raw, "front matter")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return Lesson(meta, body.lstrip("\n"), path)


def load_all(root: Path) -> list[Lesson]:
    """Every lessons/NN-*.md in order."""
    return [parse(p) for p in sorted((root / "lessons").glob("[0-9][0-9]*.md"))]


SOURCE = re.compile(r"^<!-- source: ([\w.]+) -->$", re.M)


def source_of(dotted: str) -> str:
    """The source text of `module.function` (or class), read from the code the lab runs."""
    parts = dotted.split(".")
    if parts[0] != "rlcore":
        raise ConfigError(f"source: {dotted!r} is not a function or class of rlcore")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix is the module (rlcore.trainer.Trainer.update)
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
            return textwrap.dedent(inspect.getsource(obj)).rstrip()
        except (AttributeError, TypeError, OSError):
            break
    raise ConfigError(f"source: {dotted!r} is not a function or class of rlcore")


def render(body: str) -> str:
    """The body as the dashboard shows it: each `<!-- source: rlcore.x.f -->` line becomes f's code, read from the
    module at render time, so the formula above it and the code beside it cannot drift apart (Spinning Up's
    layout). On GitHub the comment stays invisible and the page reads the same without it."""
    return SOURCE.sub(lambda m: f"```python\n# {m.group(1)}\n{source_of(m.group(1))}\n```", display_math(body))


DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.DOTALL)
FENCE = re.compile(r"(^```.*?^```)", re.DOTALL | re.MULTILINE)


def display_math(body: str) -> str:
    """Every `$$ ... $$` as a block of its own: `$$`, the formula, `$$` on separate lines, blank lines around.
    Streamlit's markdown (remark-math) reads a `$$` that shares a line with text as inline math, so a formula over
    several lines failed in KaTeX, and a continuation line starting with `+` became a list item that swallowed the
    rest of the page. Code fences are left alone."""
    parts = FENCE.split(body)
    for i in range(0, len(parts), 2):  # even parts are outside code fences
        parts[i] = DISPLAY.sub(lambda m: "\n\n$$\n" + m.group(1).strip() + "\n$$\n\n", parts[i])
    return "".join(parts)


def check(lesson: Lesson, root: Path) -> None:
    """Every paired experiment exists under experiments/ and validates, and every source line names real code (a
    ConfigError names the first that fails)."""
    for dotted in SOURCE.findall(lesson.body):
        try:
            source_of(dotted)
        except ConfigError as e:
            raise ConfigError(f"{lesson.path}: {e}") from None
    for f in dict.fromkeys(f for b in lesson.meta.blocks() for f in b.experiments):
        path = root / "experiments" / f
        if not path.is_file():
            raise ConfigError(f"{lesson.path}: experiments: no such file experiments/{f}")
        try:
            load_experiment(path)
        except ConfigError as e:
            raise ConfigError(f"{lesson.path}: experiments: {f}: {e}") from None


@dataclass
class SharedRun:
    """One run of a multi-lesson plan: identical resolved configs from several lessons are run once."""

    file: str
    overrides: list[str]  # without the lesson tags
    lessons: list[str]
    variant: str


def merged_plan(lessons: list[Lesson], root: Path) -> list[SharedRun]:
    """The runs of several lessons, each distinct resolved config once, tagged with every lesson that pairs it.

    Same config and seed give the same numbers (everything is seeded), so running lesson 01's GRPO run again for
    lessons 04, 07 and 11 would only spend CPU. Configs are compared after resolution, so `algorithm.kl_coef=0.04`
    (the default) and no override are the same run.
    """
    out: dict[str, SharedRun] = {}
    for lesson in lessons:
        for f, overrides in planned_runs(lesson):
            plain = [o for o in overrides if not o.startswith("logging.tags.")]
            key = load_experiment(root / "experiments" / f, plain).config_hash()
            if key in out:
                if lesson.meta.id not in out[key].lessons:
                    out[key].lessons.append(lesson.meta.id)
                continue
            variant = next(o.split("=", 1)[1].strip("'") for o in overrides if o.startswith("logging.tags.variant="))
            out[key] = SharedRun(f, plain, [lesson.meta.id], variant)
    return list(out.values())


def select(lessons: list[Lesson], spec: str) -> list[Lesson]:
    """Lessons named by `spec`: an id (`3`, `03`), a range (`01-14`), a comma list of either, or `all`."""
    ids = [x.meta.id for x in lessons]
    if spec == "all":
        return list(lessons)
    chosen: list[str] = []
    for part in spec.split(","):
        lo, dash, hi = (x.strip() for x in part.strip().partition("-"))
        if not lo or (dash and not hi):
            raise ConfigError(f"lesson {spec!r}: an empty lesson number (expected 03, 01-14, 01,03 or all)")
        lo, hi = lo.zfill(2), (hi or lo).zfill(2)
        if lo not in ids or hi not in ids:
            missing = lo if lo not in ids else hi
            raise ConfigError(f"lesson {missing!r}: no lessons/{missing}-*.md")
        if ids.index(lo) > ids.index(hi):
            raise ConfigError(f"lesson {part.strip()!r}: a reversed range (did you mean {hi}-{lo}?)")
        chosen += [i for i in ids[ids.index(lo):ids.index(hi) + 1] if i not in chosen]
    return [x for x in lessons if x.meta.id in chosen]


def variant_label(block: Study, file: str, variant: list[str]) -> str:
    """What tells this line of a block's charts from the others: the experiment (when the block pairs several)
    and the variant's overrides with their section dropped (`kl_coef=0.2`), e.g. `grpo · kl_coef=0.2`."""
    m = block
    parts = [Path(file).stem] if len(m.experiments) > 1 or len(m.variants) == 1 else []
    if len(m.variants) > 1:
        parts.append(", ".join(o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] for o in variant)
                     or "base")
    return " · ".join(parts)


def plan_groups(lesson: Lesson, root: Path, block: Study | None = None) -> dict[str, str]:
    """MLflow `rlcore.group` (config without seed and logging) -> line label, for every (experiment, variant) of the
    lesson's main plan, or of one of its blocks (`LessonMeta.blocks`). The dashboard finds a lesson's runs by config,
    not by tag: a run made for another lesson, or by hand, with the same config is the same run; a run of an older
    plan is not this lesson's any more."""
    block = block or next(iter(lesson.meta.blocks()), None)
    out: dict[str, str] = {}
    if block is None:
        return out
    for f in block.experiments:
        for variant in block.variants:
            cfg = load_experiment(root / "experiments" / f, [*block.overrides, *variant])
            out.setdefault(cfg.seed_group(), variant_label(block, f, variant))
    return out


def planned_runs(lesson: Lesson) -> list[tuple[str, list[str]]]:
    """(experiment file, overrides) of every run `rlcore lesson NN` makes, the main plan's and every study's, tagged
    with the lesson and its variant."""
    out = []
    for block in lesson.meta.blocks():
        for f in block.experiments:
            for variant in block.variants:
                label = variant_label(block, f, variant)
                for seed in block.seeds:
                    tags = [f"logging.tags.lesson='{lesson.meta.id}'", f"logging.tags.variant='{label}'"]
                    out.append((f, [*block.overrides, *variant, f"seed={seed}", *tags]))
    return out
