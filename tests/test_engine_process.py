"""The rollout engine in a process of its own (issue 21, lessons 19 and 22c): separate mode samples exactly what the
colocated engine samples, async mode exactly what the deterministic staleness simulation samples, a checkpoint taken
with batches in flight resumes bit for bit, a corrupted push is caught by the engine's checksum, and kill -9 of the
engine fails the run cleanly and `--resume` finishes it with nothing lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlcore import checkpoint
from rlcore.loading import load_experiment
from rlcore.tracking import tracking_settings

BASE = ["logging.num_samples=0", "logging.experiment=test-engine"]
TRAINING = ("reward/mean", "actor/loss", "actor/pg_loss", "kl/mean", "actor/entropy", "mismatch/kl_k3")


def hist(lab: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def test_separate_samples_what_colocated_samples(lab: Path) -> None:
    """The same weights, prompts and noise in another process give the same batches, so the same run, bit for bit
    (held-out evaluation too); the engine's side is measured: its generation time and each role's idle share."""
    from rlcore.controller import run

    base = [*BASE, "trainer.steps=3", "logging.eval_every=3"]
    here = run(load_experiment(lab / "rl.yaml", base), root=lab)
    there = run(load_experiment(lab / "rl.yaml", [*base, "rollout.mode=separate"]), root=lab)
    for key in ("reward/mean", "actor/loss", "kl/mean"):
        assert hist(lab, there.run_id, key) == hist(lab, here.run_id, key), key
    assert there.last_eval == here.last_eval
    assert [v for _, v in hist(lab, there.run_id, "rollout/staleness")] == [0, 0, 0]
    assert all(v > 0 for _, v in hist(lab, there.run_id, "engine/generate_s"))
    assert all(0 < v < 1 for _, v in hist(lab, there.run_id, "idle/trainer"))
    assert all(v > 10 for _, v in hist(lab, there.run_id, "sync/verified_tensors"))
    assert not hist(lab, here.run_id, "engine/generate_s")  # a colocated run has no engine process to measure
    engine_cpu = hist(lab, there.run_id, "perf/engine_cpu_s")
    assert len(engine_cpu) == 1 and engine_cpu[0][1] > sum(v for _, v in hist(lab, there.run_id, "engine/generate_s"))


def test_async_equals_the_staleness_simulation_and_resumes_with_batches_in_flight(lab: Path) -> None:
    """async with max_staleness 2 samples batch j with update j - 3, as rollout.staleness: 2 does in one process: the
    training numbers agree bit for bit. Held-out evaluation does not: async evaluates the trainer's weights, the
    simulation its engine's older copy. A run stopped at step 4 (batches 5 and 6 already sampled) resumes exactly."""
    from rlcore.controller import run

    base = [*BASE, "trainer.steps=6", "logging.eval_every=2", "trainer.checkpoint_every=2",
            "algorithm.behaviour_correction=tis_token"]
    sim = run(load_experiment(lab / "rl.yaml", [*base, "rollout.staleness=2"]), root=lab)
    cfg = load_experiment(lab / "rl.yaml", [*base, "rollout.mode=async", "rollout.max_staleness=2"])
    whole = run(cfg, root=lab)
    assert [v for _, v in hist(lab, whole.run_id, "rollout/staleness")] == [0, 1, 2, 2, 2, 2]
    for key in TRAINING:
        assert hist(lab, whole.run_id, key) == hist(lab, sim.run_id, key), key
    assert whole.first_eval == sim.first_eval  # step 0: both engines hold the start weights
    assert whole.last_eval != sim.last_eval  # step 6: the trainer's weights against the engine's of update 4

    stopped = run(cfg, root=lab, on_eval=lambda step, _m: step >= 4)
    assert stopped.steps_done == 4
    ckpt = next(p for p, rid in checkpoint.candidates(lab / "outputs", cfg.config_hash()) if rid == stopped.run_id)
    resumed = run(cfg, root=lab, resume=ckpt)
    assert resumed.run_id == stopped.run_id
    for key in (*TRAINING, "rollout/staleness"):
        assert hist(lab, resumed.run_id, key)[-2:] == hist(lab, whole.run_id, key)[-2:], key


def test_a_corrupted_push_to_the_engine_process_fails_the_run(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One element changed on the way to the engine process: the engine's checksum differs from the trainer's, the
    run stops FAILED naming the tensor."""
    import rlcore.engine_process as ep
    from rlcore.config import RunFailed
    from rlcore.controller import run

    def corrupting(weights: dict) -> dict:
        name = next(n for n, t in weights.items() if t.dim() == 2 and t.shape[0] == t.shape[1])
        bad = weights[name].clone()
        bad.view(-1)[7] += 1.0
        return {**weights, name: bad}

    monkeypatch.setattr(ep, "wire", corrupting)
    with pytest.raises(RunFailed, match=r"weight-sync: model\.layers\.\S+ differs on the rollout engine process"):
        run(load_experiment(lab / "rl.yaml", [*BASE, "trainer.steps=2", "rollout.mode=separate",
                                               "logging.run_name=corrupt"]), root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    bad = c.search_runs([c.get_experiment_by_name("test-engine").experiment_id], "tags.mlflow.runName = 'corrupt'")
    assert bad[0].info.status == "FAILED"


def engine_pid(trainer_pid: int) -> int | None:
    """The engine process among the trainer's children (multiprocessing's spawn_main; not its resource tracker)."""
    for task in Path(f"/proc/{trainer_pid}/task").glob("*"):
        for pid in (task / "children").read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd:
                return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the engine process through Linux /proc")
def test_kill_9_of_the_engine_fails_the_run_and_resume_finishes_it(lab: Path) -> None:
    """kill -9 of the engine process mid-run: the trainer exits 1 with one error line naming the engine, the run is
    FAILED; --resume continues from the last checkpoint in the same MLflow run, every step once, and the numbers are
    those of an uninterrupted run."""
    from rlcore.controller import run

    # 30 steps, not 10: on a fast CPU ten steps finished before the poll below saw the step-2 checkpoint
    sets = [*BASE, "trainer.steps=30", "trainer.checkpoint_every=2", "logging.eval_every=5",
            "rollout.mode=async", "rollout.max_staleness=1"]
    whole = run(load_experiment(lab / "rl.yaml", [*sets, "logging.run_name=whole"]), root=lab)
    args = [sys.executable, "-m", "rlcore.cli", "run", "rl.yaml"]
    for s in [*sets, "logging.run_name=victim"]:
        args += ["--set", s]
    env = {**os.environ, "RLCORE_THREADS": "1", "RLCORE_NO_BAR": "1"}
    proc = subprocess.Popen(args, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cfg = load_experiment(lab / "rl.yaml", [*sets, "logging.run_name=victim"])
    deadline = time.time() + 300
    while (latest := checkpoint.find_latest(lab / "outputs", cfg.config_hash())) is None or \
            int(latest.stem.split("_")[1]) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    pid = engine_pid(proc.pid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and f"the rollout engine process (pid {pid}) was killed by SIGKILL" in lines[0], err[-2000:]
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    victim = c.search_runs([c.get_experiment_by_name("test-engine").experiment_id], "tags.mlflow.runName = 'victim'")
    assert victim[0].info.status == "FAILED"
    ckpt = checkpoint.find_latest(lab / "outputs", cfg.config_hash())
    assert int(ckpt.stem.split("_")[1]) < 30

    resumed = subprocess.run([*args, "--resume"], cwd=lab, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpt}" in resumed.stdout
    run_id = victim[0].info.run_id
    assert c.get_run(run_id).info.status == "FINISHED"
    assert "rlcore.failure" not in c.get_run(run_id).data.tags  # the failure it was resumed from is history
    assert "left no checkpoint" not in resumed.stderr
    for key in (*TRAINING, "rollout/staleness", "eval/sampled_reward"):
        steps = [s for s, _ in hist(lab, run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        assert hist(lab, run_id, key) == hist(lab, whole.run_id, key), key


def test_lookahead_reads_ahead_but_not_past_the_run_and_saves_the_untrained_position() -> None:
    """Depth 3 over a 4-step run: step 1 submits steps 1-3, each later step one more, and nothing after step 4. The
    stream's saved position is that of the first prompts not yet trained on."""
    from rlcore.config import TaskConfig
    from rlcore.engine_process import Lookahead
    from rlcore.tasks import AdditionTask

    stream = AdditionTask(TaskConfig(heldout_size=4)).stream(seed=0)
    sent: list[list] = []
    ahead = Lookahead(stream, 2, 3, sent.append, steps=4)
    first = ahead.take(2)
    assert len(sent) == 3 and first is sent[0]
    assert ahead.position == 2 and stream.position == 6  # trained on 2 prompts; the engine has 6
    assert ahead.take(2) is sent[1] and len(sent) == 4
    ahead.take(2)
    ahead.take(2)
    assert len(sent) == 4 and ahead.position == stream.position == 8  # nothing sampled for a step that won't come


def test_a_failure_inside_the_engine_process_is_one_line_for_the_trainer(lab: Path) -> None:
    """An exception in the engine process comes back as the run's failure, one line naming it (the traceback goes
    to stderr); the process has exited."""
    from rlcore.config import RunFailed
    from rlcore.controller import build_for
    from rlcore.rollout import Sampling

    loop = build_for(load_experiment(lab / "rl.yaml", [*BASE, "rollout.mode=separate"]), lab)
    try:
        with pytest.raises(RunFailed, match=r"^the rollout engine process failed: AttributeError: 'NoneType' object "
                                            r"has no attribute 'prompt' \(its traceback is above\)$"):
            loop.engine.generate([None], 2, Sampling(4))
        loop.engine.proc.join(timeout=10)
        assert loop.engine.proc.exitcode == 0
    finally:
        loop.engine.close()
