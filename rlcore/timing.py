"""Named phase timers that add into one dict per step (-> `timing/<phase>` seconds)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("rollout", "reward", "reference", "old_logprob", "values", "advantage", "update", "sync")


class PhaseTimer:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            import torch  # here, not at the top: the dashboard reads PHASES without loading torch (~1 s)

            if torch.cuda.is_available():  # GPU work is async: wait for it so the time lands in this phase
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out["timing/step"] = time.perf_counter() - self.start
        return out
