"""No number moves: short fixed runs of every preset and a warm start, compared bit for bit with tests/golden/.

Each preset's own YAML (its algorithm section, its KL and clip settings) is run for 3 steps from a tiny warm start
built here (32 wide, 1-digit sums; the agentic one also writes tool traces), with small batches so the whole file
takes seconds. Every logged metric but the wall-clock ones (timing/*, perf/*) is compared, and the SFT run's
weights by their sha256. A refactor that should change nothing must leave this file green.

Record anew (only when a change is *meant* to move numbers, and say so in the commit):
    RLCORE_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py

Bit-identity holds for the CPU, torch and transformers that recorded the file (it says which); elsewhere float
rounding may differ, so the comparison there allows a relative 1e-3 and says why.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch
import transformers
from mlflow.tracking import MlflowClient

from rlcore.controller import run
from rlcore.loading import load_experiment
from rlcore.sft import sha256, warm_start_dir
from rlcore.tracking import tracking_settings
from tests.conftest import write_lab

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "metrics.json"
PRESETS = ["grpo", "ppo", "rloo", "dapo", "drgrpo", "reinforce", "agentic_calculator"]
VOLATILE = ("timing/", "perf/")
TINY = ["task.min_digits=1", "task.max_digits=1", "task.heldout_size=16", "task.eval_samples=2",
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "trainer.steps=3", "trainer.micro_batch_size=16",
        "logging.eval_every=2", "logging.samples_every=2", "logging.num_samples=2", "trainer.checkpoint_every=0"]
SFT = """\
kind: sft
model:
  tiny: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 32}
task: {min_digits: 1, max_digits: 1, heldout_size: 16, tool: TOOL, sft_tool_frac: FRAC}
trainer: {steps: 150, lr: 1.0e-2, warmup_steps: 10, sft_batch_size: 64}
logging: {experiment: golden-warm-start}
"""


def machine() -> dict[str, str]:
    from rlcore.sft import _cpu_name

    return {"cpu": _cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def history(c: MlflowClient, run_id: str) -> dict[str, list[list]]:
    out = {}
    for key in sorted(c.get_run(run_id).data.metrics):
        if not key.startswith(VOLATILE):
            out[key] = [[m.step, float(m.value).hex()] for m in sorted(c.get_metric_history(run_id, key),
                                                                       key=lambda m: m.step)]
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    root = write_lab(tmp_path_factory.mktemp("golden"))
    (root / "sft.yaml").write_text(SFT.replace("TOOL", "none").replace("FRAC", "0.0"))
    (root / "sft_tool.yaml").write_text(SFT.replace("TOOL", "calculator").replace("FRAC", "0.5"))
    c = MlflowClient(tracking_settings(root)["tracking_uri"])
    out: dict = {"machine": machine(), "runs": {}}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in PRESETS:
            ws = root / ("sft_tool.yaml" if name == "agentic_calculator" else "sft.yaml")
            cfg = load_experiment(REPO / "experiments" / f"{name}.yaml",
                                  [f"model.warm_start={ws}", *TINY, f"logging.experiment=golden-{name}"])
            res = run(cfg, root=root)
            out["runs"][name] = history(c, res.run_id)
        for name in ("sft.yaml", "sft_tool.yaml"):
            d = warm_start_dir(load_experiment(REPO / "experiments" / "grpo.yaml", [f"model.warm_start={root / name}"]),
                               root, quiet=True)
            out["runs"][f"warm start {name}"] = {"sha256": sha256(d / "model.safetensors")}
    finally:
        torch.set_num_threads(before)
    exp = c.get_experiment_by_name("golden-warm-start")
    sft_runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    for r, name in zip(sft_runs, ("sft.yaml", "sft_tool.yaml"), strict=True):
        out["runs"][f"warm start {name}"] |= history(c, r.info.run_id)
    return out


def test_every_preset_and_the_warm_start_reproduce_the_recorded_numbers(measured: dict) -> None:
    if os.environ.get("RLCORE_RECORD_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert set(golden["runs"]) == set(measured["runs"]) == {*PRESETS, "warm start sft.yaml", "warm start sft_tool.yaml"}
    exact = golden["machine"] == measured["machine"]
    for name, want in golden["runs"].items():
        got = measured["runs"][name]
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for key, series in want.items():
            if key == "sha256":
                if exact:
                    assert got[key] == series, f"{name}: the warm start's weights changed"
                continue
            steps = [s for s, _ in series]
            assert [s for s, _ in got[key]] == steps, (name, key)
            for (step, a), (_, b) in zip(series, got[key], strict=True):
                va, vb = float.fromhex(a), float.fromhex(b)
                if exact:
                    assert va == vb or (math.isnan(va) and math.isnan(vb)), f"{name} {key} step {step}: {va!r} -> {vb!r}"
                else:  # another CPU or library version: rounding may differ, nothing else may
                    assert math.isclose(va, vb, rel_tol=1e-3, abs_tol=1e-6), f"{name} {key} step {step}: {va} -> {vb}"
