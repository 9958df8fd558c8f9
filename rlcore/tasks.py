"""Tasks: a resumable stream of training problems, a fixed held-out set, and the task's own verifier.

A task is anything with this interface (`Task`); `make_task` picks one by `task.name`:
- `addition` (the default): prompt `A+B=`, target completion `C<eos>` with C = A + B, operands of
  `min_digits`..`max_digits` digits; reward 1 iff the completion (up to EOS) is exactly C and ended with EOS.
- `reasoning_gym`: any procedural generator of the reasoning-gym package, verified by its own `score_answer`.
- `dataset`: rows of local JSONL / Parquet / CSV files (Hugging Face `datasets`, no hub), shuffled per epoch.

Every stream saves and restores its position in O(1) (`state_dict`), so a resumed run draws exactly the problems an
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from rlcore.batch import Problem
from rlcore.config import AnyTaskConfig, ConfigError, DatasetTaskConfig, ReasoningGymTaskConfig, RunFailed, TaskConfig


class Stream(Protocol):
    """An endless iterator of training problems that knows its position."""

    position: int

    def __next__(self) -> Problem: ...

    def take(self, n: int) -> list[Problem]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    heldout: list[Problem]

    def stream(self, seed: int, state: dict | None = None) -> Stream: ...

    def verify(self, completion: str, answer: str, **info: Any) -> float:
        """The `task` reward component (see rlcore.reward for the signature)."""
        ...

    def bucket(self, problem: Problem) -> str:
        """The problem's difficulty bucket (curation estimates a pass rate per bucket)."""
        ...


class _Taking:
    def __iter__(self) -> Iterator[Problem]:
        return self

    def take(self, n: int) -> list[Problem]:
        return [next(self) for _ in range(n)]


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from several values: streams of different seeds (and the held-out set) never share a range of
    a generator that seeds item i with seed + i (reasoning-gym's do)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big") >> 1


# ------------------------------------------------------------------------------------------------ addition

class AdditionTask:
    infallible = True  # its verifier is a string comparison: reward/errors is not logged for it

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        rng = random.Random(cfg.heldout_seed)
        heldout: dict[tuple[int, int], None] = {}  # dict keeps insertion order, so the set is reproducible
        while len(heldout) < cfg.heldout_size:
            heldout[self._operands(rng)] = None
        self._heldout_pairs = set(heldout)
        self.heldout = [self._problem(a, b) for a, b in heldout]

    def _operands(self, rng: random.Random) -> tuple[int, int]:
        def number() -> int:
            digits = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
            low = 0 if digits == 1 else 10 ** (digits - 1)
            return rng.randint(low, 10**digits - 1)

        return number(), number()

    @staticmethod
    def _problem(a: int, b: int) -> Problem:
        return Problem(prompt=f"{a}+{b}=", answer=str(a + b))

    def stream(self, seed: int, state: dict | None = None) -> PromptStream:
        """Endless training problems for `seed`, never one from the held-out set; `state` (from
        `PromptStream.state_dict`, kept in a checkpoint) resumes it where it was, without replaying it."""
        out = PromptStream(self, seed)
        if state is not None:
            out.load_state_dict(state)
        return out

    def draw(self, rng: random.Random) -> Problem:
        """The next training problem from `rng` (held-out pairs are skipped)."""
        while True:
            a, b = self._operands(rng)
            if (a, b) not in self._heldout_pairs:
                return self._problem(a, b)

    @staticmethod
    def verify(completion: str, answer: str, finished: bool = True, **_: Any) -> float:
        """1.0 iff the completion is exactly the answer and the model ended it with EOS."""
        return float(finished and completion == answer)

    @staticmethod
    def prefix_right(partial: str, answer: str) -> bool:
        """A process label (lesson 17): the answer written so far can still become the right one, i.e. it is a
        prefix of it. The step that ends the answer (EOS) is labelled by `verify`."""
        return answer.startswith(partial)

    @staticmethod
    def bucket(problem: Problem) -> str:
        """Difficulty bucket: the operands' digit counts and how many columns carry, e.g. `3+2 c1`."""
        a, b = problem.prompt.rstrip("=").split("+")
        carries, carry = 0, 0
        for x, y in zip(reversed(a.zfill(len(b))), reversed(b.zfill(len(a))), strict=True):
            carry = int(int(x) + int(y) + carry >= 10)
            carries += carry
        return f"{len(a)}+{len(b)} c{carries}"


class PromptStream(_Taking):
    """A task's training prompts for one seed: an iterator that knows its position and can be saved and resumed.

    Resuming restores the generator's state (O(1)), not a replay of every prompt drawn so far; the prompts are the
    same ones, in the same order, as an uninterrupted run's.
    """

    def __init__(self, task: AdditionTask, seed: int):
        self.task, self.rng, self.position = task, random.Random(seed), 0

    def __next__(self) -> Problem:
        self.position += 1
        return self.task.draw(self.rng)

    def state_dict(self) -> dict:
        return {"position": self.position, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.rng.setstate(state["rng"])


# ------------------------------------------------------------------------------------------------ reasoning-gym

def reasoning_gym_dataset(cfg: ReasoningGymTaskConfig, seed: int, size: int):
    """Build the generator, turning reasoning-gym's errors (unknown name, unknown or invalid option) into a
    ConfigError naming the key."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError('task.name: reasoning_gym needs the reasoning-gym package: pip install -e ".[tasks]"') from None
    names = reasoning_gym.factory.DATASETS
    if cfg.dataset not in names:
        near = [n for n in sorted(names) if cfg.dataset.split("_")[0] in n][:6]
        hint = f" (similar: {', '.join(near)})" if near else f" ({len(names)} generators: reasoning_gym.factory.DATASETS)"
        raise ConfigError(f"task.dataset: unknown reasoning-gym generator {cfg.dataset!r}{hint}")
    try:
        return reasoning_gym.create_dataset(cfg.dataset, seed=seed, size=size, **cfg.config)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"task.config: {cfg.dataset} rejects it: {e or type(e).__name__}") from None


class ReasoningGymTask:
    """Training items are generator entries idx = 0, 1, ... of a seed derived from the run's seed (reasoning-gym
    seeds entry idx with seed + idx, so the position is the whole state); the held-out set is entries 0..N-1 of a
    seed derived from `heldout_seed`."""

    STREAM_SIZE = 2**31 - 1  # virtual: entries are generated on demand

    def __init__(self, cfg: ReasoningGymTaskConfig):
        self.cfg = cfg
        self._heldout_ds = reasoning_gym_dataset(cfg, derived_seed("heldout", cfg.heldout_seed), cfg.heldout_size)
        self.heldout = [self._problem(self._heldout_ds[i]) for i in range(cfg.heldout_size)]
        self._heldout_questions = {p.prompt for p in self.heldout}
        # A generator's space may be small: the held-out draws repeat, and a held-out set that covers the whole space
        # leaves the training stream (which skips held-out questions) nothing to draw: refused here, not spun on.
        drawn = len(self.heldout)
        self.heldout = distinct(self.heldout)
        self.heldout_duplicates = drawn - len(self.heldout)
        try:
            next(self.stream(0))
        except RunFailed:
            raise ConfigError(f"task.heldout_size: {cfg.dataset} made only {len(self.heldout)} distinct questions in "
                              f"{cfg.heldout_size} draws, and the training stream finds none outside them in "
                              f"{IndexStream.MAX_SKIPS} tries: the held-out set covers the generator's space (lower "
                              "heldout_size or widen task.config)") from None

    @staticmethod
    def _problem(entry: dict) -> Problem:
        return Problem(prompt=entry["question"], answer=str(entry["answer"]), meta=entry)

    def stream(self, seed: int, state: dict | None = None) -> IndexStream:
        ds = reasoning_gym_dataset(self.cfg, derived_seed("train", seed), self.STREAM_SIZE)
        out = IndexStream(lambda i: self._problem(ds[i]), skip=self._heldout_questions)
        if state is not None:
            out.load_state_dict(state)
        return out

    def verify(self, completion: str, answer: str, extracted: str | None = None, metadata: dict | None = None,
               **_: Any) -> float:
        """reasoning-gym's own `score_answer(extracted, entry)` (partial credit where the generator gives it)."""
        return float(self._heldout_ds.score_answer(answer=extracted, entry=metadata))

    @staticmethod
    def bucket(problem: Problem) -> str:
        """Difficulty bucket from the entry's metadata where the generator records terms and digits, else one."""
        meta = (problem.meta or {}).get("metadata", {})
        keys = [k for k in ("num_terms", "num_digits", "num_numbers") if k in meta]
        return " ".join(f"{k}={meta[k]}" for k in keys) or "all"


class IndexStream(_Taking):
    """Problems by index 0, 1, ...; those whose question is held out are skipped. State = the next index."""

    MAX_SKIPS = 10_000  # held-out questions in a row before the stream gives up: the generator has nothing else

    def __init__(self, item, skip: set[str]):
        self.item, self.skip, self.position, self.index = item, skip, 0, 0

    def __next__(self) -> Problem:
        for _ in range(self.MAX_SKIPS):
            p = self.item(self.index)
            self.index += 1
            if p.prompt not in self.skip:
                self.position += 1
                return p
        raise RunFailed(f"the task's training stream drew {self.MAX_SKIPS} held-out questions in a row at item "
                        f"{self.index}: every question it makes is held out (lower task.heldout_size)")

    def state_dict(self) -> dict:
        return {"position": self.position, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.index = state["position"], state["index"]


# ------------------------------------------------------------------------------------------------ local datasets

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_rows(path: Path, cfg: DatasetTaskConfig, key: str) -> list[Problem]:
    """A local file as problems, through `datasets` (no hub); every problem is a ConfigError naming the key.

    Prompts and answers are text: a CSV's `007` stays `007` and `0.50` stays `0.50` (no type inference, no `NA`
    turned into a missing value); a JSON number is read as that number (quote it to keep its spelling). An empty
    prompt or answer is refused: an empty answer would pay an empty completion in full."""
    if not path.is_file():
        raise ConfigError(f"task.{key}: no such file {str(path)!r}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"task.{key}: {path.name}: unknown file type (use {', '.join(_FORMATS)})")
    if fmt != "parquet":  # checked here: `datasets` logs its own error lines before raising on a bad byte
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise ConfigError(f"task.{key}: {path.name} is not UTF-8 text (byte 0x{data[e.start]:02x} on line "
                              f"{line}); save it as UTF-8") from None
    import datasets

    datasets.disable_progress_bars()
    options = {}
    if fmt == "csv":  # every prompt and answer as written, "" and "NA" included (refused or kept below)
        options = {"converters": {cfg.prompt_column: str, cfg.answer_column: str}, "keep_default_na": False}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **options)
    except Exception as e:  # noqa: BLE001 - a malformed file is the user's to see, on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"task.{key}: cannot read {path.name}: {first}") from None
    for col in ("prompt_column", "answer_column"):
        if getattr(cfg, col) not in ds.column_names:
            raise ConfigError(f"task.{col}: {getattr(cfg, col)!r} is not a column of {path.name} "
                              f"(columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise ConfigError(f"task.{key}: {path.name} has no rows")
    prompts, answers = ds[cfg.prompt_column], ds[cfg.answer_column]
    for i, (q, a) in enumerate(zip(prompts, answers, strict=True)):
        for col, v in ((cfg.prompt_column, q), (cfg.answer_column, a)):
            if v is None or not str(v).strip():
                raise ConfigError(f"task.{key}: {path.name} row {i}: empty {col} (every row needs a question and a "
                                  "reference answer)")
    rest = [c for c in ds.column_names if c not in (cfg.prompt_column, cfg.answer_column)]
    extra = {c: ds[c] for c in rest}
    return [Problem(prompt=str(q), answer=str(a), meta={c: extra[c][i] for c in rest})
            for i, (q, a) in enumerate(zip(prompts, answers, strict=True))]


def _key(problem: Problem) -> str:
    """What makes two rows the same problem: the prompt's text, surrounding whitespace aside."""
    return problem.prompt.strip()


def distinct(problems: list[Problem]) -> list[Problem]:
    """The first of each prompt (`_key`), in order: a held-out set counts each question once."""
    seen: dict[str, Problem] = {}
    for p in problems:
        seen.setdefault(_key(p), p)
    return list(seen.values())


class DatasetTask:
    """Training rows are visited epoch by epoch, each epoch a fresh seeded permutation (or file order); the
    held-out set is a file or a seeded fraction of the training file."""

    def __init__(self, cfg: DatasetTaskConfig, base_dir: Path = Path(".")):
        self.cfg = cfg
        rows = read_rows(resolve(cfg.train, base_dir), cfg, "train")
        if cfg.heldout is not None:
            held = read_rows(resolve(cfg.heldout, base_dir), cfg, "heldout")
            seen = {_key(p) for p in held}
            if overlap := sum(_key(r) in seen for r in rows):
                first = next(r.prompt for r in rows if _key(r) in seen)
                raise ConfigError(f"task.heldout: {overlap} of {len(rows)} training rows have a prompt of the held-out "
                                  f"file (first: {first[:60]!r}); the held-out set must be disjoint from training")
        else:
            # Split by distinct prompt, so a question written twice in the file cannot land on both sides.
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(rows):
                groups.setdefault(_key(r), []).append(i)
            keys = list(groups)
            random.Random(cfg.heldout_seed).shuffle(keys)
            n_held = max(1, round(cfg.heldout_frac * len(keys)))
            if n_held >= len(keys):
                raise ConfigError(f"task.heldout_frac: {cfg.heldout_frac} of {len(keys)} distinct prompts leaves none "
                                  "to train on")
            held_idx = {i for k in keys[:n_held] for i in groups[k]}
            held = [rows[i] for i in sorted(held_idx)]
            rows = [r for i, r in enumerate(rows) if i not in held_idx]
        # The held-out set counts each question once: a duplicate would weigh it twice in every eval figure.
        unique = distinct(held)
        self.heldout_duplicates = len(held) - len(unique)
        self.heldout = unique[: cfg.heldout_size]
        self.rows = rows

    def check_budget(self, steps: int, prompts_per_step: int) -> None:
        """task.epochs caps how many passes the run may make over the training rows."""
        need, have = steps * prompts_per_step, (self.cfg.epochs or 0) * len(self.rows)
        if self.cfg.epochs is not None and need > have:
            raise ConfigError(f"task.epochs: {steps} steps x {prompts_per_step} prompts need {need} problems, "
                              f"{self.cfg.epochs} epoch(s) of {len(self.rows)} training rows give {have}")

    def stream(self, seed: int, state: dict | None = None) -> EpochStream:
        out = EpochStream(self.rows, seed, self.cfg.shuffle)
        if state is not None:
            out.load_state_dict(state)
        return out

    @staticmethod
    def verify(completion: str, answer: str, extracted: str | None = None, **_: Any) -> float:
        """Exact match of the extracted answer and the reference, both stripped."""
        return float(extracted is not None and extracted.strip() == answer.strip())

    @staticmethod
    def bucket(problem: Problem) -> str:
        return "all"  # rows carry no difficulty the lab knows of


class EpochStream(_Taking):
    """Rows in epoch order. State = (epoch, index within the epoch): the permutation of an epoch is a function of
    (seed, epoch), so resuming recomputes it instead of storing it. An epoch that has handed out its last row moves
    to the next epoch before it is saved, so a resume at the boundary starts the next epoch, neither repeating nor
    skipping one."""

    def __init__(self, rows: list[Problem], seed: int, shuffle: bool):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.index, self.position = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(derived_seed("epoch", self.seed, epoch)).shuffle(order)
        return order

    def __next__(self) -> Problem:
        p = self.rows[self._order[self.index]]
        self.index, self.position = self.index + 1, self.position + 1
        if self.index == len(self.rows):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        return p

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch, self.index = state["position"], state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


def signal_density(pass_rates: list[float], k: int, low: float, high: float, explore: float) -> dict[str, float]:
    """Where the rollouts go, with and without a pass-rate filter (lesson 18a's control), for prompts drawn equally
    often from buckets with these true per-sample pass rates and exact estimates. A group of K is degenerate (zero
    reward variance, no gradient in GRPO) with probability z_b = p_b^K + (1 - p_b)^K.

    - none: every drawn prompt is rolled out; wasted = mean z_b.
    - curation: a bucket outside (low, high) is kept with probability `explore`; kept = mean keep_b, and
      wasted = sum keep_b z_b / sum keep_b among the groups rolled out.
    - dynamic sampling (DAPO): every group is rolled out and the degenerate ones dropped after; rollouts per
      informative group = 1 / (1 - mean z_b), so wasted = mean z_b, paid in generation."""
    z = [p**k + (1 - p) ** k for p in pass_rates]
    keep = [1.0 if low < p < high else explore for p in pass_rates]
    none = sum(z) / len(z)
    return {"none_wasted": none, "curation_kept": sum(keep) / len(keep),
            "curation_wasted": sum(a * b for a, b in zip(keep, z, strict=True)) / max(sum(keep), 1e-12),
            "dapo_rollouts_per_group": 1 / max(1 - none, 1e-12)}


def dapo_whole_rounds(z: float, batch: int, max_rounds: int) -> dict[str, float]:
    """DAPO's dynamic sampling as rlcore runs it (`algorithm.group_filter: nonzero_std`): each round rolls out a whole
    batch of `batch` prompts, the degenerate groups (each with probability z, independently) are dropped, and rounds
    go on until `batch` informative groups are in hand or `max_rounds` were drawn; the surplus of the last round is
    discarded too. So the waste is 1 - batch / (rounds x batch) when the batch fills, not the ideal z of
    `signal_density`: at z = 0.1 and 32 prompts one round fills the batch only 0.9^32 = 3 % of the time, and the
    second round's 29 spare groups are thrown away (about 50 % wasted; lesson 18a measured 49.6 %).
    Returns the expected rounds, the expected share of rolled-out groups discarded, and P(the batch stays short)."""
    from math import comb

    def p_enough(n: int) -> float:  # P(Binomial(n, 1 - z) >= batch)
        return sum(comb(n, i) * (1 - z) ** i * z ** (n - i) for i in range(batch, n + 1))

    rounds = waste = 0.0
    before = 0.0  # P(filled within the earlier rounds)
    for r in range(1, max_rounds + 1):
        now = p_enough(r * batch)
        rounds += r * (now - before)
        waste += (1 - 1 / r) * (now - before)
        before = now
    short = max(0.0, 1 - before)  # all rounds drawn, still short: kept every informative group, dropped the degenerate ones
    return {"rounds": rounds + max_rounds * short, "wasted": waste + z * short, "short": short}


class CuratedStream(_Taking):
    """A stream that skips prompts from difficulty buckets the policy always or never solves (lesson 18a).

    Each bucket's pass rate is an EMA over the groups observed in it (`observe`: a group passes in the share of its
    K completions whose reward is >= 1, the task's verdict). A prompt is kept if its bucket has been seen in fewer
    than `min_groups` groups, or its estimate is inside (low, high), or by the `explore` coin. `take(n)` draws until
    n are kept or n * max_draws were drawn, then fills with the skipped ones in draw order. The whole state (inner
    stream, estimates, coin) is in `state_dict`, so a resumed run makes the same choices.
    """

    def __init__(self, inner: Stream, bucket, cfg, seed: int):
        self.inner, self.bucket, self.cfg = inner, bucket, cfg
        self.rng = random.Random(derived_seed("curation", seed))
        self.rate: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.drawn = self.kept = 0

    @property
    def position(self) -> int:
        return self.inner.position

    def __next__(self) -> Problem:
        return self.take(1)[0]

    def keeps(self, problem: Problem) -> bool:
        b = self.bucket(problem)
        if self.seen.get(b, 0) < self.cfg.min_groups or self.cfg.low < self.rate[b] < self.cfg.high:
            return True
        return self.rng.random() < self.cfg.explore

    def take(self, n: int) -> list[Problem]:
        kept: list[Problem] = []
        skipped: list[Problem] = []
        while len(kept) < n and len(kept) + len(skipped) < n * self.cfg.max_draws:
            p = next(self.inner)
            (kept if self.keeps(p) else skipped).append(p)
        self.drawn += len(kept) + len(skipped)
        self.kept += len(kept)
        return kept + skipped[: n - len(kept)]

    def observe(self, problems: list[Problem], rewards: list[float], k: int) -> None:
        """Update the estimates from a step's global groups (problem i answered by rewards[i*k:(i+1)*k])."""
        for i, p in enumerate(problems):
            b = self.bucket(p)
            passed = sum(r >= 1.0 for r in rewards[i * k : (i + 1) * k]) / k
            old = self.rate.get(b, passed)
            self.rate[b] = passed if b not in self.seen else self.cfg.decay * old + (1 - self.cfg.decay) * passed
            self.seen[b] = self.seen.get(b, 0) + 1

    def metrics(self) -> dict[str, float]:
        """Share of drawn prompts kept so far, and buckets now skipped (trusted and outside the band)."""
        out = [b for b, r in self.rate.items() if self.seen[b] >= self.cfg.min_groups
               and not self.cfg.low < r < self.cfg.high]
        return {"curation/kept_frac": self.kept / max(self.drawn, 1), "curation/skipped_buckets": float(len(out))}

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "rng": self.rng.getstate(), "rate": dict(self.rate),
                "seen": dict(self.seen), "drawn": self.drawn, "kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.rng.setstate(state["rng"])
        self.rate, self.seen = dict(state["rate"]), dict(state["seen"])
        self.drawn, self.kept = state["drawn"], state["kept"]


def resolve(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def make_task(cfg: AnyTaskConfig, base_dir: Path = Path(".")) -> Task:
    if isinstance(cfg, ReasoningGymTaskConfig):
        return ReasoningGymTask(cfg)
    if isinstance(cfg, DatasetTaskConfig):
        return DatasetTask(cfg, base_dir)
    return AdditionTask(cfg)
