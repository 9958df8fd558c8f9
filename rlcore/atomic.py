"""Folders that appear whole or not at all: built in a temp folder beside their final place, then renamed."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlcore.config import RunFailed

# How a full disk reads from each writer: the OS, torch's zip writer, safetensors (Rust).
_FULL = ("No space left", "file write failed", "StorageFull", "os error 28")


def _full(e: BaseException | None, depth: int = 0) -> bool:
    """The error, or one it was raised from or during (torch's zip writer reports `unexpected pos` over the OS's
    ENOSPC), is a full disk."""
    if e is None or depth > 8:
        return False
    if getattr(e, "errno", None) == errno.ENOSPC or any(s in str(e) for s in _FULL):
        return True
    return _full(e.__cause__, depth + 1) or _full(e.__context__, depth + 1)


@contextmanager
def plainly(path: Path, what: str) -> Iterator[None]:
    """Write `what` to `path`; a full disk becomes one plain RunFailed naming the path and the space left, instead
    of `RuntimeError: [enforce fail at inline_container.cc:672] ...`."""
    try:
        yield
    except Exception as e:
        if _full(e):
            near = Path(path)
            while not near.exists() and near != near.parent:
                near = near.parent
            free = shutil.disk_usage(near).free
            raise RunFailed(f"no space left on the device writing the {what} to {path} ({free / 1e6:.1f} MB free); "
                            "free some space or point logging.output_dir elsewhere, then --resume") from None
        raise


SEAL = ".sha256.json"  # every file of a built folder and its sha256, written last


def sha256(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MB chunks: a 540 MB model is not held in memory."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: Path) -> None:
    """Record the sha256 of every file in `folder` (what `damage` checks later)."""
    import json

    files = {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL}
    (folder / SEAL).write_text(json.dumps(files, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with a sealed folder (a missing, changed or unreadable file, or no seal), or None if intact."""
    import json

    try:
        files = json.loads((folder / SEAL).read_text())
    except (OSError, ValueError):
        return f"no intact {SEAL} (built by an older version, or cut short)"
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256(p) != digest:
            return f"{name} changed since it was built"
    return None


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `final` to write into. On success it is sealed (`seal`) and replaces
    `final` by a rename (readers see the old folder or the complete new one; a killed build leaves no half-written
    one behind); on any error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        yield tmp
        seal(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
