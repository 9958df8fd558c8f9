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
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlcore.atomic import plainly

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rlcore.config import ExperimentConfig


def capture(trainer, engine, cfg, step: int, run_id: str | None, stream) -> dict[str, Any]:
    """Everything the run needs to continue: the trainer's state (weights, optimizers, schedule), every RNG and
    the engine's, the prompt stream's state, the step and the MLflow run."""
    return {"step": step, "run_id": run_id, "drawn": stream.position, "stream": stream.state_dict(),
            "config_hash": cfg.config_hash(),
            "reference": cfg.model.warm_start or cfg.model.name_or_path or "fresh",
            "rng": rng_state(engine.rng_state()), "engine": engine.state_dict(), **trainer.state_dict()}


def write(trainer, engine, cfg, root: Path, tracker, acc, step: int, stream) -> None:
    """The main process writes (after the tracker has stored every metric up to this step, so a resume misses
    none); every process waits, so none runs ahead of a checkpoint."""
    if tracker is not None:
        tracker.drain()
        d = root / cfg.logging.output_dir / tracker.run_id / "checkpoints"
        save(d, step, capture(trainer, engine, cfg, step, tracker.run_id, stream), cfg.trainer.keep_checkpoints)
    acc.wait_for_everyone()


def restore(trainer, engine, cfg, ckpt: dict[str, Any]) -> int:
    """Load a checkpoint into a freshly built trainer and engine; returns its step."""
    from rlcore.config import ConfigError

    if ckpt["config_hash"] != cfg.config_hash():
        raise ConfigError("--resume: the checkpoint was written by a different config")
    trainer.load_state_dict(ckpt)
    engine.set_rng_state(restore_rng(ckpt["rng"]))
    engine.load_state_dict(ckpt.get("engine", {}), trainer.unwrapped)  # weights (a stale engine: its history)
    return int(ckpt["step"])


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
        with plainly(final, "checkpoint"), os.fdopen(fd, "wb") as f:
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


class StopRequest:
    """SIGTERM/SIGINT finish the current step, write a checkpoint, then end the run as KILLED (a second signal
    stops at once). Only in the main thread; elsewhere signals keep their default handling."""

    def __init__(self) -> None:
        self.requested, self.signum, self._old = False, 0, {}

    def _handle(self, signum, frame) -> None:
        from rlcore.reward import in_reward_call

        if in_reward_call():  # a grader that hangs would keep the step from ever ending: stop now (SystemExit is
            # no Exception, so the user's `except Exception` cannot swallow it); the last checkpoint stays valid
            raise SystemExit(128 + signum)
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def save_policy(trainer, tokenizer, root: Path, cfg: ExperimentConfig, tracker, acc: Accelerator) -> Path | None:
    """Final weights to <output_dir>/<run_id>/policy (main process)."""
    acc.wait_for_everyone()
    if tracker is None:
        return None
    out = root / cfg.logging.output_dir / tracker.run_id / "policy"
    model = trainer.unwrapped
    if cfg.model.lora is not None and cfg.model.lora.merge:  # W + (alpha/r) B A: a plain HF model, no peft needed
        model = model.merge_and_unload()
    with plainly(out, "final policy"):
        model.save_pretrained(out)  # unmerged LoRA: peft writes the adapter alone (adapter_model.safetensors)
        tokenizer.save_pretrained(out)
    return out
