"""A reward function that fails on some samples (tests/test_workloads.py): raises on odd answers, NaN for 'nan'."""

import math


def flaky(completion: str, answer: str, **info) -> float:
    if completion.strip() == "nan":
        return math.nan
    if int(answer) % 2:
        raise ValueError(f"odd answer {answer}")
    return 1.0
