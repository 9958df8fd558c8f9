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


def save(path_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    path_dir.mkdir(parents=True, exist_ok=True)
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


def rng_state(sampler: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "sampler": sampler.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], sampler: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples; these files are written by this code, not downloaded.
    return torch.load(path, map_location="cpu", weights_only=False)


def find_latest(outputs: Path, config_hash: str) -> Path | None:
    """The newest checkpoint under outputs/*/checkpoints whose run had exactly this config."""
    best: tuple[float, Path] | None = None
    for sidecar in outputs.glob("*/checkpoints/step_*.json"):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        pt = sidecar.with_suffix(".pt")
        if meta.get("config_hash") == config_hash and pt.is_file():
            key = pt.stat().st_mtime
            if best is None or key > best[0]:
                best = (key, pt)
    return best[1] if best else None
