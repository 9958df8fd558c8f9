"""Thread choice: the cores the load leaves free, and the same numbers whatever the choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlcore import threads
from rlcore.config import ConfigError
from rlcore.controller import run
from rlcore.loading import load_experiment


@pytest.mark.parametrize("cores,load,want", [
    (2, 0.1, 2),  # idle: every core
    (2, 1.2, 1),  # one busy process: the other core
    (2, 2.0, 1),  # two busy processes (the case): one thread, never 2 fighting them
    (2, 7.5, 1),  # overloaded: still one
    (16, 3.6, 12),
])
def test_threads_take_the_cores_the_load_leaves(cores: int, load: float, want: int) -> None:
    n, why = threads.choose(cores=cores, load=load, env={})
    assert n == want and f"{cores} cores, load {load:.1f}" == why


def test_an_explicit_thread_count_wins_and_a_bad_one_is_refused() -> None:
    assert threads.choose(cores=2, load=0.0, env={"RLCORE_THREADS": "3"}) == (3, "RLCORE_THREADS=3")
    assert threads.choose(cores=2, load=0.0, env={"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS=1")
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="RLCORE_THREADS: expected a thread count >= 1"):
            threads.choose(env={"RLCORE_THREADS": bad})


def test_the_same_config_gives_the_same_bits_at_1_and_2_threads(lab: Path) -> None:
    weights = {}
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res = run(load_experiment(lab / "rl.yaml", ["trainer.steps=4", f"logging.run_name=threads-{n}",
                                                        "logging.experiment=test-threads"]), root=lab)
            weights[n] = (load_file(res.output_dir / "model.safetensors"), res.last_eval)
    finally:
        torch.set_num_threads(before)
    (w1, e1), (w2, e2) = weights[1], weights[2]
    assert e1 == e2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
