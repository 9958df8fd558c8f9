"""The bad-input corpus (tests/bad_inputs/): experiments, sweeps and lesson front matter that are malformed, empty,
binary, huge, or point at missing files/models. Each gives one line `error: ...` naming the problem, exit 2, no
traceback, and no MLflow run is left RUNNING."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rlcore import cli
from rlcore.tracking import tracking_settings

CORPUS = Path(__file__).parent / "bad_inputs"
EXPECTED = yaml.safe_load((CORPUS / "expected.yaml").read_text())


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["rlcore", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_corpus_is_complete() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.name != "expected.yaml"}
    assert files == set(EXPECTED)
    assert len(files) + 2 >= 30  # + the two generated below (huge, empty lesson)


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
