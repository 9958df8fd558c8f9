"""The shipped warm start: RL starts from its exact bits on every machine; a damaged copy is never used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from rlcore.evaluation import evaluate
from rlcore.loading import load_experiment
from rlcore.model import build_policy
from rlcore.rollout import RolloutEngine
from rlcore.sft import MANIFEST, cache_dir, find_shipped, sha256, warm_start_dir
from rlcore.tasks import make_task
from rlcore.tracking import tracking_settings
from tests.conftest import write_lab

REPO = Path(__file__).resolve().parents[1]


def test_the_default_warm_start_ships_and_is_intact() -> None:
    sft = load_experiment(REPO / "experiments" / "sft.yaml")
    shipped = find_shipped(sft, REPO, quiet=True)
    assert shipped is not None, "experiments/sft.yaml changed without `rlcore run experiments/sft.yaml --ship`"
    meta = json.loads((shipped / MANIFEST).read_text())
    # every RL experiment naming sft.yaml gets exactly these bits, whatever this machine would build
    rl = load_experiment(REPO / "experiments" / "grpo.yaml")
    assert warm_start_dir(rl, REPO, quiet=True) == shipped
    # the figures in the manifest are what the shipped weights score now
    model, tok = build_policy(rl.model, shipped)
    got = evaluate(RolloutEngine(model, tok, seed=0), make_task(rl.task), rl)
    # (another CPU may round a near-tie differently: a prompt or two of 512, a thousandth of the probability)
    assert abs(got["eval/greedy_accuracy"] - meta["heldout"]["eval/greedy_accuracy"]) <= 2 / 512, (got, meta)
    assert abs(got["eval/sampled_reward"] - meta["heldout"]["eval/sampled_reward"]) < 1e-3, (got, meta)


def test_a_shipped_copy_is_used_without_building_and_a_damaged_one_never(tmp_path: Path) -> None:
    root = write_lab(tmp_path)
    out = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", "sft.yaml", "--ship"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    shipped = root / "warm_starts" / "sft"
    assert f"shipped to {shipped}" in out.stdout
    meta = json.loads((shipped / MANIFEST).read_text())
    assert meta["files"]["model.safetensors"] == sha256(shipped / "model.safetensors")
    assert set(meta["heldout"]) == {"eval/greedy_accuracy", "eval/sampled_reward"}

    sft = load_experiment(root / "sft.yaml")
    shutil.rmtree(root / ".rlcore_cache" / "warm_start")  # a fresh clone: nothing built on this machine
    rl = load_experiment(root / "rl.yaml")
    assert warm_start_dir(rl, root, quiet=True) == shipped
    assert not cache_dir(sft, root).exists()  # nothing was trained

    weights = shipped / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    assert warm_start_dir(rl, root) == cache_dir(sft, root)  # built here instead, with a warning
    assert (cache_dir(sft, root) / "model.safetensors").is_file()


def test_an_rl_run_records_which_weights_it_started_from(lab: Path, tmp_path: Path) -> None:
    from rlcore.controller import run

    res = run(load_experiment(lab / "rl.yaml", ["trainer.steps=1", "logging.experiment=test-ws-tags"]), root=lab)
    tags = MlflowClient(tracking_settings(lab)["tracking_uri"]).get_run(res.run_id).data.tags
    ws = warm_start_dir(load_experiment(lab / "rl.yaml"), lab, quiet=True)
    assert tags["warm_start.source"] == "built here"
    assert tags["warm_start.sha256"] == sha256(ws / "model.safetensors")[:16]


def test_two_processes_needing_one_warm_start_build_it_once(tmp_path: Path) -> None:
    """The second process waits for the first one's build (a file lock) instead of training the same weights."""
    root = tmp_path / "lab"
    root.mkdir()
    write_lab(root)
    code = ("from pathlib import Path; from rlcore.loading import load_experiment; from rlcore.sft import "
            "warm_start_dir; print(warm_start_dir(load_experiment(Path('rl.yaml')), Path('.')))")
    env = {**os.environ, "RLCORE_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    time.sleep(2.0)  # the first holds the lock by now (it takes it before importing torch's model code)
    procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0].strip().splitlines()[-1] == outs[1].strip().splitlines()[-1]  # the same directory
    assert sum("warm start: training" in o for o in outs) == 1, outs
    client = MlflowClient(tracking_settings(root)["tracking_uri"])
    exp = client.get_experiment_by_name("test-warm-start")
    assert len(client.search_runs([exp.experiment_id])) == 1  # one SFT run, not two
