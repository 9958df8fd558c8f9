"""Reward functions that pass the validation probe (their first call) and then misbehave: tests/test_trust.py."""

import sys
import time

CALLS = {"broken": 0, "one_hang": 0, "hang_after_probe": 0}


def broken_after_probe(completion: str, answer: str, **info) -> float:
    CALLS["broken"] += 1
    if CALLS["broken"] > 1:
        raise RuntimeError("the grader's service is down")
    return 1.0


def hangs_once(completion: str, answer: str, **info) -> float:
    """The first call made while scoring a training step (not the probe, not the held-out eval) hangs; every other
    call scores exactly."""
    training = any(f.f_code.co_name == "score" for f in _frames())
    if training:
        CALLS["one_hang"] += 1
        if CALLS["one_hang"] == 1:
            time.sleep(600)
    return float(completion == answer)


def _frames():
    f = sys._getframe(1)
    while f is not None:
        yield f
        f = f.f_back


def hangs_after_probe(completion: str, answer: str, **info) -> float:
    CALLS["hang_after_probe"] += 1
    if CALLS["hang_after_probe"] > 1:
        while True:  # a grader stuck for good: only a signal ends it
            time.sleep(1)
    return 1.0
