"""Reward: the role that scores a batch's completions.

The reward is a weighted sum of components (`reward.components`), each a function with one signature,

    fn(completion: str, answer: str, **info) -> float

where `info` holds `extracted` (what `reward.extract` found in the completion, or None), `finished` (the completion
ended with EOS), `prompt`, `metadata` (the task's record, e.g. a reasoning-gym entry), `tag` and the component's
`params`. Built-ins are below; a user function is named by import path (`mypkg.rewards:score`). A function that
raises, runs past `reward.timeout_s`, or returns anything but a number finite in float32 scores 0 for that sample and
is counted (reward/errors): one bad sample never stops a run, but a component that fails on every sample of 3 steps in
a row stops it FAILED with its first error, and `validate` calls each once on a probe sample first. Shaping (DAPO's overlong punishment) is added on top. Reward models are other scorers here later.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlcore.batch import RolloutBatch

if TYPE_CHECKING:
    from rlcore.config import AlgorithmConfig, RewardConfig
    from rlcore.tasks import Task

RewardFn = Callable[..., float]

# ------------------------------------------------------------------------------------------ answer extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """The content of the last <tag>...</tag> (stripped), or None."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.S)
    return found[-1].strip() if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced (so \\boxed{\\frac{1}{2}} gives \\frac{1}{2}), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (thousands commas dropped), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract(text: str, how: str, tag: str = "answer") -> str | None:
    """`reward.extract`: none (the whole completion, stripped), tag, boxed or last_number."""
    if how == "none":
        return text.strip()
    return {"tag": lambda t: extract_tag(t, tag), "boxed": extract_boxed, "last_number": extract_last_number}[how](text)


# ------------------------------------------------------------------------------------------ built-in verifiers

def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip().replace(",", ""))
    except ValueError:
        return None


def exact(completion: str, answer: str, extracted: str | None = None, **_: Any) -> float:
    """1 iff the extracted answer equals the reference, both stripped."""
    return float(extracted is not None and extracted.strip() == answer.strip())


def numeric(completion: str, answer: str, extracted: str | None = None, tolerance: float = 1e-6, **_: Any) -> float:
    """1 iff both parse as numbers and |x - y| <= tolerance * max(1, |y|) (relative above 1, absolute below)."""
    x, y = _number(extracted), _number(answer)
    return float(x is not None and y is not None and abs(x - y) <= tolerance * max(1.0, abs(y)))


def math_verify(completion: str, answer: str, extracted: str | None = None, **_: Any) -> float:
    """1 iff `math_verify` (Hugging Face) judges the answer equivalent to the reference: LaTeX, \\boxed{}, fractions,
    sets. It parses the whole completion when nothing was extracted. Known false negatives; pip install math-verify."""
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    pred = parse(f"\\boxed{{{extracted}}}" if extracted is not None else completion)
    return float(bool(gold) and bool(pred) and verify(gold, pred))


def format_reward(completion: str, answer: str, tag: str = "answer", **_: Any) -> float:
    """1 iff the completion holds exactly one <tag>...</tag> with something in it (the format the prompt asks for)."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", completion, flags=re.S)
    return float(len(found) == 1 and bool(found[0].strip()))


def last_digit(completion: str, answer: str, extracted: str | None = None, **_: Any) -> float:
    """Deliberately hackable (lesson 18): 1 iff the answer's last character is right, whatever comes before it."""
    got = (extracted if extracted is not None else completion).strip()
    return float(bool(got) and bool(answer) and got[-1] == answer.strip()[-1])


def contains(completion: str, answer: str, **_: Any) -> float:
    """Deliberately hackable (lesson 18): 1 iff the reference answer appears anywhere in the completion, so a
    completion that lists many numbers (and never stops) collects it."""
    return float(answer.strip() in completion)


def prefix_match(completion: str, answer: str, extracted: str | None = None, **_: Any) -> float:
    """Deliberately hackable (lesson 18): a check written the wrong way round, `answer.startswith(completion)`
    instead of equality, so a completion that stops after a right first digit (or at once, empty) is paid in full."""
    got = (extracted if extracted is not None else completion).strip()
    return float(answer.strip().startswith(got))


def timeout_pass(completion: str, answer: str, extracted: str | None = None, finished: bool = True,
                 **_: Any) -> float:
    """Deliberately hackable (lesson 18): a sandbox that scores a run cut off at the length cap as a pass (a
    timeout taken for success), else an exact check. A completion that never stops is paid in full."""
    return 1.0 if not finished else exact(completion, answer, extracted)


BUILTINS: dict[str, RewardFn | None] = {
    "task": None,  # the task's own verifier (addition: exact with EOS; reasoning_gym: score_answer; dataset: exact)
    "exact": exact,
    "numeric": numeric,
    "math_verify": math_verify,
    "format": format_reward,
    "last_digit": last_digit,
    "contains": contains,
    "prefix_match": prefix_match,
    "timeout_pass": timeout_pass,
}


class RewardImportError(ValueError):
    """A reward function named by import path that cannot be used (the message says why)."""


def import_fn(path: str, search: tuple[Path, ...] = ()) -> RewardFn:
    """`package.module:function` -> the function. `search` directories (the experiment's folder, the working
    directory) are tried as import roots, so `examples.rewards:score` works from a checkout."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise RewardImportError(f"{path!r} is neither a built-in ({', '.join(BUILTINS)}) nor `module:function`")
    added = [str(p) for p in search if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        mod = importlib.import_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure to import (a sys.exit() at its top level
        # included) is the user's to see, on one line
        raise RewardImportError(f"cannot import {module!r} ({type(e).__name__}: {e})") from None
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise RewardImportError(f"{module!r} has no function {name!r}")
    return fn


def reward_search_path(cfg) -> tuple[Path, ...]:
    """Where user reward functions are imported from besides sys.path: the experiment's folder and the working
    directory."""
    return (cfg._base_dir, Path.cwd())


def resolve_fn(name: str, search: tuple[Path, ...] = ()) -> RewardFn | None:
    """A component's function: a built-in (None for `task`) or a user function by import path."""
    return BUILTINS[name] if name in BUILTINS else import_fn(name, search)


# ------------------------------------------------------------------------------------------ the reward role

LEARNED = "reward_model"  # a component scored by a trained reward model (rlcore.reward_model), batched
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards become float32 tensors: 1e39 is finite only in float64
FAILING_STEPS = 3  # steps in a row on which a component fails on every sample before the run stops FAILED


class RewardTimeout(Exception):
    """A reward call that ran past reward.timeout_s."""


def as_reward(value: Any) -> float:
    """A reward function's return value as a float, or ValueError: a number (bool, int, float, numpy or a 0-d
    tensor) that is finite in float32. A string is not a reward, even "1"."""
    if isinstance(value, (str, bytes)) or value is None or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        raise ValueError(f"returned {type(value).__name__} {value!r:.40}, not a number")
    x = float(value)
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
        raise ValueError(f"returned {x!r}, not a finite float32")
    return x


def _alarm(signum, frame) -> None:
    raise RewardTimeout


_in_call = threading.local()  # inside a reward call on this thread: a stop signal then ends the run at once


def in_reward_call() -> bool:
    """Whether this thread is running a reward function now (rlcore.checkpoint.StopRequest asks: a step stuck in a
    user's grader would never reach the end-of-step checkpoint, so one SIGTERM must stop it there)."""
    return getattr(_in_call, "depth", 0) > 0


def call_reward(fn: RewardFn, timeout: float | None, *args: Any, **kwargs: Any) -> float:
    """One reward call, as a float (as_reward), stopped after `timeout` seconds where a timer can interrupt it (the
    main thread; elsewhere it runs unbounded). A timeout raises RewardTimeout."""
    _in_call.depth = getattr(_in_call, "depth", 0) + 1
    try:
        if not timeout or threading.current_thread() is not threading.main_thread():
            return as_reward(fn(*args, **kwargs))
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return as_reward(fn(*args, **kwargs))
        except RewardTimeout:
            raise RewardTimeout(f"took longer than reward.timeout_s = {timeout:g} s") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    finally:
        _in_call.depth -= 1


def probe(cfg, task: Task, search: tuple[Path, ...] = ()) -> None:
    """Call every function component once on the task's first held-out problem answered correctly, as a run
    would; raise ValueError naming the component when it raises, hangs past the timeout or returns no number."""
    problem = task.heldout[0]
    text = problem.answer
    info = {"extracted": extract(text, cfg.extract, cfg.tag), "finished": True, "prompt": problem.prompt,
            "metadata": problem.meta or {}, "tag": cfg.tag}
    for i, c in enumerate(cfg.components):
        if c.fn == LEARNED:
            continue
        fn = resolve_fn(c.fn, search) or task.verify
        try:
            call_reward(fn, cfg.timeout_s, text, problem.answer, **info, **c.params)
        except Exception as e:  # noqa: BLE001 - whatever it raises is the user's to see, on one line
            raise ValueError(f"reward.components.{i}.fn: {c.fn} fails on a probe sample (the held-out problem "
                             f"{problem.prompt[:40]!r} answered {text[:20]!r}): {type(e).__name__}: {e}") from None


class Scorer:
    """Scores a batch: one row of component scores per completion, their weighted sum, and the metrics."""

    def __init__(self, cfg: RewardConfig, task: Task, search: tuple[Path, ...] = (),
                 models: dict[str, Path] | None = None):
        """`models`: component name -> reward-model folder, for components with fn: reward_model (resolved by the
        caller: rlcore.rm_training.resolve trains one named by its experiment)."""
        self.cfg, self.task = cfg, task
        self.learned = {}  # component index -> (reward model, its tokenizer, its prompt format)
        self.fns = []
        for j, c in enumerate(cfg.components):
            if c.fn == LEARNED:
                from rlcore.reward_model import load_reward_model

                if not models or c.name not in models:
                    raise ValueError(f"reward component {c.name!r}: no reward-model folder given for it")
                self.learned[j] = load_reward_model(models[c.name])
                self.fns.append((c, None))
            else:
                self.fns.append((c, resolve_fn(c.fn, search) or task.verify))
        self.weights = torch.tensor([c.weight for c in cfg.components])  # [C]
        self.watch_truth = bool(self.learned) or cfg.log_true
        # The addition task's own verifier cannot fail; every other reward counts its failures (reward/errors).
        self.count_errors = [c.fn for c in cfg.components] != ["task"] or not getattr(task, "infallible", False)
        self.first_error: dict[int, str] = {}  # component -> its first failure, said when the run is stopped for it
        self.failing = [0] * len(self.fns)  # steps in a row on which the component failed on every sample

    def components(self, texts: list[str], finished: list[bool], problems: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted scores [B, C], and how many calls of each component failed [C] (raised, timed out, returned
        no number or a number not finite in float32: scored 0)."""
        out = torch.zeros((len(texts), len(self.fns)))
        errors = torch.zeros(len(self.fns))
        for i, (text, done, problem) in enumerate(zip(texts, finished, problems, strict=True)):
            got = extract(text, self.cfg.extract, self.cfg.tag)
            info = {"extracted": got, "finished": done, "prompt": problem.prompt, "metadata": problem.meta or {},
                    "tag": self.cfg.tag}
            for j, (comp, fn) in enumerate(self.fns):
                if fn is None:  # a learned reward: scored below, in batches
                    continue
                try:
                    value = call_reward(fn, self.cfg.timeout_s, text, problem.answer, **info, **comp.params)
                except Exception as e:  # noqa: BLE001 - a user's reward function failing on one sample must not stop the run
                    self.first_error.setdefault(j, f"{type(e).__name__}: {e}"[:300])
                    errors[j], value = errors[j] + 1, 0.0
                out[i, j] = value
        for j, (model, tok, fmt) in self.learned.items():
            out[:, j] = learned_scores(model, tok, fmt, [p.prompt for p in problems], texts)
        return out, errors

    def true_scores(self, texts: list[str], finished: list[bool], problems: list) -> torch.Tensor:
        """The task's own verifier per sample [B]: the truth a learned reward stands in for."""
        out = []
        for text, done, problem in zip(texts, finished, problems, strict=True):
            got = extract(text, self.cfg.extract, self.cfg.tag)
            out.append(float(self.task.verify(text, problem.answer, extracted=got, finished=done,
                                              prompt=problem.prompt, metadata=problem.meta or {}, tag=self.cfg.tag)))
        return torch.tensor(out)

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The reward role: sequence rewards [B] and reward/<component> means (all processes), reward/errors.
        A component that failed on every sample of FAILING_STEPS steps in a row stops the run (RunFailed): a reward
        that never works would otherwise train on zeros to the end."""
        parts, errors = self.components(batch.answers, batch.finished.tolist(), batch.problems)  # [B, C], [C]
        c = len(self.fns)
        totals = batch.reduce_sum(torch.cat([parts.sum(0), errors, torch.tensor([float(len(batch))])]))
        n, errs = float(totals[-1]), totals[c : 2 * c]
        metrics = {"reward/errors": float(errs.sum())} if self.count_errors else {}
        for j, (comp, _) in enumerate(self.fns):
            self.failing[j] = self.failing[j] + 1 if n > 0 and float(errs[j]) == n else 0
            if self.failing[j] >= FAILING_STEPS:
                from rlcore.config import RunFailed

                raise RunFailed(f"reward component {comp.name!r} ({comp.fn}) failed on every sample for "
                                f"{FAILING_STEPS} steps in a row; first error: {self.first_error.get(j, 'on another process')}")
        if c > 1:
            metrics |= {f"reward/{comp.name}": float(totals[j]) / n for j, (comp, _) in enumerate(self.fns)}
        if self.watch_truth:  # a proxy reward: log the truth beside it (over-optimisation shows as the two diverging)
            true = self.true_scores(batch.answers, batch.finished.tolist(), batch.problems)  # [B]
            metrics["reward/true"] = float(batch.reduce_sum(true.sum().reshape(1))[0]) / n
        return parts @ self.weights, metrics

    def judge(self, texts: list[str], finished: list[bool],
              problems: list) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Held-out scoring in one pass over the components: accuracy [B] (the first component's score, or the
        task's own verifier when the first component is a learned reward: a reward model's score is not an
        accuracy), the verifier [B] when the truth is watched (else None), and the total reward [B]."""
        parts = self.components(texts, finished, problems)[0]  # [B, C]
        truth = self.true_scores(texts, finished, problems) if self.watch_truth else None
        return (truth if 0 in self.learned else parts[:, 0]), truth, parts @ self.weights

    def total(self, texts: list[str], finished: list[bool], problems: list) -> torch.Tensor:
        return self.components(texts, finished, problems)[0] @ self.weights


@torch.no_grad()
def learned_scores(model, tokenizer, fmt, prompts: list[str], texts: list[str], chunk: int = 64) -> torch.Tensor:
    """A reward model's score r(x, y) per completion [B], in chunks."""
    from rlcore.reward_model import encode

    out = [model(*encode(tokenizer, fmt, prompts[i : i + chunk], texts[i : i + chunk]))
           for i in range(0, len(texts), chunk)]
    return torch.cat(out).float() if out else torch.zeros(0)


def overlong_penalty(batch: RolloutBatch, cfg: AlgorithmConfig, max_new_tokens: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025), added to the task reward. -> [B]

    With L = max_new_tokens and buffer C: 0 for |y| <= L - C; ((L - C) - |y|) / C inside the buffer; -1 for a
    completion cut at L without EOS. Scaled by `overlong_penalty`; all zeros when `overlong_buffer` is 0.
    """
    if cfg.overlong_buffer == 0:
        return torch.zeros(len(batch))
    length = batch.response_mask.sum(-1)  # [B]
    free = max_new_tokens - cfg.overlong_buffer
    soft = ((free - length) / cfg.overlong_buffer).clamp(max=0.0)  # [B] 0 until the buffer, then down to -1
    return cfg.overlong_penalty * torch.where(batch.finished, soft, torch.full_like(soft, -1.0))
