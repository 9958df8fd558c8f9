"""An example of your own reward function, named in an experiment as `fn: my_rewards:digit_credit`.

Every reward function has one signature: it gets the completion text and the reference answer, and keyword
arguments it may use or ignore (`extracted`, `finished`, `prompt`, `metadata`: the row's other columns, `tag`, and
the component's `params`). It returns a float. If it raises or returns NaN for a sample, that sample scores 0 for
this component and `reward/errors` counts it; the run goes on.
"""


def digit_credit(completion: str, answer: str, extracted: str | None = None, **info) -> float:
    """Partial credit: the share of the answer's digits that the completion has right, aligned from the right
    (units with units, tens with tens), and 0 when the lengths differ. A denser signal than exact match while the
    policy still gets the carries wrong."""
    got = (extracted if extracted is not None else completion).strip()
    if not got.isdigit() or len(got) != len(answer):
        return 0.0
    return sum(g == a for g, a in zip(reversed(got), reversed(answer), strict=True)) / len(answer)


def carry_bonus(completion: str, answer: str, metadata: dict | None = None, bonus: float = 1.0, **info) -> float:
    """`bonus` for a right answer to a problem with a carry (the `carry` column of the data file), else 0."""
    carried = bool((metadata or {}).get("carry"))
    return bonus if carried and completion.strip() == answer else 0.0
