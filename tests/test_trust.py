"""Trust (issue 28): what a config asks for is done or refused, never silently dropped; faults and hostile input
lose nothing and run nothing. Each test here failed on the code before it (the bad-input corpus holds the one-line
refusals; these are the behaviours a single error line cannot show)."""

from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlcore.config import ConfigError, RunFailed
from rlcore.loading import load_experiment
from rlcore.tracking import redact, tracking_settings

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ tracking URIs

class _AuthHealth(http.server.BaseHTTPRequestHandler):
    """/health that answers 200 only to HTTP basic auth alice:s3cret (a tracking server behind a password)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"alice:s3cret").decode()
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_password_in_the_tracking_uri_is_used_to_connect_and_never_shown(auth_server: int, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from rlcore.preflight import check_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{auth_server}")
    assert check_store(tmp_path) == f"http://alice:s3cret@127.0.0.1:{auth_server}"  # reached, with the credentials
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:wrong@127.0.0.1:{auth_server}")
    with pytest.raises(ConfigError) as e:
        check_store(tmp_path)
    assert "credentials refused" in str(e.value) and "wrong" not in str(e.value) and "alice:***@" in str(e.value)
    assert redact("postgresql+psycopg://u:pw@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# ------------------------------------------------------------------------------------------------ rewards at run time

def _hist(lab: Path, run_id: str, key: str) -> list[float]:
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def _only_run(lab: Path, experiment: str):
    """The one MLflow run of `experiment` in the lab's store."""
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    (r,) = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    return r


def test_a_reward_that_fails_on_every_sample_stops_the_run_failed_with_its_first_error(lab: Path) -> None:
    """It passes the probe, then raises on every call: the run used to train on reward 0 to the end, FINISHED."""
    import trust_rewards

    from rlcore.controller import run

    trust_rewards.CALLS["broken"] = 0
    cfg = load_experiment(lab / "rl.yaml", ["trainer.steps=8", "logging.experiment=trust-broken-reward",
                                            "reward.components=[{name: r, fn: 'trust_rewards:broken_after_probe'}]"])
    with pytest.raises(RunFailed, match=r"reward component 'r' \(trust_rewards:broken_after_probe\) failed on every "
                                        r"sample for 3 steps in a row; first error: RuntimeError: the grader's service"):
        run(cfg, root=lab)
    r = _only_run(lab, "trust-broken-reward")
    assert r.info.status == "FAILED" and "failed on every sample" in r.data.tags["rlcore.failure"]
    assert _hist(lab, r.info.run_id, "reward/errors") == [32.0, 32.0]  # steps 1-2 logged; step 3 stopped it


def test_a_reward_call_that_hangs_times_out_counts_as_an_error_and_the_run_goes_on(lab: Path) -> None:
    from rlcore.controller import run

    cfg = load_experiment(lab / "rl.yaml", ["logging.experiment=trust-hang", "reward.timeout_s=0.5",
                                            "reward.components=[{name: r, fn: 'trust_rewards:hangs_once'}]"])
    res = run(cfg, root=lab)
    assert _hist(lab, res.run_id, "reward/errors")[0] == 1.0  # the one hung call, stopped at 0.5 s


def test_one_sigterm_stops_a_run_stuck_in_a_reward(lab: Path) -> None:
    """A grader that never returns (timeout an hour): one SIGTERM ends the run within seconds, KILLED."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "RLCORE_THREADS": "1", "RLCORE_NO_BAR": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--set", "logging.experiment=trust-stuck",
            "--set", "reward.timeout_s=3600", "--set", "reward.components=[{name: r, fn: 'trust_rewards:hangs_after_probe'}]"]
    proc = subprocess.Popen(args, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    deadline = time.time() + 120
    while True:  # the run exists and is inside the reward (its step-0 eval scores with it)
        assert time.time() < deadline and proc.poll() is None
        exp = c.get_experiment_by_name("trust-stuck")
        if exp and c.search_runs([exp.experiment_id]):
            break
        time.sleep(0.2)
    time.sleep(2)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.time() - t < 15 and proc.returncode == 128 + signal.SIGTERM
    (r,) = c.search_runs([c.get_experiment_by_name("trust-stuck").experiment_id])
    assert r.info.status == "KILLED"


# ------------------------------------------------------------------------------------------------ datasets

def _dataset(tmp_path: Path, rows: str, name: str, extra: str = "") -> object:
    from rlcore.tasks import make_task

    (tmp_path / name).write_text(rows)
    (tmp_path / "exp.yaml").write_text(f"task: {{name: dataset, train: {name}{extra}}}\n")
    cfg = load_experiment(tmp_path / "exp.yaml")
    return make_task(cfg.task, cfg._base_dir)


def test_csv_answers_stay_text(tmp_path: Path) -> None:
    task = _dataset(tmp_path, "prompt,answer\nq1,007\nq2,0.50\nq3,NA\nq4,1e3\nq5,-0\n", "a.csv", ", heldout_frac: 0.2")
    answers = {p.prompt: p.answer for p in [*task.rows, *task.heldout]}
    assert answers == {"q1": "007", "q2": "0.50", "q3": "NA", "q4": "1e3", "q5": "-0"}  # was 7, 0.5, missing, ...


def test_a_held_out_fraction_never_shares_a_prompt_with_training(tmp_path: Path, capsys) -> None:
    rows = "".join(f'{{"prompt": "q{i % 10}", "answer": "{i % 10}"}}\n' for i in range(60))  # 10 prompts, 6 times each
    task = _dataset(tmp_path, rows, "dup.jsonl", ", heldout_frac: 0.3")
    held, train = {p.prompt for p in task.heldout}, {p.prompt for p in task.rows}
    assert held and train and not held & train  # was: 6 of 10 held-out prompts also trained on
    assert len(task.heldout) == len(held) == 3 and len(task.rows) == 42
    assert "held-out rows repeat a prompt" in capsys.readouterr().err  # said by the validation above


# ------------------------------------------------------------------------------------------------ the Launch form

def test_the_launch_form_runs_no_user_code_and_reads_nothing_outside_the_project(tmp_path: Path) -> None:
    """What a person types is validated as they type: a reward module named there used to be imported (its top
    level ran) on every keystroke, and files anywhere on disk were read."""
    from dashboard import launcher
    from tests.conftest import write_course

    root = write_course(tmp_path / "course", {})
    marker = tmp_path / "imported"
    (root / "experiments" / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                    "def score(completion, answer, **info):\n    return 1.0\n")
    desc = launcher.validate(root, "rl.yaml", ["reward.components=[{name: r, fn: 'sneaky:score'}]"])
    assert desc.startswith("rl experiment") and not marker.exists()  # valid as far as can be told without running it
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 20)
    for override, key in ((f"task={{name: dataset, train: {outside}}}", "task.train"),
                          (f"model={{name_or_path: {tmp_path}}}", "model.name_or_path"),
                          ("model.warm_start=../../elsewhere.yaml", "model.warm_start")):
        with pytest.raises(ConfigError, match=f"{key}: .* is outside the project"):
            launcher.validate(root, "rl.yaml", [override])
    # `rlcore run` (what Start launches) still validates fully: the import happens there, once
    load_experiment(root / "experiments" / "rl.yaml", ["reward.components=[{name: r, fn: 'sneaky:score'}]"])
    assert marker.read_text() == "ran"


# ------------------------------------------------------------------------------------------------ a full disk

@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 96 KB filesystem (tmpfs): room for the run's first files, not for its weights."""
    import subprocess

    where = tmp_path / "full"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_says_no_space_left_with_the_path(lab: Path, tiny_disk: Path) -> None:
    from rlcore.controller import run

    cfg = load_experiment(lab / "rl.yaml", ["logging.experiment=trust-disk-full", f"logging.output_dir={tiny_disk}",
                                            "trainer.steps=2", "trainer.checkpoint_every=1"])
    with pytest.raises(RunFailed, match=rf"no space left on the device writing the checkpoint to {tiny_disk}/.*"
                                        r"\(0\.\d MB free\)"):
        run(cfg, root=lab)
    r = _only_run(lab, "trust-disk-full")
    assert r.info.status == "FAILED" and "no space left" in r.data.tags["rlcore.failure"]
    assert not [p for p in tiny_disk.rglob(".tmp-*")]  # no half-written file left behind


# ------------------------------------------------------------------------------------------------ damaged caches

def test_a_damaged_cached_reward_model_is_rebuilt_not_a_traceback_on_every_run(lab: Path, tmp_path: Path,
                                                                              capsys) -> None:
    """A reward model trained on first use and cached: a byte of its weights flipped on disk made every later run
    fail with a traceback. Its folder is sealed (sha256 of every file): the damage is said and it is trained again."""
    import shutil

    from rlcore import rm_training
    from rlcore.atomic import damage
    from tests.conftest import write_lab

    own = write_lab(tmp_path)  # a lab of its own: the shared one's reward-model cache is counted by other tests
    shutil.copytree(lab / ".rlcore_cache" / "warm_start", own / ".rlcore_cache" / "warm_start")
    lab = own
    (lab / "trust_prefs.yaml").write_text("kind: preferences\nmodel: {warm_start: sft.yaml}\n"
                                          "task: {min_digits: 1, max_digits: 1, heldout_size: 16}\n"
                                          "preferences: {prompts: 16, samples_per_prompt: 2}\n")
    (lab / "trust_rm.yaml").write_text("kind: reward_model\nmodel: {warm_start: sft.yaml}\n"
                                       "task: {min_digits: 1, max_digits: 1, heldout_size: 16}\n"
                                       "reward_model: {pairs: trust_prefs.yaml, epochs: 1, batch_size: 8}\n")
    cfg = load_experiment(lab / "trust_rm.yaml")
    first = rm_training.cached(cfg, lab)
    assert damage(first) is None
    weights = next(p for p in first.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "changed since it was built" in damage(first)
    again = rm_training.cached(cfg, lab)
    assert again == first and damage(again) is None
    assert "is damaged" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ lessons find their runs

def test_a_lessons_runs_are_matched_by_config_not_experiment_name() -> None:
    """An identical config logged under another experiment name is the same run (its rlcore.group is
    experiment-HASH, the hash without logging.*); another config is not; the newest copy of a (config, seed) wins."""
    import pandas as pd

    from dashboard.data import lesson_runs

    runs = pd.DataFrame({
        "run_id": ["a", "b", "c", "d"], "seed": ["0", "1", "0", "0"], "status": ["FINISHED"] * 4,
        "rlcore.group": ["lesson-03-abcd1234", "my-own-name-abcd1234", "lesson-03-ffff0000", "elsewhere-abcd1234"],
        "start": pd.to_datetime([1, 2, 3, 4], unit="s")})
    own = lesson_runs(runs, {"lesson-03-abcd1234": "beta=0.04"})
    assert sorted(own["run_id"]) == ["b", "d"] and set(own["line"]) == {"beta=0.04"}  # d replaces a (same seed)


def test_dpo_on_zero_pairs_is_refused_not_finished(lab: Path) -> None:
    """Every pair a tie (an untrained model is always wrong) and skip_ties: 0 pairs. DPO used to 'finish' on them
    and save the starting policy as if trained."""
    from rlcore.dpo import train_dpo

    (lab / "trust_ties.yaml").write_text("kind: preferences\ntask: {min_digits: 1, max_digits: 1, heldout_size: 16}\n"
                                         "preferences: {prompts: 8, samples_per_prompt: 2, skip_ties: true}\n")
    (lab / "trust_dpo.yaml").write_text("kind: dpo\ntask: {min_digits: 1, max_digits: 1, heldout_size: 16}\n"
                                        "dpo: {pairs: trust_ties.yaml}\nlogging: {experiment: trust-dpo-empty}\n")
    with pytest.raises(ConfigError, match="dpo.pairs: 'trust_ties.yaml' made 0 pairs"):
        train_dpo(load_experiment(lab / "trust_dpo.yaml"), lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_experiment_by_name("trust-dpo-empty") is None  # refused before any run


def test_a_pruned_sweep_trial_reads_pruned_not_finished() -> None:
    import pandas as pd

    from dashboard.data import _finish_runs

    runs = pd.DataFrame({"run_id": ["a", "b"], "name": ["t0", "t1"], "experiment": ["s", "s"],
                         "status": ["FINISHED", "FINISHED"], "start_time": [1000, 2000], "end_time": [1500, 2500]})
    tags = pd.DataFrame({"run_id": ["a", "b"], "key": ["rlcore.trial_state"] * 2, "value": ["PRUNED", "COMPLETE"]})
    out = _finish_runs(runs, tags).set_index("run_id")["status"]
    assert out.to_dict() == {"a": "PRUNED", "b": "FINISHED"}
