"""The bad-input corpus: files (tests/bad_inputs/: experiments, sweeps and lesson front matter that are malformed,
empty, binary, huge, out of range, or point at missing or unusable files, models and services), command lines
(COMMANDS) and broken services (SERVICES: mlflow.yml, the tracking URI, the store). Each gives one line
`error: ...` naming the problem, exit 2, no traceback, before any MLflow run exists: no run is left RUNNING."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rlcore import cli
from rlcore.tracking import tracking_settings
from tests.conftest import write_lab

CORPUS = Path(__file__).parent / "bad_inputs"
DATA = "corpus_data"  # the files and reward modules the corpus's experiments point at
EXPECTED = yaml.safe_load((CORPUS / "expected.yaml").read_text())


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["rlcore", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]
SWEEP = str(REPO / "experiments" / "sweeps" / "grpo_lr_beta.yaml")
LESSON = str(REPO / "lessons" / "03-reward-and-reference.md")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Command lines run in a copy of the course (lessons/, experiments/) beside the test lab's rl.yaml, sft.yaml and
# mlflow.yml, with a piece of the one-line error each gives.
COMMANDS = [
    (["lesson", "14-01"], "a reversed range (did you mean 01-14?)"),
    (["lesson", "03-01,05"], "a reversed range"),
    (["lesson", ""], "an empty lesson number"),
    (["lesson", "03-"], "an empty lesson number"),
    (["lesson", ","], "an empty lesson number"),
    (["lesson", "99"], "no lessons/99-*.md"),
    (["validate", SWEEP, "--set", "seed=1"], "--set: not applied to a sweep file"),
    (["validate", LESSON, "--set", "seed=1"], "--set: a lesson's front matter takes no overrides"),
    (["run", "rl.yaml", "--seeds", ""], "--seeds: expected distinct integers"),
    (["run", "rl.yaml", "--seeds", "a,b"], "--seeds: expected comma-separated integers"),
    (["run", "rl.yaml", "--seeds", "1,1"], "--seeds: expected distinct integers"),
    (["run", "rl.yaml", "--seeds", "0,99999999999"], "seed: must be <= 4294967295"),
    (["run", "rl.yaml", "--ship"], "--ship: only for a `kind: sft` experiment"),
    (["run", "rl.yaml", "--resume", "--set", "seed=77"], "--resume: no checkpoint of an unfinished run"),
    (["run", "rl.yaml", "--set", "=3"], "empty key"),
    (["run", "rl.yaml", "--set", "trainer..lr=3"], "empty key"),
    (["run", "rl.yaml", "--set", "noequals"], "expected key.path=value"),
    (["run", "rl.yaml", "--set", "trainer.lr=.inf"], "trainer.lr: must be a finite number"),
    (["run", "rl.yaml", "--set", "seed=99999999999999999999"], "seed: must be <= 4294967295"),
    (["run", "rl.yaml", "--set", "algorithm.name=ppo"], "name 'ppo' is a preset, but the axes say otherwise"),
    (["run", "rl.yaml", "--set", "task.heldout_size=60"], "heldout_size must be at most half of the 100"),
    (["run", "rl.yaml", "--set", "rollout.samples_per_prompt=1"], "rollout.samples_per_prompt must be >= 2"),
    (["run", "rl.yaml", "--set", "logging.experiment="], "logging.experiment: input should be a valid string"),
    (["run", "rl.yaml", "--set", "trainer.lr=1e-3", "--set", "trainer.steps=-1"], "trainer.steps: must be > 0"),
    (["run", "rl.yaml", "--set", "logging.output_dir=rl.yaml"], "logging.output_dir: 'rl.yaml' is a file"),
    (["run", "nonexistent.yaml"], "no such experiment file"),
    (["run", "."], "no such experiment file"),
    (["quickstart", "--set", "trainer.steps=0"], "trainer.steps: must be > 0, got 0"),
    (["lesson", "03", "--dry-run", "--help-me"], "No such option: --help-me"),
    (["sweep", SWEEP, "--trials", "0"], "n_trials: must be > 0"),
    (["sweep", SWEEP, "--workers", "0"], "workers: must be >= 1"),
    (["replay", "nope.jsonl"], "no such file"),
    (["eval", "rl.yaml", "--policy", "nowhere"], "--policy: 'nowhere' is not a model folder"),
    (["eval", "rl.yaml", "--rm", "sft.yaml"], "--rm: "),
    (["eval", "rl.yaml", "--prm", str(REPO / "experiments" / "prefs" / "reward_model.yaml")],
     "--prm: '" + str(REPO / "experiments" / "prefs" / "reward_model.yaml") + "' is an outcome reward model; --prm "
     "takes a process one"),
    (["eval", "rl.yaml", "--rm", str(REPO / "experiments" / "prefs" / "process_reward_model.yaml")],
     "is a process reward model; --rm takes an outcome one"),
    (["replay", "rl.yaml"], "not a replay file"),
    # --resume where there is nothing it could continue (it used to start a fresh run in the same group)
    (["run", "rl.yaml", "--seeds", "0,1", "--resume"], "--resume: continues one run; resume each seed"),
    (["run", "experiments/prefs/dpo.yaml", "--resume"], "--resume: a `kind: dpo` run keeps no checkpoint"),
    (["run", "experiments/prefs/reward_model.yaml", "--resume"], "--resume: a `kind: reward_model` run keeps no checkpoint"),
    (["run", "sft.yaml", "--resume"], "--resume: a `kind: sft` run keeps no checkpoint"),
    (["run", "experiments/prefs/addition_noise0.yaml", "--resume"], "--resume: a `kind: preferences` experiment"),
    (["validate", "rl.yaml", "--set", "algorithm.name=PPO"], "did you mean 'ppo'?"),
    (["run", "rl.yaml", "--set", "reward.components=[{name: r, fn: 'os:getcwd'}]"], "os:getcwd fails on a probe sample"),
    (["run", "rl.yaml", "--set", "reward.timeout_s=-1"], "reward.timeout_s: must be > 0"),
]


def _garbage_store(root: Path) -> None:
    (root / "mlruns").mkdir()
    (root / "mlruns" / "mlflow.db").write_bytes(b"this is not a database " * 50)


def _dir_store(root: Path) -> None:
    (root / "mlruns" / "mlflow.db").mkdir(parents=True)


# Broken services: (name, change to a fresh lab, environment, piece of the error). `rlcore run rl.yaml` in each.
SERVICES = [
    ("mlflow.yml unknown key", {"mlflow.yml": "tracking_uri: sqlite:///mlruns/mlflow.db\ncolour: blue\n"}, {},
     "mlflow.yml: unknown key 'colour'"),
    ("mlflow.yml invalid YAML", {"mlflow.yml": "tracking_uri: [\n"}, {}, "mlflow.yml: invalid YAML"),
    ("mlflow.yml duplicate key", {"mlflow.yml": "tracking_uri: a\ntracking_uri: b\n"}, {}, "duplicate key 'tracking_uri'"),
    ("mlflow.yml a list", {"mlflow.yml": "- tracking_uri\n"}, {}, "mlflow.yml: must be a mapping of settings"),
    ("mlflow.yml bad interval", {"mlflow.yml": "flush_interval_s: -1\n"}, {}, "flush_interval_s: must be a number"),
    ("mlflow.yml empty uri", {"mlflow.yml": "tracking_uri: ''\n"}, {}, "tracking_uri: must be a non-empty string"),
    ("mlflow.yml unsupported uri", {"mlflow.yml": "tracking_uri: ftp://127.0.0.1/x\n"}, {}, "unsupported tracking URI"),
    ("env uri unsupported", {}, {"MLFLOW_TRACKING_URI": "ftp://127.0.0.1/x"},
     "MLFLOW_TRACKING_URI: unsupported tracking URI 'ftp://127.0.0.1/x'"),
    ("env uri a bare path", {}, {"MLFLOW_TRACKING_URI": "mlruns"}, "unsupported tracking URI 'mlruns'"),
    ("env uri with a password, unreachable", {}, {"MLFLOW_TRACKING_URI": "http://alice:s3cret@127.0.0.1:{port}"},
     "MLflow tracking server http://alice:***@127.0.0.1:"),
    ("env uri with a password, unsupported", {}, {"MLFLOW_TRACKING_URI": "ftp://alice:s3cret@127.0.0.1/x"},
     "unsupported tracking URI 'ftp://alice:***@127.0.0.1/x'"),
    ("env uri unreachable server", {}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "is unreachable"),
    ("env uri database down", {}, {"MLFLOW_TRACKING_URI": "postgresql+psycopg://u@127.0.0.1:{port}/db"},
     "tracking_uri: cannot connect to postgresql+psycopg://u@127.0.0.1"),
    ("env uri missing driver", {}, {"MLFLOW_TRACKING_URI": "mysql+mysqldb://u@127.0.0.1/db"},
     "tracking_uri: the driver for 'mysql+mysqldb' is not installed"),
    ("store corrupt", _garbage_store, {}, "not a SQLite database (corrupt, or another file at that path)"),
    ("store is a directory", _dir_store, {}, "mlflow.db: not a file"),
]


def test_corpus_is_complete() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.name not in ("expected.yaml", DATA)}
    assert files == set(EXPECTED)
    # files + the two generated below (huge, empty lesson) + command lines + broken services + the locked store
    assert len(files) + 2 + len(COMMANDS) + len(SERVICES) + 1 >= 80


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_gives_one_line_and_exit_2(name: str, lab: Path, capsys, monkeypatch) -> None:
    command, message = EXPECTED[name]
    monkeypatch.chdir(lab)  # the lab's MLflow store: a run created by mistake would show up there
    code, err = run_cli([command, str(CORPUS / name)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in err


def test_huge_and_empty_files(tmp_path: Path, lab: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(lab)
    huge = tmp_path / "huge.yaml"
    huge.write_text("seed: 1\n" + "# padding\n" * 200_000)
    code, err = run_cli(["run", str(huge)], capsys, monkeypatch)
    assert code == 2 and "too large (2.0 MB; experiment files are at most 1 MB)" in err
    empty = tmp_path / "01-empty.md"
    empty.write_text("")
    code, err = run_cli(["validate", str(empty)], capsys, monkeypatch)
    assert code == 2 and "missing front matter" in err and len(err.strip().splitlines()) == 1


def test_no_run_left_running(lab: Path) -> None:
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    root = write_lab(tmp_path_factory.mktemp("course"))
    shutil.copytree(REPO / "lessons", root / "lessons")
    shutil.copytree(REPO / "experiments", root / "experiments")
    return root


@pytest.mark.parametrize("args,message", COMMANDS, ids=[" ".join(a)[:60] for a, _ in COMMANDS])
def test_bad_command_gives_one_line_and_exit_2(args: list[str], message: str, course: Path, capsys,
                                               monkeypatch) -> None:
    monkeypatch.chdir(course)
    code, err = run_cli(args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    _no_runs(course)


def _service_lab(tmp_path: Path, change) -> Path:
    (tmp_path / "lab").mkdir()
    root = write_lab(tmp_path / "lab")
    if callable(change):
        change(root)
    else:
        for name, text in change.items():
            (root / name).write_text(text)
    return root


def _no_runs(root: Path) -> None:
    """No run at all was created in the lab's own store (if the store was created)."""
    db = root / "mlruns" / "mlflow.db"
    if db.is_file() and db.read_bytes()[:15] == b"SQLite format 3":
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master")}
            assert "runs" not in tables or con.execute("select count(*) from runs").fetchone()[0] == 0


@pytest.mark.parametrize("name,change,env,message", SERVICES, ids=[s[0] for s in SERVICES])
def test_broken_service_gives_one_line_and_exit_2(name, change, env, message, tmp_path: Path, capsys,
                                                  monkeypatch) -> None:
    root = _service_lab(tmp_path, change)
    port = _free_port()  # nothing listens there
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(port=port))
    monkeypatch.chdir(root)
    code, err = run_cli(["run", "rl.yaml"], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "s3cret" not in err  # a password in the URI is never printed
    assert not (root / ".rlcore_cache" / "warm_start").exists()  # refused before any work, warm start included
    _no_runs(root)


def test_locked_store_gives_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    root = _service_lab(tmp_path, {})
    (root / "mlruns").mkdir()
    holder = sqlite3.connect(root / "mlruns" / "mlflow.db", isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write that never ends
    try:
        monkeypatch.chdir(root)
        code, err = run_cli(["run", "rl.yaml"], capsys, monkeypatch)
    finally:
        holder.rollback()
        holder.close()
    assert code == 2 and err.strip().startswith("error: MLflow store") and "locked by another process" in err, err
    assert len(err.strip().splitlines()) == 1
