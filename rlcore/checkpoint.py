"""Checkpoints: everything a run needs to continue bit-identically (CPU), written atomically.

One file per checkpoint, `outputs/<run_id>/checkpoints/step_000040.pt`: the policy (and critic), optimizer and
scheduler states, every RNG (python, numpy, torch, CUDA, the rollout sampler's generator), how many prompts the
stream has handed out, the step, the MLflow run id, and the identity of the reference (the warm start it was copied
from). It is written to a temp file in the same directory and renamed, so a kill during a save leaves the previous
checkpoint intact; a small JSON sidecar written after it lets `--resume` find a run's newest checkpoint without
loading weights.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def nonfinite_tensors(weights: dict[str, torch.Tensor]) -> str:
    """'' when every floating tensor is finite, else which are not: 'name (n of N values)', the first three."""
    bad = []
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def save(path_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    for part in ("policy", "critic"):
        if part in state and (bad := nonfinite_tensors(state[part])):
            raise ValueError(f"refusing to write a checkpoint with non-finite weights: {part}: {bad}")
    path_dir.mkdir(parents=True, exist_ok=True)
    clean_temp(path_dir)
    final = path_dir / f"step_{step:06d}.pt"
    fd, tmp = tempfile.mkstemp(dir=path_dir, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on POSIX: readers see the old file set or the complete new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {k: state[k] for k in ("step", "run_id", "config_hash", "reference")}
    sidecar = final.with_suffix(".json")
    tmp_meta = sidecar.with_name(f".tmp-{sidecar.name}")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, sidecar)
    for old in sorted(path_dir.glob("step_*.pt"))[:-keep]:  # keep the newest `keep`
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return final


def rng_state(sampler: torch.Tensor) -> dict[str, Any]:
    """Every RNG of this process, with the rollout engine's (`sampler`, from `engine.rng_state()`)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "sampler": sampler}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> torch.Tensor:
    """Restore this process's RNGs; returns the engine's state, for `engine.set_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["sampler"]


def load(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples; these files are written by this code, not downloaded.
    return torch.load(path, map_location="cpu", weights_only=False)


def clean_temp(path_dir: Path) -> int:
    """Remove the temp files of a save that was killed (kill -9) before its rename; only this run writes here."""
    n = 0
    for tmp in path_dir.glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def candidates(outputs: Path, config_hash: str) -> list[tuple[Path, str]]:
    """(checkpoint, run id) of every run under outputs/*/checkpoints whose config was exactly this one, newest
    first. Which of them may be resumed (not a FINISHED run, not a truncated file) is the caller's question."""
    found: list[tuple[float, Path, str]] = []
    for sidecar in outputs.glob("*/checkpoints/step_*.json"):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        pt = sidecar.with_suffix(".pt")
        if meta.get("config_hash") == config_hash and pt.is_file():
            found.append((pt.stat().st_mtime, pt, str(meta.get("run_id"))))
    return [(pt, run_id) for _, pt, run_id in sorted(found, key=lambda x: (x[0], x[1].name), reverse=True)]


def intact(path: Path) -> bool:
    """Whether a checkpoint file is complete: torch.save writes a zip archive, whose CRCs a cut file fails."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def find_latest(outputs: Path, config_hash: str) -> Path | None:
    """The newest checkpoint of this config (any run, intact or not); see `candidates`."""
    found = candidates(outputs, config_hash)
    return found[0][0] if found else None
