"""Preflight: what can only be checked against this machine, before any MLflow run exists: the tracking store
answers (a SQLite file that is a database, not locked, in a writable directory; a server whose health check answers;
a database whose driver is installed and that accepts a connection), and every run's output directory is usable.
An outage *during* a run is not refused: the tracker buffers and retries (rlcore.tracking).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rlcore.config import ConfigError
from rlcore.tracking import redact, tracking_settings


def preflight(configs: list, root: Path) -> None:
    """What can only be checked against this machine, before any MLflow run exists: the store answers, and every
    run's output directory is (or can be made) a writable directory."""
    check_store(root)
    for cfg in configs:
        out = (root / cfg.logging.output_dir).resolve()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"logging.output_dir: {cfg.logging.output_dir!r} is a file, not a directory")
        existing = out
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"logging.output_dir: {cfg.logging.output_dir!r}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"logging.output_dir: {cfg.logging.output_dir!r}: {existing} is not writable")
        try:  # os.access says yes to root on /proc and read-only mounts: write a file to be sure
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise ConfigError(f"logging.output_dir: {cfg.logging.output_dir!r}: cannot write in {existing} "
                              f"({e.strerror or type(e).__name__})") from None


def check_store(root: Path | None = None, timeout_s: float = 5.0) -> str:
    """Before any run exists: the store named by mlflow.yml / MLFLOW_TRACKING_URI can be used. Returns its URI.

    An embedded SQLite file must be a SQLite database that is not locked by another writer, in a writable
    directory; a server must answer its health check; a database URL needs its driver and must accept a connection.
    (An outage *during* a run is not refused: the tracker buffers and retries, see `_flush_unlocked`.)
    """
    uri = tracking_settings(root)["tracking_uri"]
    scheme = uri.partition(":")[0]
    if scheme == "sqlite":
        _check_sqlite(Path(uri[len("sqlite:///"):]), timeout_s)
    elif scheme in ("http", "https"):
        # As MLflow's client connects: credentials from the URI or MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            r = http_request(get_default_host_creds(uri.rstrip("/")), "/health", "GET", max_retries=0,
                             timeout=timeout_s, raise_on_status=False)
            problem = None if r.status_code == 200 else f"HTTP {r.status_code} from /health" + (
                " (credentials refused)" if r.status_code in (401, 403) else "")
        except Exception as e:  # noqa: BLE001 - any failure to connect is the user's to see, on one line
            problem = type(e).__name__
        if problem:
            raise ConfigError(f"MLflow tracking server {redact(uri)} is unreachable ({problem}); start it, or "
                              "unset MLFLOW_TRACKING_URI to use the embedded store") from None
    else:
        check_database_url(uri, "tracking_uri", timeout_s)
    return uri


def _check_sqlite(db: Path, timeout_s: float) -> None:
    import sqlite3

    folder = db.parent
    while not folder.exists():
        folder = folder.parent
    if db.exists():
        if not db.is_file():
            raise ConfigError(f"MLflow store {db}: not a file")
        with open(db, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"MLflow store {db}: not a SQLite database (corrupt, or another file at that path); "
                              "move it away and the store is created anew")
        try:
            con = sqlite3.connect(db, timeout=timeout_s)
            try:
                con.execute("BEGIN IMMEDIATE")  # waits for, then fails on, a writer that holds the database
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                con.rollback()
            finally:
                con.close()
        except sqlite3.OperationalError as e:
            what = "locked by another process" if "locked" in str(e) else f"unusable ({e})"
            raise ConfigError(f"MLflow store {db}: {what}") from None
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"MLflow store {db}: corrupt ({e}); move it away and the store is created anew") from None
        if not os.access(db, os.W_OK):
            raise ConfigError(f"MLflow store {db}: not writable")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"MLflow store {db}: directory {folder} is not writable")


def check_database_url(url: str, what: str, timeout_s: float = 5.0) -> None:
    """A SQLAlchemy database URL is well formed, its driver is installed, and the server accepts a connection."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (ArgumentError, ValueError) as e:
        raise ConfigError(f"{what}: malformed database URL {url!r} ({e})") from None
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args={"connect_timeout": int(max(timeout_s, 1))}
                                          if parsed.get_backend_name() in ("postgresql", "mysql") else {})
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as e:
        extra = " (pip install -e '.[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
        raise ConfigError(f"{what}: the driver for {parsed.drivername!r} is not installed{extra}: {e}") from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        first = str(getattr(e, "orig", e)).strip().splitlines()[0] if str(getattr(e, "orig", e)).strip() else type(e).__name__
        raise ConfigError(f"{what}: cannot connect to {parsed.render_as_string(hide_password=True)}: {first}") from None
    finally:
        engine.dispose()
