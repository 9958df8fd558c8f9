"""Optuna, through one door: the calls on a study's storage that Optuna's public API does not offer and the sweep
needs (marking a dead worker's trial failed and interrupted, reading attributes fresh from a shared storage, a
heartbeat written from another thread). Checked against Optuna 5.0.0 (`Study._storage`, `Trial._trial_id`,
`Study._study_id`); when Optuna changes them, this file is the one place to change.
"""

from __future__ import annotations

import threading
import time
from typing import Any


def set_trial_attr(study, trial, key: str, value: Any) -> None:
    """Set a user attribute on a trial (a live `Trial` or a `FrozenTrial` of any worker)."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def fail_trial(study, trial) -> None:
    """Mark another worker's RUNNING trial FAIL (study.tell only takes this process's own trials)."""
    from optuna.trial import TrialState

    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def trial_attr(study, trial, key: str) -> Any:
    """A trial's user attribute as the storage has it now (not a cached copy)."""
    return study._storage.get_trial(trial._trial_id).user_attrs.get(key)


def study_attr(study, key: str) -> Any:
    """A study's user attribute as the storage has it now (another launcher may have written it)."""
    return study._storage.get_study_user_attrs(study._study_id).get(key)


def heartbeat(study, trial, every_s: float) -> threading.Event:
    """Refresh the trial's `heartbeat` attribute every `every_s` in the background until the event is set (how
    workers on other machines tell a trial is alive)."""
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            set_trial_attr(study, trial, "heartbeat", time.time())
            done.wait(every_s)

    threading.Thread(target=beat, name="optuna-heartbeat", daemon=True).start()
    return done
