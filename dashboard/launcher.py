"""Background launches from the dashboard: only files under experiments/, validated before anything starts.

Each launch is a process group running `python -m rlcore.cli run|sweep FILE --set ...`, its output in
.rlcore_cache/launches/<id>.log and its record (command, pid, exit code once done) in <id>.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlcore.config import ConfigError
from rlcore.loading import load_experiment, load_yaml


@dataclass
class Launch:
    id: str
    file: str  # relative to experiments/
    overrides: list[str]
    pid: int
    started: float
    command: list[str]

    def log(self, root: Path) -> Path:
        return launches_dir(root) / f"{self.id}.log"

    def exit_code(self, root: Path) -> int | None:
        rc = launches_dir(root) / f"{self.id}.rc"
        return int(rc.read_text().strip() or "1") if rc.is_file() else None

    def status(self, root: Path) -> str:
        code = self.exit_code(root)
        stopped = (launches_dir(root) / f"{self.id}.stopped").is_file()
        if code is not None:
            if stopped:
                return f"stopped (exit {code})"
            return "finished" if code == 0 else f"exited {code}"
        if not _alive(self.pid):
            return "killed (no exit status)" if stopped else "gone (no exit status)"
        return "stopping" if stopped else "running"


def launches_dir(root: Path) -> Path:
    d = root / ".rlcore_cache" / "launches"
    d.mkdir(parents=True, exist_ok=True)
    return d


def experiment_files(root: Path) -> list[str]:
    """Launchable files: YAML under experiments/ (relative paths), sweeps included."""
    base = root / "experiments"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.yaml")) if base.is_dir() else []


def resolve(root: Path, file: str) -> Path:
    """The file under experiments/, or ConfigError for anything outside it (.., absolute paths, symlinks out)."""
    base = (root / "experiments").resolve()
    path = (base / file).resolve()
    if not path.is_relative_to(base) or path.suffix != ".yaml":
        raise ConfigError(f"{file}: only YAML files under experiments/ can be launched")
    if not path.is_file():
        raise ConfigError(f"{file}: no such file under experiments/")
    return path


def is_sweep(path: Path) -> bool:
    return "space" in load_yaml(path)


def validate(root: Path, file: str, overrides: list[str]) -> str:
    """Validate with the same schema as the CLI; returns a one-line description."""
    path = resolve(root, file)
    if is_sweep(path):
        if overrides:
            raise ConfigError("sweeps take no --set overrides here (edit the sweep file's `overrides`)")
        from rlcore.loading import confined_to
        from rlcore.sweep_config import load_sweep

        with confined_to(root):
            sw = load_sweep(path)
        return f"sweep {sw.name}: {sw.n_trials} trials, {sw.workers} worker(s)"
    from rlcore.loading import confined_to

    with confined_to(root):  # no user reward module imported while a person types; no file outside the project
        cfg = load_experiment(path, overrides)
    inside_project(root, cfg)
    return f"{cfg.kind} experiment, algorithm={cfg.algorithm.name}, steps={cfg.trainer.steps}"


def inside_project(root: Path, cfg) -> None:
    """A launch from the page reads and writes only inside the project: its warm start is a file under
    experiments/, its outputs go under the project root (the page is a door into this project, not the disk)."""
    base = (root / "experiments").resolve()
    if cfg.model.warm_start is not None and not cfg.resolve_path(cfg.model.warm_start).resolve().is_relative_to(base):
        raise ConfigError(f"model.warm_start: {cfg.model.warm_start!r} is outside experiments/ (not allowed from the "
                          "dashboard)")
    out = (root / cfg.logging.output_dir).resolve()
    if not out.is_relative_to(root.resolve()):
        raise ConfigError(f"logging.output_dir: {cfg.logging.output_dir!r} is outside the project (not allowed from "
                          "the dashboard)")


def start(root: Path, file: str, overrides: list[str], extra: list[str] | None = None) -> Launch:
    validate(root, file, overrides)
    path = resolve(root, file)
    cmd = [sys.executable, "-m", "rlcore.cli", "sweep" if is_sweep(path) else "run", str(path)]
    for o in overrides:
        cmd += ["--set", o]
    cmd += extra or []
    return _spawn(root, cmd, path.stem, file, overrides)


def _spawn(root: Path, cmd: list[str], stem: str, file: str, overrides: list[str]) -> Launch:
    launch_id = time.strftime("%Y%m%d-%H%M%S") + f"-{stem}-{os.getpid() % 1000:03d}{int(time.time() * 1000) % 1000:03d}"
    d = launches_dir(root)
    # A small Python supervisor (not a shell with SIGTERM ignored: children inherit an ignored signal, so a Stop
    # during start-up did nothing) runs the command in its own process group, passes Stop on, and records the exit
    # status however the command ended.
    sup = [sys.executable, "-m", "dashboard.supervise", str(d / f"{launch_id}.rc"), "--", *cmd]
    # SIGTERM/SIGINT/SIGUSR1 are blocked (not ignored) in the supervisor from its first instruction: a Stop sent while it
    # is still starting stays pending, and is delivered once its handler is in place (the mask is inherited).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})
    try:
        out = open(d / f"{launch_id}.log", "w")  # noqa: SIM115 - closed below, after the child has its own copy
        proc = subprocess.Popen(sup, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "RLCORE_LAUNCH_ID": launch_id,
                                     "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                                os.environ.get("PYTHONPATH")]))})
        out.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    _CHILDREN[proc.pid] = proc
    launch = Launch(launch_id, file, overrides, proc.pid, time.time(), cmd)
    (d / f"{launch_id}.json").write_text(json.dumps(asdict(launch)))
    return launch


# Supervisors this server started: polled so an ended one is reaped (a zombie would look alive to os.kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


def _alive(pid: int) -> bool:
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # another process's child that has ended but is not yet reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_lesson(root: Path, lesson_id: str) -> Launch:
    """`rlcore lesson ID` in the background: the lesson's own plan (variants, overrides, seeds, tags)."""
    from rlcore.lessons import load_all, select

    (lesson,) = select(load_all(root), lesson_id)  # a ConfigError for an unknown id, before anything starts
    cmd = [sys.executable, "-m", "rlcore.cli", "lesson", lesson.meta.id]
    return _spawn(root, cmd, f"lesson-{lesson.meta.id}", lesson.path.name, [])


def all_launches(root: Path) -> list[Launch]:
    out = []
    for p in sorted(launches_dir(root).glob("*.json"), reverse=True):
        try:
            out.append(Launch(**json.loads(p.read_text())))
        except (ValueError, TypeError):
            continue  # a record being written right now
    return out


def stop(launch: Launch, root: Path, force: bool = False) -> None:
    """Stop: SIGTERM to the launch's supervisor, which passes it to the run: the run finishes its step and closes
    as KILLED, a sweep re-queues its trial (`status` says `stopping`, then `stopped (exit N)`). `force` (Kill now):
    the supervisor SIGKILLs the command, and still records its status."""
    (launches_dir(root) / f"{launch.id}.stopped").write_text(str(time.time()))
    try:
        os.kill(launch.pid, signal.SIGUSR1 if force else signal.SIGTERM)
    except ProcessLookupError:
        pass


def tail(path: Path, n: int = 4000) -> str:
    """The end of a log, with tqdm's carriage-return redraws reduced to their last state per line."""
    if not path.is_file():
        return ""
    data = path.read_bytes()[-n * 4 :].decode(errors="replace")
    lines = [line.rsplit("\r", 1)[-1] for line in data.split("\n")]
    return "\n".join(lines)[-n:]
