"""Sweeps on Optuna: a YAML search space over any experiment key, pruning fed by the periodic held-out eval,
K worker processes sharing one study through Optuna's storage, and MLflow runs: one parent per sweep, one child per
trial (tagged with its number and final state).

Storage is a local Optuna journal file beside the MLflow store by default (Optuna advises against SQLite for
parallel workers), or any Optuna RDB URL (PostgreSQL) so workers on several machines join one study: the same
`rlcore sweep FILE` started elsewhere with the same storage and study name takes trials from the same queue.

Interrupted trials (a killed worker, Ctrl-C) are not lost: the next worker to look marks them FAIL, closes their
MLflow run as KILLED, and re-queues their parameters, so a re-run finishes exactly the trials that are missing.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlcore import optuna_store, runs
from rlcore.config import ConfigError
from rlcore.loading import load_experiment
from rlcore.sweep_config import FloatParam, IntParam, SweepConfig, load_sweep
from rlcore.tracking import local_process_alive, owner

HEARTBEAT_S = 10.0  # a running trial refreshes its heartbeat this often ...
STALE_S = 60.0  # ... and is presumed dead (worker on another machine) after this long without one


# ------------------------------------------------------------------------------------------------ optuna

def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials report through MLflow and the progress line
    return optuna


def storage_from_spec(spec: str | None, root: Path):
    """An Optuna storage for `None` (the default journal), `journal:PATH`, a bare journal path, or an RDB URL."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec is not None and "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = default_journal(root) if spec is None else Path(spec.removeprefix("journal:"))
    path = path if path.is_absolute() else root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def default_journal(root: Path) -> Path:
    """`optuna.journal` in the directory of the embedded MLflow database (or .rlcore_cache with a server)."""
    from rlcore.tracking import tracking_settings

    uri = tracking_settings(root)["tracking_uri"]
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "optuna.journal"
    return root / ".rlcore_cache" / "optuna.journal"


def distributions(sw: SweepConfig) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, p in sw.space.items():
        if isinstance(p, FloatParam):
            out[key] = FloatDistribution(p.low, p.high, log=p.log)
        elif isinstance(p, IntParam):
            out[key] = IntDistribution(p.low, p.high, log=p.log, step=1 if p.log else p.step)
        else:
            out[key] = CategoricalDistribution(p.choices)
    return out


def make_study(sw: SweepConfig, storage, worker: int = 0):
    """Load or create the study. The sampler's seed is the configured seed for a fresh study's first worker, shifted
    per worker and by the trials already in the study: a continued sweep must not replay the same random points."""
    optuna = _optuna()
    try:
        existing = len(optuna.load_study(study_name=sw.name, storage=storage).get_trials(deepcopy=False))
    except KeyError:  # no such study yet
        existing = 0
    s = sw.sampler
    seed = s.seed + worker + 7919 * existing
    if s.name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    p = sw.pruner
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials,
                                                            n_warmup_steps=p.n_warmup_steps),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[p.name]()
    return optuna.create_study(study_name=sw.name, storage=storage, sampler=sampler, pruner=pruner,
                               direction=sw.objective.direction, load_if_exists=True)


@contextmanager
def claim_lock(root: Path, name: str) -> Iterator[None]:
    """Serialises 'count trials, then ask for one' across the workers of this machine (no over-shooting n_trials)."""
    path = root / ".rlcore_cache" / "sweeps" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(owner_tag: str | None, heartbeat: float | None) -> bool:
    """Whether the worker that owns a RUNNING trial still exists."""
    if owner_tag is None:
        return True  # just asked, attributes not written yet
    alive = local_process_alive(owner_tag)
    if alive is not None:
        return alive
    return heartbeat is None or time.time() - heartbeat < STALE_S  # another host: its heartbeat says


def reap_stale(study, client) -> int:
    """Mark RUNNING trials whose worker is gone as FAIL (interrupted), close their MLflow run as KILLED and put
    their parameters back in the queue. Returns how many were reaped."""
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    reaped = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _alive(t.user_attrs.get("worker"), t.user_attrs.get("heartbeat")):
            continue
        optuna_store.set_trial_attr(study, t, "interrupted", True)
        optuna_store.fail_trial(study, t)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        runs.close_trial(client, t.user_attrs.get("mlflow_run_id"), "FAIL", "KILLED")
        reaped += 1
    return reaped


def counts(study) -> dict[str, int]:
    """Trials that count toward n_trials: finished (complete, pruned, crashed) or running; interrupted ones don't."""
    out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "INTERRUPTED": 0}
    for t in study.get_trials(deepcopy=False):
        state = t.state.name
        if state == "FAIL" and t.user_attrs.get("interrupted"):
            state = "INTERRUPTED"
        if state in out:
            out[state] += 1
    return out


def counted(c: dict[str, int]) -> int:
    return c["COMPLETE"] + c["PRUNED"] + c["FAIL"] + c["RUNNING"]


# ------------------------------------------------------------------------------------------------ mlflow parent

def parent_run(sw: SweepConfig, study, root: Path) -> str:
    """The sweep's MLflow parent run, created once per study (its id lives in the study's user attributes)."""
    client = runs.client(root)
    existing = study.user_attrs.get("mlflow_parent_run_id")
    if existing is not None:
        runs.reopen(client, existing)
        return existing
    from rlcore.tracking import tracking_settings

    run_id = runs.sweep_parent(client, sw.name, sw.mlflow_experiment or sw.name,
                               tracking_settings(root)["artifact_location"], sw.model_dump(mode="json"),
                               {"n_trials": sw.n_trials, "objective": f"{sw.objective.direction} {sw.objective.metric}",
                                "space": ", ".join(sw.space)})
    study.set_user_attr("mlflow_parent_run_id", run_id)
    time.sleep(0.5)  # two launchers racing: both re-read after both wrote, and the loser removes its run
    winner = optuna_store.study_attr(study, "mlflow_parent_run_id")
    if winner != run_id:
        client.delete_run(run_id)
    return winner


def best_complete(study, direction: str):
    """The best COMPLETE trial (None before any completes)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return (max if direction == "maximize" else min)(done, key=lambda t: t.value) if done else None


def update_parent(client, parent: str, study, direction: str) -> None:
    """Best value and params so far on the parent run (metric sweep/best_value, tags best.*)."""
    best = best_complete(study, direction)
    if best is None:
        return
    finished = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    tags = {"best.trial": str(best.number), "best.value": f"{best.value:.6g}",
            "best.run_id": str(best.user_attrs.get("mlflow_run_id"))}
    tags |= {f"best.{k}": str(v) for k, v in best.params.items()}
    runs.record_best(client, parent, finished, best.value, tags)


# ------------------------------------------------------------------------------------------------ workers

def worker(sweep_path: str, trials: int | None, worker_index: int, threads: int, root: str) -> None:
    """One worker: claim a trial, run it, report it, until the study has n_trials or the timeout passes."""
    import torch

    from rlcore.controller import run as run_rl

    torch.set_num_threads(threads)
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    rootp = Path(root)
    sw = load_sweep(sweep_path, trials=trials)
    study = make_study(sw, storage_from_spec(sw.storage, rootp), worker_index)
    client = runs.client(rootp)
    parent = optuna_store.study_attr(study, "mlflow_parent_run_id")
    dists = distributions(sw)
    started, launcher = time.time(), os.getppid()
    while True:
        if sw.timeout is not None and time.time() - started > sw.timeout:
            return
        if worker_index > 0 and os.getppid() != launcher:  # the launcher died: claim nothing new
            return
        with claim_lock(rootp, sw.name):
            reap_stale(study, client)
            if counted(counts(study)) >= sw.n_trials:
                return
            trial = study.ask(dists)
            trial.set_user_attr("worker", owner())
        params = {k: trial.params[k] for k in sw.space}
        try:
            cfg = load_experiment(sw.base_path,
                                  [*sw.overrides, f"logging.experiment={sw.mlflow_experiment or sw.name}"], params)
        except ConfigError as e:
            # Each end of each range is valid (load_sweep checked), this combination is not: the trial FAILs with
            # the reason, and is not re-queued (the same parameters would fail the same way).
            trial.set_user_attr("error", f"invalid combination: {e}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number} failed: invalid combination {params}: {e}", flush=True)
            continue
        beat = optuna_store.heartbeat(study, trial, HEARTBEAT_S)
        tags = {"rlcore.study": sw.name, "rlcore.trial": str(trial.number), "rlcore.trial_state": "RUNNING"}
        if parent:
            tags["mlflow.parentRunId"] = parent

        def on_start(run_id: str, trial=trial) -> None:
            trial.set_user_attr("mlflow_run_id", run_id)

        def on_eval(step: int, metrics: dict[str, float], trial=trial) -> bool:
            trial.report(metrics[sw.objective.metric], step)
            return trial.should_prune()

        try:
            result = run_rl(cfg, rootp, tags, on_start, on_eval)
        except Exception as e:  # a crashed trial is recorded and the sweep goes on
            beat.set()
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            runs.close_trial(client, trial.user_attrs.get("mlflow_run_id") or _run_of(study, trial), "FAIL")
            print(f"trial {trial.number} failed: {type(e).__name__}: {e}", flush=True)
            continue
        except BaseException:  # Ctrl-C / SIGTERM: interrupted, not failed; its point goes back in the queue
            beat.set()
            optuna_store.set_trial_attr(study, trial, "interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            runs.close_trial(client, _run_of(study, trial), "FAIL", "KILLED")
            raise
        beat.set()
        trial.set_user_attr("steps_done", result.steps_done)
        value = result.last_eval[sw.objective.metric]
        if result.stopped_early:
            study.tell(trial, state=TrialState.PRUNED)
            state = "PRUNED"
        else:
            study.tell(trial, value)
            state = "COMPLETE"
        runs.close_trial(client, result.run_id, state)
        if parent:
            update_parent(client, parent, study, sw.objective.direction)


def _run_of(study, trial) -> str | None:
    return optuna_store.trial_attr(study, trial, "mlflow_run_id")


def _worker_entry(*args) -> None:
    import signal

    os.environ["RLCORE_NO_BAR"] = "1"  # K progress bars on one terminal are unreadable; the launcher shows one line
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(128 + s)))
    try:
        worker(*args)
    except KeyboardInterrupt:
        pass


# ------------------------------------------------------------------------------------------------ launcher

def run_sweep(path: str | Path, trials: int | None = None, workers: int | None = None,
              root: Path | None = None) -> dict[str, Any]:
    """`rlcore sweep`: start the workers, show progress, mark the parent run, and return the summary."""
    from tqdm import tqdm

    from rlcore.tracking import project_root

    sw = load_sweep(path, trials, workers)
    root = root or project_root()
    study = make_study(sw, storage_from_spec(sw.storage, root))
    parent = parent_run(sw, study, root)
    client = runs.client(root)
    import torch

    threads = max(1, torch.get_num_threads() // sw.workers)  # the cores rlcore.threads left free, shared out
    args = (str(path), trials, 0, threads, str(root))
    status = "KILLED"
    procs: list = []
    try:
        if sw.workers == 1:
            worker(*args)
        else:
            ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch/MLflow threads
            procs = [ctx.Process(target=_worker_entry, args=(*args[:2], i, *args[3:]), daemon=False)
                     for i in range(sw.workers)]
            for p in procs:
                p.start()
            bar = tqdm(total=sw.n_trials, desc=f"sweep {sw.name}", unit="trial", dynamic_ncols=True)
            while any(p.is_alive() for p in procs):
                c = counts(study)
                bar.n = c["COMPLETE"] + c["PRUNED"] + c["FAIL"]
                bar.set_postfix(running=c["RUNNING"], pruned=c["PRUNED"], failed=c["FAIL"])
                time.sleep(1.0)
            bar.close()
        c = counts(study)
        # Trials still RUNNING now belong to another launcher joined to the study (another machine): the parent
        # stays open, and the last launcher to finish closes it.
        status = "RUNNING" if c["RUNNING"] else "FINISHED" if counted(c) >= sw.n_trials else "KILLED"
    finally:
        for p in procs:  # Ctrl-C reached the workers too; give them time to close their runs
            p.join(timeout=30)
        update_parent(client, parent, study, sw.objective.direction)
        if status != "RUNNING":
            client.set_terminated(parent, status=status)
    return summary(sw, study, parent)


def summary(sw: SweepConfig, study, parent: str) -> dict[str, Any]:
    c = counts(study)
    best = best_complete(study, sw.objective.direction)
    out: dict[str, Any] = {"study": sw.name, "parent_run_id": parent, "counts": c,
                           "trial_steps": sum(t.user_attrs.get("steps_done", 0) for t in study.get_trials(deepcopy=False))}
    if best is not None:
        out |= {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
                "best_run_id": best.user_attrs.get("mlflow_run_id")}
    return out


def format_summary(s: dict[str, Any], metric: str) -> str:
    c = s["counts"]
    lines = [f"study {s['study']}  (MLflow parent run {s['parent_run_id']})",
             f"  trials: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed"
             + (f", {c['INTERRUPTED']} interrupted and re-queued" if c["INTERRUPTED"] else ""),
             f"  trial-steps run: {s['trial_steps']}"]
    if "best_trial" in s:
        lines.append(f"  best trial: #{s['best_trial']}  {metric} = {s['best_value']:.4f}  run {s['best_run_id']}")
        width = max(len(k) for k in s["best_params"])
        lines += [f"    {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"    {k:<{width}}  {v}"
                  for k, v in s["best_params"].items()]
    else:
        lines.append("  no trial completed")
    return "\n".join(lines)
