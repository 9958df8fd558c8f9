"""The time model of lessons 19 and 22c (rlcore.topology), by hand: the sum and the max, each role's idle share, and
the clip fraction of a ratio taken against a stale sampler."""

from __future__ import annotations

import pytest

from rlcore.topology import gaussian_clip_fraction, stale_clip_fraction, step_time


def test_step_time_by_hand() -> None:
    colocated = step_time("colocated", 0.2, 0.5, 0.1)
    assert colocated.step_s == pytest.approx(0.8) and colocated.trainer_idle == colocated.engine_idle == 0
    separate = step_time("separate", 0.2, 0.5, 0.1)
    assert separate.step_s == pytest.approx(0.8)
    assert separate.trainer_idle == pytest.approx(0.25) and separate.engine_idle == pytest.approx(0.625)
    assert step_time("async", 0.2, 0.5, 0.1, staleness=0) == separate  # max_staleness 0 is separate
    overlapped = step_time("async", 0.2, 0.5, 0.1, staleness=2)
    assert overlapped.step_s == pytest.approx(0.6)  # the longer role: train + sync
    assert overlapped.trainer_idle == pytest.approx(0.0) and overlapped.engine_idle == pytest.approx(0.4 / 0.6)
    slow_engine = step_time("async", 0.9, 0.5, 0.1)
    assert slow_engine.step_s == pytest.approx(0.9) and slow_engine.trainer_idle == pytest.approx(0.3 / 0.9)
    assert overlapped.steps_per_hour == pytest.approx(6000)
    with pytest.raises(ValueError, match="unknown 'pipelined'"):
        step_time("pipelined", 1, 1)


def test_clip_fraction_models() -> None:
    assert stale_clip_fraction(0.01, 0) == 0 and stale_clip_fraction(0.01, 1) == pytest.approx(0.01)
    assert stale_clip_fraction(0.01, 2) == pytest.approx(1 - 0.99**2)  # clipped by either update
    assert gaussian_clip_fraction(0.0) == 0
    # sigma = sqrt(2 * 0.02) = 0.2: 1/2 P(Z > log 1.2 / 0.2) + 1/2 P(Z < log 0.8 / 0.2)
    assert gaussian_clip_fraction(0.02) == pytest.approx(0.5 * 0.1810 + 0.5 * 0.1323, abs=2e-4)
