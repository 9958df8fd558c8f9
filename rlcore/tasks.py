"""Verifiable tasks: a prompt stream, a fixed held-out set, and a reward function.

The default task is integer addition: prompt `A+B=`, target completion `C<eos>` with C = A + B, operands of
`min_digits`..`max_digits` digits. Reward is 1 iff the completion (up to EOS) is exactly C and ended with EOS.
"""

from __future__ import annotations

import random

import torch

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

    def stream(self, seed: int):
        """Endless training problems for `seed`, never one from the held-out set."""
        rng = random.Random(seed)
        while True:
            a, b = self._operands(rng)
            if (a, b) not in self._heldout_pairs:
                yield self._problem(a, b)

    @staticmethod
    def reward(completion: str, finished: bool, problem: Problem) -> float:
        """1.0 iff the completion is exactly the answer and the model ended it with EOS."""
        return float(finished and completion == problem.answer)


def score(task: AdditionTask, batch) -> torch.Tensor:
    """The reward role: sequence rewards [B] for a RolloutBatch's decoded completions."""
    triples = zip(batch.answers, batch.finished.tolist(), batch.problems, strict=True)
    return torch.tensor([task.reward(c, f, p) for c, f, p in triples])


def make_task(cfg: TaskConfig) -> AdditionTask:
    return {"addition": AdditionTask}[cfg.name](cfg)
