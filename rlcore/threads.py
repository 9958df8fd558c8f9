"""How many threads torch may use, chosen once per process from the cores this process may run on and how busy
they are.

torch's default is one thread per core. On a machine that other work keeps busy, those threads contend with it:
every parallel region waits for its slowest thread, so a step can cost several times its idle cost (measured on
2 cores with 2 busy processes: see `bench/threads.py`). So rlcore takes only the cores the 1-minute load average
leaves free (at least one). The numbers do not depend on the choice: on CPU the same config gives the same bits at
1 and 2 threads (`tests/test_threads.py`). `RLCORE_THREADS` (or `OMP_NUM_THREADS`) sets it explicitly.
"""

from __future__ import annotations

import os
import sys

from rlcore.config import ConfigError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose(cores: int | None = None, load: float | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(threads, why). `load` is the 1-minute load average: runnable processes, this one not yet among them."""
    env = os.environ if env is None else env
    for var in ("RLCORE_THREADS", "OMP_NUM_THREADS"):
        text = env.get(var)
        if text:
            try:
                n = int(text)
            except ValueError:
                n = 0
            if not 1 <= n <= 4096:
                raise ConfigError(f"{var}: expected a thread count >= 1, got {text!r}")
            return n, f"{var}={n}"
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    free = cores - int(load + 0.5)  # a process that ran most of the last minute counts as one busy core
    n = max(1, min(cores, free))
    return n, f"{cores} cores, load {load:.1f}"


_chosen: str | None = None  # what apply() decided, for the run to say


def apply() -> int:
    """Choose and set torch's thread count for this process (once, before any work)."""
    import torch

    global _chosen
    n, why = choose()
    torch.set_num_threads(n)
    _chosen = f"torch threads: {n} ({why}; RLCORE_THREADS sets it)"
    return n


_said = False


def describe() -> str:
    """The line a run prints about its threads."""
    import torch

    return _chosen or f"torch threads: {torch.get_num_threads()} (torch's default; RLCORE_THREADS sets it)"


def say_once() -> None:
    """Print `describe()` to stderr the first time a process starts a run (a lesson plan's later runs keep quiet)."""
    global _said
    if not _said:
        print(describe(), file=sys.stderr, flush=True)
        _said = True
