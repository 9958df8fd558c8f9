"""Reward functions that cannot work, for the bad-input corpus: each must be refused by `rlcore validate`."""

import time


def one_argument(completion):  # the lab calls fn(completion, answer, **info)
    return 1.0


def returns_text(completion, answer, **info):
    return "1"


def returns_nothing(completion, answer, **info):
    return None


def returns_huge(completion, answer, **info):
    return 1e39  # finite in float64, inf in float32


def returns_nan(completion, answer, **info):
    return float("nan")


def always_raises(completion, answer, **info):
    raise KeyError("no such field")


def hangs(completion, answer, **info):
    time.sleep(60)
    return 1.0


def returns_list(completion, answer, **info):
    return [1.0]


NOT_CALLABLE = 3
