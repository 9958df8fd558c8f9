"""Verifiable tasks: a prompt stream, a fixed held-out set, and a reward function.

The default task is integer addition: prompt `A+B=`, target completion `C<eos>` with C = A + B, operands of
`min_digits`..`max_digits` digits. Reward is 1 iff the completion (up to EOS) is exactly C and ended with EOS.
"""

from __future__ import annotations

import random

from rlcore.batch import Problem
from rlcore.config import TaskConfig


class AdditionTask:
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
    def reward(completion: str, finished: bool, problem: Problem) -> float:
        """1.0 iff the completion is exactly the answer and the model ended it with EOS."""
        return float(finished and completion == problem.answer)


class PromptStream:
    """A task's training prompts for one seed: an iterator that knows its position and can be saved and resumed.

    Resuming restores the generator's state (O(1)), not a replay of every prompt drawn so far; the prompts are the
    same ones, in the same order, as an uninterrupted run's.
    """

    def __init__(self, task: AdditionTask, seed: int):
        self.task, self.rng, self.position = task, random.Random(seed), 0

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> Problem:
        self.position += 1
        return self.task.draw(self.rng)

    def take(self, n: int) -> list[Problem]:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"position": self.position, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.rng.setstate(state["rng"])


def make_task(cfg: TaskConfig) -> AdditionTask:
    return {"addition": AdditionTask}[cfg.name](cfg)
