"""A reward module whose top level exits (as a script would): importing it must be refused, not exit validate 0."""
import sys

sys.exit(0)


def score(completion, answer, **info):
    return 1.0
