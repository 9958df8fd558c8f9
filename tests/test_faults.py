"""Faults: a kill at any moment, a truncated file, an outage across a kill, an impossible sweep point, weights that
blow up, one extreme token. Each loses nothing, doubles nothing, and says what happened."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlcore import checkpoint, cli
from rlcore.algorithm import POLICY_LOSSES, kl_estimate
from rlcore.batch import LossInputs
from rlcore.config import AlgorithmConfig, ConfigError
from rlcore.controller import run
from rlcore.loading import load_experiment
from rlcore.tracking import Tracker, tracking_settings

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RLCORE_NO_BAR": "1"}


def client(lab: Path) -> MlflowClient:
    return MlflowClient(tracking_settings(lab)["tracking_uri"])


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["rlcore", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def runs_of(lab: Path, experiment: str):
    c = client(lab)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


def start_cli(lab: Path, *sets: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "rlcore.cli", "run", "rl.yaml"]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=lab, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()  # never leave a 5000-step run behind a failed test
            proc.wait()
            raise AssertionError("the run ended or stalled before the fault")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ --resume

def test_resume_never_reopens_a_finished_run(lab: Path, capsys, monkeypatch) -> None:
    sets = ["trainer.steps=3", "trainer.checkpoint_every=1", "logging.experiment=faults-finished"]
    res = run(load_experiment(lab / "rl.yaml", sets), root=lab)
    c = client(lab)
    assert c.get_run(res.run_id).info.status == "FINISHED"
    assert list((lab / "outputs" / res.run_id / "checkpoints").glob("step_*.pt"))  # its checkpoints are still there
    before = len(c.get_metric_history(res.run_id, "reward/mean"))
    monkeypatch.chdir(lab)
    code, _, err = run_cli(["run", "rl.yaml", "--resume", *[x for s in sets for x in ("--set", s)]], capsys, monkeypatch)
    assert code == 2 and "no checkpoint of an unfinished run" in err, err
    assert c.get_run(res.run_id).info.status == "FINISHED"
    assert len(c.get_metric_history(res.run_id, "reward/mean")) == before == 3


def test_resume_closes_a_run_killed_before_its_first_checkpoint(lab: Path, capsys, monkeypatch) -> None:
    sets = ["trainer.steps=5000", "trainer.checkpoint_every=4000", "logging.experiment=faults-orphan"]
    proc = start_cli(lab, *sets)
    wait_for(lambda: any(r.data.metrics.get("reward/mean") is not None for r in runs_of(lab, "faults-orphan")), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    (victim,) = runs_of(lab, "faults-orphan")
    assert victim.info.status == "RUNNING"  # what kill -9 leaves: nobody closed it
    monkeypatch.chdir(lab)
    code, _, err = run_cli(["run", "rl.yaml", "--resume", *[x for s in sets for x in ("--set", s)]], capsys, monkeypatch)
    assert code == 2 and "no checkpoint of an unfinished run" in err
    assert f"run {victim.info.run_id}: its process is gone" in err
    after = client(lab).get_run(victim.info.run_id)
    assert after.info.status == "KILLED" and "killed" in after.data.tags["rlcore.failure"]


def test_resume_after_kill_9_says_it_resumes_and_the_finished_run_keeps_no_failure(lab: Path, capsys,
                                                                                 monkeypatch) -> None:
    """kill -9 after a checkpoint: --resume closes nothing as 'left no checkpoint' (it resumes that very run), and
    the run it finishes carries no rlcore.failure tag from the kill."""
    sets = ["trainer.steps=40", "trainer.checkpoint_every=2", "logging.experiment=faults-kill9-resume"]
    cfg = load_experiment(lab / "rl.yaml", sets)
    proc = start_cli(lab, *sets)
    wait_for(lambda: len(checkpoint.candidates(lab / "outputs", cfg.config_hash())) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    (victim,) = runs_of(lab, "faults-kill9-resume")
    monkeypatch.chdir(lab)
    code, out, err = run_cli(["run", "rl.yaml", "--resume", *[x for s in sets for x in ("--set", s)]], capsys,
                             monkeypatch)
    assert code == 0, err
    assert "left no checkpoint" not in err and "resuming from" in out
    after = client(lab).get_run(victim.info.run_id)
    assert after.info.status == "FINISHED" and "rlcore.failure" not in after.data.tags


@pytest.fixture(scope="module")
def stopped(lab: Path):
    """A run stopped by SIGTERM after a few checkpoints (KILLED, resumable): (config, its checkpoint dir)."""
    sets = ["trainer.steps=5000", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3",
            "logging.experiment=faults-stopped"]
    cfg = load_experiment(lab / "rl.yaml", sets)
    proc = start_cli(lab, *sets)
    wait_for(lambda: len(checkpoint.candidates(lab / "outputs", cfg.config_hash())) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    (r,) = runs_of(lab, "faults-stopped")
    assert r.info.status == "KILLED"
    return cfg, lab / "outputs" / r.info.run_id / "checkpoints"


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(stopped, lab: Path, capsys, monkeypatch) -> None:
    cfg, ckpt_dir = stopped
    newest, previous = sorted(ckpt_dir.glob("step_*.pt"))[-1], sorted(ckpt_dir.glob("step_*.pt"))[-2]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy cut short
    try:
        monkeypatch.chdir(lab)
        chosen = cli.choose_checkpoint(cfg, lab)
        err = capsys.readouterr().err
        assert chosen == previous
        assert f"warning: {newest} is truncated or corrupt; trying the previous checkpoint" in err
        assert checkpoint.load(chosen)["step"] == int(previous.stem.split("_")[1])
    finally:
        newest.write_bytes(data)


def test_a_kill_during_a_checkpoint_write_leaves_no_temp_file(stopped, lab: Path, capsys, monkeypatch) -> None:
    cfg, ckpt_dir = stopped
    orphan = ckpt_dir / ".tmp-abc123.pt"  # what kill -9 between the write and the rename leaves
    orphan.write_bytes(b"half a checkpoint")
    monkeypatch.chdir(lab)
    cli.choose_checkpoint(cfg, lab)  # the next start of this run
    assert not orphan.exists()
    orphan.write_bytes(b"half a checkpoint")
    state = checkpoint.load(sorted(ckpt_dir.glob("step_*.pt"))[-1])
    checkpoint.save(ckpt_dir, 999_999, state, keep=10)  # the next save
    assert not orphan.exists() and not list(ckpt_dir.glob(".tmp-*"))
    (ckpt_dir / "step_999999.pt").unlink()
    (ckpt_dir / "step_999999.json").unlink()


# ------------------------------------------------------------------------------------------------ outage + kill

def test_outage_kill_resume_delivers_each_point_exactly_once(lab: Path, monkeypatch) -> None:
    """Steps 0-2 reach the store; 3-5 are buffered during an outage; the process dies (kill -9: no finish); the run
    resumes from its checkpoint at step 2 and replays 3-6 with the same values. Each (metric, step) is stored once,
    and every sample table and tag, those queued during the outage included, arrives (none lost)."""
    first = Tracker("faults-outage", lab)
    run_id = first.start("outage", {}, {}, "x: 1\n")
    for s in range(3):
        first.log(s, {"reward/mean": s / 10})
    first.log_table(1, [{"completion": "1", "reward": 1.0}])
    first.drain()
    down = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down"))  # noqa: E731
    monkeypatch.setattr(first.client, "log_batch", down)
    monkeypatch.setattr(first.client, "log_text", down)
    monkeypatch.setattr(first.client, "set_tag", down)
    for s in range(3, 6):
        first.log(s, {"reward/mean": s / 10})
        first.log_table(s, [{"completion": str(s), "reward": s / 10}])
    first.set_tag("rlcore.note", "queued during the outage")
    first.drain()  # spilled to disk
    first._stop.set()  # the process dies: its thread stops, nothing is finished or delivered
    first._thread.join()
    monkeypatch.undo()

    second = Tracker("faults-outage", lab)  # the resumed process
    second.resume(run_id)
    for s in range(3, 7):  # replayed from the checkpoint at step 2: same values, new timestamps
        second.log(s, {"reward/mean": s / 10})
    second.finish("FINISHED")
    steps = sorted(m.step for m in client(lab).get_metric_history(run_id, "reward/mean"))
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    run = client(lab).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rlcore.note"] == "queued during the outage"
    tables = sorted(f.path for f in client(lab).list_artifacts(run_id, "samples"))
    assert tables == [f"samples/step_{s:06d}.json" for s in (1, 3, 4, 5)]  # 0 of 4 lost
    assert not list((lab / ".rlcore_cache" / "undelivered").glob(f"{run_id}*"))


def test_a_resumed_run_replaces_what_its_abandoned_attempt_logged_after_the_checkpoint(lab: Path) -> None:
    """The attempt logged steps 0-5 (its eval at step 4 from weights about to go non-finite) and died; the run
    resumes from its checkpoint at step 2. The history used to keep the abandoned eval point (the replay skipped
    every step already stored); now it holds the resumed run's steps 3-6, each once."""
    first = Tracker("faults-abandoned", lab)
    run_id = first.start("abandoned", {}, {}, "x: 1\n")
    for s in range(6):
        first.log(s, {"reward/mean": s / 10, **({"eval/greedy_accuracy": float("nan")} if s == 4 else {})})
    first.drain()
    first._stop.set()  # killed: nothing finished
    first._thread.join()
    second = Tracker("faults-abandoned", lab)
    second.resume(run_id, from_step=2)
    for s in range(3, 7):
        second.log(s, {"reward/mean": s / 100, **({"eval/greedy_accuracy": 0.5} if s == 4 else {})})
    second.finish("FINISHED")
    c = client(lab)
    evals = [(m.step, m.value) for m in c.get_metric_history(run_id, "eval/greedy_accuracy")]
    assert evals == [(4, 0.5)]  # the resumed run's, not the abandoned NaN
    reward = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "reward/mean"))
    assert reward == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.03), (4, 0.04), (5, 0.05), (6, 0.06)]
    assert c.get_run(run_id).data.metrics["reward/mean"] == 0.06  # MLflow's latest value follows


# ------------------------------------------------------------------------------------------------ sweeps

def test_an_invalid_sweep_point_fails_with_its_reason_and_is_not_requeued(lab: Path) -> None:
    import optuna

    from rlcore.sweep import load_sweep, run_sweep, storage_from_spec

    # Each end of each range is valid (min_digits=2 with max_digits 2, max_digits=1 with min_digits 1); together not.
    path = lab / "sweep_invalid_pair.yaml"
    path.write_text("base: rl.yaml\noverrides: [task.max_digits=2]\n"
                    "space:\n  task.min_digits: {type: categorical, choices: [2]}\n"
                    "  task.max_digits: {type: categorical, choices: [1]}\n"
                    "n_trials: 2\nsampler: {name: random}\npruner: {name: none}\n")
    summary = run_sweep(path, root=lab)
    assert summary["counts"]["FAIL"] == 2 and summary["counts"]["COMPLETE"] == 0
    sw = load_sweep(path)
    study = optuna.load_study(study_name=sw.name, storage=storage_from_spec(sw.storage, lab))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2  # nothing re-queued: a re-run would fail the same way
    for t in trials:
        assert t.state.name == "FAIL" and "retry_of" not in t.user_attrs
        assert "invalid combination" in t.user_attrs["error"] and "min_digits must be <= max_digits" in t.user_attrs["error"]


# ------------------------------------------------------------------------------------------------ non-finite

def test_nonfinite_weights_stop_the_run_with_the_reason_and_no_checkpoint(lab: Path, capsys, monkeypatch) -> None:
    """An update that leaves a weight at inf (an overflow in low precision, a bad kernel): simulated by an AdamW
    whose first step writes inf into one weight after updating."""
    step = torch.optim.AdamW.step

    def overflowing_step(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    monkeypatch.chdir(lab)
    code, _, err = run_cli(["run", "rl.yaml", "--set", "trainer.checkpoint_every=1",
                            "--set", "logging.experiment=faults-nonfinite"], capsys, monkeypatch)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err
    assert last.startswith("error: non-finite weights after the update of step 1 (phase: update): model.embed_tokens"
                           ".weight (1 of "), last
    (r,) = runs_of(lab, "faults-nonfinite")
    assert r.info.status == "FAILED" and "non-finite weights after the update of step 1" in r.data.tags["rlcore.failure"]
    assert not list((lab / "outputs" / r.info.run_id).glob("checkpoints/step_*.pt"))


def test_a_checkpoint_is_never_written_with_nonfinite_weights(tmp_path: Path) -> None:
    state = {"step": 1, "run_id": "x", "config_hash": "h", "reference": "r",
             "policy": {"w": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(ValueError, match="non-finite weights: policy: w \\(1 of 2 values\\)"):
        checkpoint.save(tmp_path, 1, state, keep=2)
    assert not list(tmp_path.iterdir())


def _grad(loss_fn) -> torch.Tensor:
    logp = torch.zeros(1, 3, requires_grad=True)
    loss_fn(logp).sum().backward()
    return logp.grad


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo", "pg"])
def test_one_extreme_token_cannot_make_the_policy_gradient_nan(objective: str) -> None:
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    old = torch.tensor([[0.0, -200.0, 0.0]])  # one token's probability rose by e^200 since sampling

    def loss(cfg):
        return lambda logp: POLICY_LOSSES[objective](logp, LossInputs(old, adv, mask), cfg)[0]

    assert bool(torch.isfinite(_grad(loss(AlgorithmConfig()))).all())  # the default clamp (20)
    if objective != "gspo":  # (gspo's sequence mean already divides the outlier by the length)
        assert not bool(torch.isfinite(_grad(loss(AlgorithmConfig(log_ratio_clamp=None)))).all())  # what it prevents


def test_one_extreme_token_cannot_make_the_k3_penalty_overflow() -> None:
    ref = torch.tensor([[0.0, 200.0, 0.0]])  # the reference likes a token the policy has all but ruled out
    cfg = AlgorithmConfig()
    grad = _grad(lambda logp: kl_estimate("k3", logp, ref, cfg.kl_clamp))
    assert bool(torch.isfinite(grad).all())
    assert float(kl_estimate("k3", torch.zeros(1, 3), ref, cfg.kl_clamp).max()) == cfg.kl_clamp
    # inside the clamps nothing changes: the usual k3 of a small log-ratio, and its gradient
    x = torch.tensor([[0.3]])
    assert torch.allclose(kl_estimate("k3", torch.zeros(1, 1), x, cfg.kl_clamp), x.exp() - 1 - x)


# ------------------------------------------------------------------------------------------------ launch page

@pytest.fixture(scope="module")
def project(lab: Path, tmp_path_factory) -> Path:
    """A project whose experiments/ holds the lab's tiny rl.yaml + sft.yaml (warm start already built)."""
    from tests.conftest import write_lab

    root = write_lab(tmp_path_factory.mktemp("project"))
    shutil.copytree(lab / ".rlcore_cache" / "warm_start", root / ".rlcore_cache" / "warm_start")
    (root / "experiments").mkdir()
    for f in ("rl.yaml", "sft.yaml"):
        shutil.copy(root / f, root / "experiments" / f)
    return root


def test_launch_overrides_cannot_leave_the_project(project: Path, tmp_path: Path) -> None:
    from dashboard import launcher

    outside = tmp_path / "sft.yaml"
    shutil.copy(project / "sft.yaml", outside)
    with pytest.raises(ConfigError, match="model.warm_start: .* is outside the project"):  # refused before it is read
        launcher.validate(project, "rl.yaml", [f"model.warm_start={outside}"])
    with pytest.raises(ConfigError, match="model.warm_start: .* is outside experiments/"):
        launcher.validate(project, "rl.yaml", ["model.warm_start=../sft.yaml"])
    for out in ("/tmp/elsewhere", "../..", str(tmp_path)):
        with pytest.raises(ConfigError, match="logging.output_dir: .* is outside the project"):
            launcher.validate(project, "rl.yaml", [f"logging.output_dir={out}"])
    assert "rl experiment" in launcher.validate(project, "rl.yaml", ["logging.output_dir=outputs/mine"])


def test_launch_stop_records_the_exit_status(project: Path) -> None:
    from dashboard import launcher

    launch = launcher.start(project, "rl.yaml", ["trainer.steps=5000", "logging.experiment=faults-launch"])
    try:
        stop_and_wait(launcher, launch, project)
    finally:
        if launch.status(project) in ("running", "stopping"):
            launcher.stop(launch, project, force=True)
    assert launch.status(project) == f"stopped (exit {128 + signal.SIGTERM})"
    (r,) = runs_of(project, "faults-launch")
    assert r.info.status == "KILLED"
    assert r.data.tags["rlcore.launch"] == launch.id  # the Launch page finds the run of a launch by this tag


def test_launch_stopped_during_start_up_stops(project: Path) -> None:
    """Stop at once, while the interpreter is still importing: the launch must end and say `stopped (exit N)`.
    The old wrapper shell ignored SIGTERM, and the run it started inherited the ignored signal until rlcore set its
    own handler, so an early Stop was lost and the launch ran on (5,000 steps here) showing `running`."""
    from dashboard import launcher

    launch = launcher.start(project, "rl.yaml", ["trainer.steps=5000", "logging.experiment=faults-early-stop"])
    try:
        launcher.stop(launch, project)
        deadline = time.time() + 90
        while launch.status(project) in ("running", "stopping") and time.time() < deadline:
            time.sleep(0.2)
        assert launch.status(project) == f"stopped (exit {128 + signal.SIGTERM})", launcher.tail(launch.log(project))
    finally:
        if launch.status(project) in ("running", "stopping"):
            launcher.stop(launch, project, force=True)
    assert all(r.info.status != "RUNNING" for r in runs_of(project, "faults-early-stop"))


def test_launch_that_ignores_stop_shows_stopping_and_kill_now_records_137(tmp_path: Path) -> None:
    from dashboard import launcher

    deaf = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)"]
    launch = launcher._spawn(tmp_path, deaf, "deaf", "deaf.yaml", [])
    deadline = time.time() + 30
    while "ready" not in launcher.tail(launch.log(tmp_path)):
        assert time.time() < deadline
        time.sleep(0.1)
    launcher.stop(launch, tmp_path)
    time.sleep(1.0)
    assert launch.status(tmp_path) == "stopping"  # the command ignores SIGTERM: still alive, and the page says so
    launcher.stop(launch, tmp_path, force=True)
    while launch.status(tmp_path) == "stopping" and time.time() < deadline:
        time.sleep(0.1)
    assert launch.status(tmp_path) == f"stopped (exit {128 + signal.SIGKILL})"


def stop_and_wait(launcher, launch, project: Path) -> None:
    deadline = time.time() + 240
    while "rl:" not in launcher.tail(launch.log(project)) and "reward" not in launcher.tail(launch.log(project)):
        assert time.time() < deadline and launch.status(project) == "running", launcher.tail(launch.log(project))
        time.sleep(0.2)
    launcher.stop(launch, project)
    while launch.status(project) in ("running", "stopping"):
        assert time.time() < deadline
        time.sleep(0.2)
