"""Tracking: the only module that talks to MLflow.

`mlflow.yml` at the project root picks the store (default: an embedded SQLite file, nothing to start);
`MLFLOW_TRACKING_URI` overrides it. Metrics go into a queue that a background thread writes in batches about
once a second, so a step never waits on the store; `finish` drains the queue, so the last steps are never lost,
and sets the run's final status (FINISHED, FAILED or KILLED, never left RUNNING).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rlcore.config import ConfigError
from rlcore.loading import parse_yaml, read_text_file
from rlcore.metrics import BY_NAME

SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql")  # the stores this lab is tested with / MLflow supports

# MLflow announces its schema migrations at INFO on first use of a store; a run's output is not the place.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

DEFAULTS = {"tracking_uri": "sqlite:///mlruns/mlflow.db", "artifact_location": "mlruns/artifacts", "flush_interval_s": 1.0,
            "finish_timeout_s": 30.0}


def project_root(start: Path | None = None) -> Path:
    """The nearest directory (from cwd upwards) holding mlflow.yml; cwd if there is none."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "mlflow.yml").is_file():
            return d
    return here


def redact(uri: str) -> str:
    """The URI with any password replaced by *** (`http://user:***@host`): safe to print, log or write to disk."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:  # a URI too malformed to parse: hide everything between :// and @
        head, sep, tail = uri.partition("://")
        return f"{head}{sep}***@{tail.rpartition('@')[2]}" if "@" in tail else uri


def tracking_settings(root: Path | None = None) -> dict[str, Any]:
    """Resolved settings: tracking_uri and artifact_location absolute, env var first."""
    root = root or project_root()
    settings = dict(DEFAULTS)
    path = root / "mlflow.yml"
    if path.is_file():
        loaded = parse_yaml(read_text_file(path, "tracking config"), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of settings, got {type(loaded).__name__}")
        unknown = set(loaded) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (valid: {', '.join(DEFAULTS)})")
        for key in ("tracking_uri", "artifact_location"):
            if key in loaded and (not isinstance(loaded[key], str) or not loaded[key].strip()):
                raise ConfigError(f"{path}: {key}: must be a non-empty string, got {loaded[key]!r}")
        for key in ("flush_interval_s", "finish_timeout_s"):
            v = loaded.get(key, DEFAULTS[key])
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 86400:
                raise ConfigError(f"{path}: {key}: must be a number of seconds in (0, 86400), got {v!r}")
        settings.update(loaded)
    uri = os.environ.get("MLFLOW_TRACKING_URI", settings["tracking_uri"])
    scheme = uri.partition(":")[0].partition("+")[0].lower()
    if "://" not in uri or scheme not in SCHEMES:
        where = "MLFLOW_TRACKING_URI" if "MLFLOW_TRACKING_URI" in os.environ else f"{path}: tracking_uri"
        raise ConfigError(f"{where}: unsupported tracking URI {redact(uri)!r} (use one of: "
                          f"{', '.join(s + '://' for s in SCHEMES)})")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_absolute():
            uri = f"sqlite:///{(root / db).resolve()}"
    art = settings["artifact_location"]
    if uri.startswith("sqlite:"):
        # Keep artifacts beside the database the env var points at, not beside the project's default one.
        db_dir = Path(uri[len("sqlite:///"):]).parent
        art_path = Path(art) if "MLFLOW_TRACKING_URI" not in os.environ else db_dir / "artifacts"
        art = (art_path if art_path.is_absolute() else root / art_path).resolve().as_uri()
    else:
        art = None  # a tracking server decides where artifacts go
    settings.update(tracking_uri=uri, artifact_location=art)
    return settings


OWNER_TAG, CONFIG_TAG = "rlcore.owner", "rlcore.config_hash"
HOST = socket.gethostname()


def owner() -> str:
    """host:pid of this process: who is running a RUNNING run (a dead owner means the run was killed)."""
    return f"{HOST}:{os.getpid()}"


def local_process_alive(owner_tag: str) -> bool | None:
    """For an owner `host:pid` (see `owner`): whether that process exists when it is on this host; None when it is on
    another host (no way to tell from here)."""
    host, _, pid = owner_tag.rpartition(":")
    if host != HOST:
        return None
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _store_init_lock(uri: str):
    """Serialise the first touch of an embedded SQLite store across processes.

    MLflow creates and migrates the schema on first use without a lock, so two runs started together on a fresh
    store race (`duplicate column name: step`). A file lock beside the database lets the second wait for the first.
    """
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///"):] + ".init.lock", timeout=120)


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of MLflow experiment `name`, created (with artifacts at `artifact_location`) if it does not exist."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # another process created it between our get and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class NoTracker:
    """What a process other than the main one holds in place of a Tracker: the same calls, nothing logged."""

    run_id: str | None = None

    @contextmanager
    def run(self, *_: Any, **__: Any) -> Iterator[None]:
        yield None

    def log(self, *_: Any, **__: Any) -> None:
        pass


class Tracker:
    """An MLflow run with batched background logging. Use one per run, on the main process only."""

    def __init__(self, experiment: str, root: Path | None = None):
        from mlflow.tracking import MlflowClient  # imported here: 1.5 s per process; only the logging process pays

        self.root = root or project_root()
        self.settings = tracking_settings(self.root)
        uri = self.settings["tracking_uri"]
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # No mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI for the whole process, which would point every
        # later lookup (another project, the dashboard) at this store. The client carries the URI.
        if uri.startswith(("http://", "https://")):
            # MLflow's defaults retry a dead server for minutes inside each call; fail fast instead, and let the
            # background writer buffer and retry (see _flush_unlocked).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        with _store_init_lock(uri):
            self.client = MlflowClient(uri)
            self.experiment_id = self._experiment(experiment)
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._flush_lock = threading.Lock()
        self._tables: list = []  # sample tables not yet delivered
        self.outage_since: float | None = None  # when the store stopped answering (None: it answers)
        self._last_error: BaseException | None = None
        self._spill_done = 0
        self._logged: dict[str, int] = {}  # metric -> last step already in the store (only when resuming)
        self.failure: str | None = None  # why the run failed, when it did

    def _experiment(self, name: str) -> str:
        return experiment_id(self.client, name, self.settings["artifact_location"])

    @property
    def where(self) -> str:
        """The store's URI as it may be shown (credentials redacted)."""
        return redact(self.settings["tracking_uri"])

    def start(self, run_name: str | None, tags: dict[str, str], params: dict[str, Any], config_yaml: str) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, OWNER_TAG: owner()})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
        self._thread.start()
        return self.run_id

    @property
    def _spill(self) -> Path:
        """Where an outage's undelivered metrics wait: one JSON list of [key, value, timestamp, step] per line."""
        return self.root / ".rlcore_cache" / "undelivered" / f"{self.run_id}.jsonl"

    @property
    def _table_spill(self) -> Path:
        """Where an outage's undelivered sample tables and tags wait (one JSON item per line): a kill -9 during
        the outage must not lose them. Delivering one twice writes the same artifact or tag again."""
        return self.root / ".rlcore_cache" / "undelivered" / f"{self.run_id}.tables.jsonl"

    def forget_after(self, run_id: str, step: int) -> bool:
        """Remove the metric points a run logged after `step` (the checkpoint it resumes from): they belong to the
        attempt that was abandoned (killed, or FAILED on non-finite weights), and the resumed run logs those steps
        itself. Only the embedded SQLite store can do this (MLflow's client cannot delete a point); elsewhere they
        stay and the replayed steps are skipped as before. True when done."""
        import sqlite3

        uri = self.settings["tracking_uri"]
        if not uri.startswith("sqlite:///"):
            return False
        try:
            with closing(sqlite3.connect(uri[len("sqlite:///"):], timeout=30)) as con, con:
                con.execute("DELETE FROM metrics WHERE run_uuid = ? AND step > ?", (run_id, step))
                con.execute("DELETE FROM latest_metrics WHERE run_uuid = ? AND step > ?", (run_id, step))
                con.execute(  # each key whose latest point went: its latest remaining one
                    "INSERT OR REPLACE INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                    "SELECT m.key, m.value, m.timestamp, m.step, m.is_nan, m.run_uuid FROM metrics m "
                    "WHERE m.run_uuid = ? AND m.key NOT IN (SELECT key FROM latest_metrics WHERE run_uuid = ?) "
                    "AND NOT EXISTS (SELECT 1 FROM metrics n WHERE n.run_uuid = m.run_uuid AND n.key = m.key AND "
                    "(n.step > m.step OR (n.step = m.step AND n.timestamp > m.timestamp)))", (run_id, run_id))
            return True
        except sqlite3.Error as e:  # another MLflow schema: keep the old points rather than fail the resume
            print(f"warning: could not drop the abandoned attempt's points after step {step} ({e}); they stay in "
                  "the history and the replayed steps are not logged again", file=sys.stderr)
            return False

    def resume(self, run_id: str, from_step: int | None = None) -> str:
        """Reopen an existing run (a resumed checkpoint): RUNNING again. The points its abandoned attempt logged
        after the checkpoint's step `from_step` are dropped (`forget_after`: the resumed run logs those steps
        itself; an eval of weights that went non-finite does not stay in the history); every (metric, step) still
        stored is skipped by `log`, so no step is logged twice."""
        self.run_id = run_id
        forgot = from_step is not None and self.forget_after(run_id, from_step)
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, OWNER_TAG, owner())
        if "rlcore.failure" in self.client.get_run(run_id).data.tags:  # the failure it is resumed from is history
            self.client.delete_tag(run_id, "rlcore.failure")
        for key in self.client.get_run(run_id).data.metrics:
            self._logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        # A process killed during an outage left metrics in the spill file; this run delivers them first (same
        # timestamps, so a line sent twice is stored once). The steps replayed since the checkpoint must not be
        # logged again with new timestamps: count the spilled ones as logged.
        if self._spill.is_file():
            kept = []
            for line in self._spill.read_text().splitlines():
                try:
                    rows = json.loads(line)
                except ValueError:  # a line cut by the kill: not delivered, so not counted
                    continue
                if forgot and isinstance(rows, list):  # the abandoned attempt's steps: the resumed run logs them
                    rows = [r for r in rows if int(r[3]) <= from_step]
                kept.append(rows)
                for key, _, _, step in rows if isinstance(rows, list) else ():
                    self._logged[key] = max(self._logged.get(key, -1), int(step))
            if forgot:
                self._spill.write_text("".join(json.dumps(r) + "\n" for r in kept if r))
        self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
        self._thread.start()
        return run_id

    @contextmanager
    def run(self, run_name: str | None, tags: dict[str, str], params: dict[str, Any], config_yaml: str,
            resume_id: str | None = None, resume_step: int | None = None) -> Iterator[str]:
        """Start (or with `resume_id`, reopen) a run and yield its id; close it FINISHED, KILLED (Ctrl-C, or SIGTERM
        turned into SystemExit by the CLI) or FAILED (any error, including one while starting), so no run is ever
        left RUNNING."""
        status = "FAILED"
        try:
            yield self.resume(resume_id, resume_step) if resume_id else self.start(run_name, tags, params, config_yaml)
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except Exception as e:
            self.failure = f"{type(e).__name__}: {e}"  # stored as the run's tag rlcore.failure by finish()
            raise
        finally:
            self.finish(status)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        unknown = [k for k in metrics if k not in BY_NAME]
        if unknown:
            raise KeyError(f"metric {unknown[0]!r} is not in rlcore.metrics.CATALOGUE")
        fresh = {k: v for k, v in metrics.items() if step > self._logged.get(k, -1)}
        if fresh:
            self._queue.put(("metrics", step, int(time.time() * 1000), fresh))

    def log_table(self, step: int, rows: list[dict[str, Any]], name: str = "samples") -> None:
        self._queue.put(("table", step, rows, name))

    def log_artifact(self, path: Path) -> None:
        """A file of this run (written now, not queued: it is the run's output, e.g. a preference data set)."""
        self.client.log_artifact(self.run_id, str(path))

    def set_tag(self, key: str, value: str) -> None:
        """A tag, written in order with the metrics by the background writer (and kept through an outage)."""
        self._queue.put(("tag", key, value))

    def _worker(self) -> None:
        interval = float(self.settings["flush_interval_s"])
        while not self._stop.wait(interval):
            self._flush()
        self._flush()

    def drain(self) -> None:
        """Deliver everything queued now (before a checkpoint: the store then holds every step up to it)."""
        self._flush()

    def _flush(self) -> None:
        with self._flush_lock:  # the background thread and drain() never write concurrently (keeps the order)
            self._flush_unlocked()

    def _flush_unlocked(self) -> None:
        """Deliver, in order: first whatever an outage left on disk, then what is queued now. If the store cannot
        be reached, everything not delivered goes to the spill file (a FIFO on disk) and training carries on."""
        from mlflow.entities import Metric

        fresh: list[list] = []  # [key, value, timestamp, step]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "metrics":
                _, step, ts, metrics = item
                fresh.extend([k, float(v), ts, step] for k, v in metrics.items())
            else:  # tables and tags: delivered after the metrics, retried until the store answers
                self._tables.append(item)
        try:
            if self._spill.is_file():  # an outage's backlog first, one line (one flush) at a time
                lines = self._spill.read_text().splitlines()
                for line in lines[self._spill_done :]:
                    try:
                        rows = json.loads(line)
                    except ValueError:  # the last line of a process killed while writing it
                        rows = []
                    if isinstance(rows, list):  # (a dict is a final-status footer: `rlcore replay`'s business)
                        self._send([Metric(*r) for r in rows])
                    self._spill_done += 1
                self._spill.unlink()
                self._spill_done = 0
            self._send([Metric(*r) for r in fresh])
            if self._table_spill.is_file():  # tables and tags an outage (perhaps of a killed process) left on disk
                for line in self._table_spill.read_text().splitlines():
                    try:
                        self._deliver(json.loads(line))
                    except ValueError:  # the last line of a process killed while writing it
                        continue
                self._table_spill.unlink()
            while self._tables:
                self._deliver(self._tables[0])
                self._tables.pop(0)
            if self.outage_since is not None:
                print(f"MLflow is reachable again after {time.time() - self.outage_since:.0f} s; "
                      "buffered metrics delivered", file=sys.stderr)
            self.outage_since = None
        except Exception as e:  # noqa: BLE001 - any failure to reach the store is an outage, never a lost metric
            if self.outage_since is None:
                self.outage_since = time.time()
                print(f"MLflow unreachable ({type(e).__name__}); training continues, metrics buffered in "
                      f"{self._spill}", file=sys.stderr)
            self._last_error = e
            if fresh:
                self._spill.parent.mkdir(parents=True, exist_ok=True)
                with open(self._spill, "a") as f:
                    f.write(json.dumps(fresh) + "\n")
            if self._tables:  # on disk too, so a kill -9 during the outage loses no table and no tag
                self._table_spill.parent.mkdir(parents=True, exist_ok=True)
                with open(self._table_spill, "a") as f:
                    f.writelines(json.dumps(list(item)) + "\n" for item in self._tables)
                self._tables.clear()

    def _deliver(self, item) -> None:
        deliver(self.client, self.run_id, item)

    def _send(self, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver everything queued, then mark the run FINISHED / FAILED / KILLED. If the store is still
        unreachable, the undelivered metrics and the final status stay in a file that `rlcore replay` delivers."""
        if self.run_id is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.time() + float(self.settings["finish_timeout_s"])
        while True:
            self._flush()
            if self.outage_since is None or time.time() > deadline:
                break
            # A live line, so a pause at exit reads as waiting on the store, not as a hang.
            print(f"\rMLflow at {self.where} is unreachable: retrying for {deadline - time.time():.0f} s more before "
                  "keeping the metrics on disk", end="", file=sys.stderr, flush=True)
            time.sleep(2.0)
        try:
            if self.outage_since is not None:
                raise ConnectionError(self._last_error)
            if self.failure:
                self.client.set_tag(self.run_id, "rlcore.failure", self.failure[:5000])
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001 - the store is down: keep the status with the metrics
            self._spill.parent.mkdir(parents=True, exist_ok=True)
            with open(self._spill, "a") as f:
                f.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.where, "status": status}) + "\n")
            print(f"MLflow at {self.where} is unreachable ({type(e).__name__}): the run's remaining metrics and its "
                  f"final status are kept in {self._spill}\n  deliver them later with: rlcore replay {self._spill}",
                  file=sys.stderr)


def deliver(client, run_id: str, item) -> None:
    """One queued tag or sample table (`("tag", key, value)` or `("table", step, rows, name)`), written to
    the store: by the tracker, and by `rlcore replay` for what an outage left on disk."""
    if item[0] == "tag":
        _, key, value = item
        client.set_tag(run_id, key, value)
        return
    _, step, rows, name = item
    # The table as a plain JSON artifact ({"columns", "data"}: what mlflow.log_table writes), not through
    # log_table, which also appends each file to the run tag `mlflow.loggedArtifacts`: that tag has a size
    # cap, so a long run's ~160th table failed (and looked like an outage forever).
    columns = list(rows[0]) if rows else []
    table = {"columns": columns, "data": [[r[c] for c in columns] for r in rows]}
    client.log_text(run_id, json.dumps(table), f"{name}/step_{step:06d}.json")
