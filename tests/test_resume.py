"""Runs that survive: SIGKILL + --resume is bit-identical to an uninterrupted run, a kill during a checkpoint write
leaves the previous one loadable, and the NaN guard skips updates then fails the run with where it happened."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlcore import checkpoint
from rlcore.loading import load_experiment
from rlcore.tracking import tracking_settings

CFG = ["trainer.steps=48", "trainer.checkpoint_every=4", "logging.eval_every=6", "logging.experiment=test-resume"]
VOLATILE = ("timing/", "perf/")  # wall-clock measurements differ between any two runs


def cli(lab: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "rlcore.cli", "run", "rl.yaml"]
    for o in CFG:
        args += ["--set", o]
    return args + list(extra)


def histories(c: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in c.get_run(run_id).data.metrics:
        if key.startswith(VOLATILE):
            continue
        out[key] = sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))
    return out


def test_sigkill_then_resume_is_bit_identical(lab: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(cli(lab, "--set", "logging.run_name=whole"), cwd=lab, capture_output=True, text=True,
                         env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_id = ref.stdout.split("MLflow run id:")[1].split()[0]

    victim = cli(lab, "--set", "logging.run_name=killed")
    proc = subprocess.Popen(victim, cwd=lab, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = load_experiment(lab / "rl.yaml", [*CFG, "logging.run_name=killed"])
    deadline = time.time() + 300
    target = random.choice(range(4, 41, 4))  # a random checkpoint; the kill lands within the few steps after it
    while (latest := checkpoint.find_latest(lab / "outputs", cfg.config_hash())) is None or \
            int(latest.stem.split("_")[1]) < target:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # (a timed sleep here let a fast machine finish all 48 steps first)
    assert proc.wait() == -signal.SIGKILL  # it was still running: really interrupted
    ckpt = checkpoint.find_latest(lab / "outputs", cfg.config_hash())
    killed_at = int(ckpt.stem.split("_")[1])
    assert killed_at < 48
    resumed = subprocess.run([*victim, "--resume"], cwd=lab, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpt}" in resumed.stdout
    run_id = resumed.stdout.split("MLflow run id:")[1].split()[0]
    assert ckpt.parent.parent.name == run_id  # the same MLflow run continued

    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_run(run_id).info.status == "FINISHED"
    a, b = histories(c, ref_id), histories(c, run_id)
    assert a.keys() == b.keys()
    for key in a:
        steps = [s for s, _ in b[key]]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        assert a[key] == b[key], key  # every step present, values bit-identical
    once = ("timing/startup", "timing/eval", "timing/checkpoint", "timing/save", "timing/total",
            "perf/cpu_s")  # not every step
    for key in (k for k in c.get_run(run_id).data.metrics if k.startswith(VOLATILE)):
        steps = [m.step for m in c.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        if key not in once:
            assert sorted(steps) == list(range(1, 49)), key
    startups = sorted(m.step for m in c.get_metric_history(run_id, "timing/startup"))
    assert startups == [0, killed_at]  # each process logs its start-up once, at the step it began from
    assert [m.step for m in c.get_metric_history(run_id, "timing/total")] == [48]
    w1 = load_file(lab / "outputs" / ref_id / "policy" / "model.safetensors")
    w2 = load_file(lab / "outputs" / run_id / "policy" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time, torch
        from rlcore import checkpoint
        base = {{"run_id": "r", "config_hash": "h", "reference": "x"}}
        checkpoint.save(__import__("pathlib").Path({str(tmp_path)!r}), 1, {{**base, "step": 1, "w": torch.ones(4)}}, keep=2)
        real = torch.save
        def slow(obj, f):  # write half a file, then hang: the test kills us here
            f.write(b"partial" * 1000); f.flush(); print("writing", flush=True); time.sleep(60)
        torch.save = slow
        checkpoint.save(__import__("pathlib").Path({str(tmp_path)!r}), 2, {{**base, "step": 2, "w": torch.zeros(4)}}, keep=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert list(tmp_path.glob(".tmp-*.pt"))  # the half-written file exists ...
    proc.kill()
    proc.wait()
    assert not (tmp_path / "step_000002.pt").exists()  # ... but never under a checkpoint's name
    latest = tmp_path / "step_000001.pt"
    state = checkpoint.load(latest)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001.json", "step_000001.pt"]


def test_nan_guard_skips_updates_then_fails_with_step_and_phase(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlcore.algorithm import POLICY_LOSSES
    from rlcore.controller import NonFiniteError, run

    real = POLICY_LOSSES["ppo_clip"]

    def poisoned(logp, inputs, cfg):
        loss, metrics = real(logp, inputs, cfg)
        return loss * float("nan"), metrics

    monkeypatch.setitem(POLICY_LOSSES, "ppo_clip", poisoned)
    cfg = load_experiment(lab / "rl.yaml", ["trainer.steps=6", "trainer.max_nonfinite=3",
                                            "logging.experiment=test-nan", "trainer.checkpoint_every=0"])
    with pytest.raises(NonFiniteError, match=r"3 steps in a row, last at step 3 \(phase: update\)"):
        run(cfg, root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    r = c.search_runs([c.get_experiment_by_name("test-nan").experiment_id])[0]
    assert r.info.status == "FAILED"
    skips = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "actor/nonfinite_skips"))
    assert skips[:2] == [(1, 1.0), (2, 1.0)]  # counted (step 3's metrics were never logged: the run stopped)
