"""The `rlcore` command: run, validate, quickstart.

User mistakes (a bad key, a missing file) print one line `error: ...` and exit 2, before any MLflow run exists.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from rlcore.config import ConfigError, RunFailed
from rlcore.loading import load_experiment
from rlcore.preflight import preflight

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RL post-training lab: run experiments (YAML) and track them in MLflow.")

# Typer (0.29+) ships its own copy of click; its usage errors are these classes, not the `click` package's.
try:
    from typer._click import exceptions as _click
except ImportError:  # an older typer on plain click
    from click import exceptions as _click

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set trainer.lr=1e-4 (repeatable).")]


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report(result, label: str) -> None:
    if not _is_main() or result.run_id is None:
        return
    before, after = result.first_eval, result.last_eval
    typer.echo(f"\n{label} finished. MLflow run id: {result.run_id}")
    typer.echo(f"  store: {result.tracking_uri}")
    if before and after:
        for key in (k for k in ("eval/greedy_accuracy", "eval/sampled_reward") if k in before and k in after):
            typer.echo(f"  {key}: {before[key]:.3f} -> {after[key]:.3f}")
    if result.output_dir:
        typer.echo(f"  final policy: {result.output_dir}")
    typer.echo(f"  look at it: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers like 0,1,2, got {text!r}")
    return seeds


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    set_: SetOpt = None,
    seeds: Annotated[str | None, typer.Option(help="Run once per seed, e.g. 0,1,2; the runs share an MLflow "
                                                   "`rlcore.group` tag so they can be drawn as mean +- band.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest checkpoint of this exact config "
                                                          "(same MLflow run, same numbers as an uninterrupted run).")] = False,
    ship_it: Annotated[bool, typer.Option("--ship", help="`kind: sft` only: copy the built warm start to "
                                                         "warm_starts/<file stem>/ with its manifest, for committing.")] = False,
) -> None:
    """Run an experiment YAML (RL, or `kind: sft` for a warm start)."""
    cfg = load_experiment(file, set_ or [])
    from rlcore.tracking import project_root

    if ship_it and (cfg.kind != "sft" or seeds is not None or resume):
        raise ConfigError("--ship: only for a `kind: sft` experiment, without --seeds or --resume")
    if resume and cfg.kind in ("sft", "dpo", "reward_model", "search"):  # no checkpoints: a "resume" would start over
        raise ConfigError(f"--resume: a `kind: {cfg.kind}` run keeps no checkpoint to continue from; run it again "
                          "without --resume")
    if resume and seeds is not None:
        raise ConfigError("--resume: continues one run; resume each seed of a --seeds batch with "
                          "--set seed=N --resume")
    if seeds is not None:
        seed_list = _parse_seeds(seeds)
        if cfg.kind != "rl":
            raise ConfigError("--seeds: only for `kind: rl` experiments")
        # Validate every seed's config before the first run starts, so a bad one cannot fail half-way.
        configs = [load_experiment(file, [*(set_ or []), f"seed={s}"]) for s in seed_list]
        preflight(configs, project_root())
        from rlcore.controller import run as run_rl

        for c in configs:
            _report(run_rl(c, project_root()), f"{file} (seed {c.seed})")
        if _is_main():
            typer.echo(f"\n{len(configs)} seeds done; MLflow tag rlcore.group = {cfg.seed_group()}")
        return

    root = project_root()
    preflight([cfg], root)
    if cfg.kind == "sft":
        from rlcore.sft import MANIFEST, cache_dir, find_shipped, sha256, ship, train_sft

        out = cache_dir(cfg, root)
        metrics = train_sft(cfg, out, root)
        typer.echo(f"warm start saved to {out}  (sha256 of its weights: {sha256(out / 'model.safetensors')[:16]})")
        if ship_it:
            dest = ship(cfg, out, root, file.stem, metrics)
            typer.echo(f"shipped to {dest} (commit it: every machine then starts RL from these bits)")
        elif (shipped := find_shipped(cfg, root, quiet=True)) is not None:
            import json

            meta = json.loads((shipped / MANIFEST).read_text())
            same = meta["files"]["model.safetensors"] == sha256(out / "model.safetensors")
            typer.echo(f"the shipped copy {shipped} ({meta['heldout']}) is what RL runs use; this rebuild is "
                       + ("bit-identical to it" if same else "NOT bit-identical to it (another CPU, thread count or "
                          "library version), see its MANIFEST.json"))
        return
    if cfg.kind == "dpo":
        from rlcore.dpo import train_dpo

        run_id, before, after, out = train_dpo(cfg, root)
        if not _is_main():
            return
        typer.echo(f"\n{file} finished. MLflow run id: {run_id}")
        for key in (k for k in ("eval/greedy_accuracy", "eval/sampled_reward") if k in before and k in after):
            typer.echo(f"  {key}: {before[key]:.3f} -> {after[key]:.3f}")
        typer.echo(f"  final policy: {out}")
        return
    if cfg.kind == "reward_model":
        from rlcore.rm_training import train_reward_model

        run_id, metrics, out = train_reward_model(cfg, root)
        if not _is_main():
            return
        if cfg.reward_model.type == "process":
            typer.echo(f"process reward model saved to {out}  (MLflow run {run_id}): held-out step accuracy "
                       f"{metrics['prm/heldout_step_accuracy']:.3f}, last step {metrics['prm/heldout_final_accuracy']:.3f}")
            return
        typer.echo(f"reward model saved to {out}  (MLflow run {run_id}): held-out pair accuracy "
                   f"{metrics['rm/heldout_accuracy']:.3f} against the labels, {metrics['rm/heldout_true_accuracy']:.3f} "
                   "against the true reward")
        return
    if cfg.kind == "search":
        from rlcore.search import run_search

        run_id, last = run_search(cfg, root)
        typer.echo(f"\n{file} finished. MLflow run id: {run_id}; held-out true accuracy at N = {cfg.search.n[-1]}:")
        for key, value in last.items():
            typer.echo(f"  {key.removeprefix('search/'):20} {value:.3f}")
        return
    if cfg.kind == "preferences":
        if resume:
            raise ConfigError("--resume: a `kind: preferences` experiment is written once, atomically; run it again")
        from rlcore.preferences import PAIRS, run_preferences

        out, card, run_id = run_preferences(cfg, root)
        agree = "-" if card["true_agreement"] is None else f"{card['true_agreement']:.3f}"
        typer.echo(f"{card['pairs']} pairs ({card['ties']} ties, {card['flipped']} flipped; labels agree with the "
                   f"true reward on {agree} of the pairs it decides) in {out / PAIRS}  (MLflow run {run_id})")
        return
    from rlcore.controller import run as run_rl

    checkpoint_path = choose_checkpoint(cfg, root) if resume else None
    _report(run_rl(cfg, root, resume=checkpoint_path), str(file))


def choose_checkpoint(cfg, root: Path) -> Path:
    """`--resume`: the newest intact checkpoint of a run of exactly this config that did not finish.

    A FINISHED run is never reopened; a run whose process is still alive is not taken over; a truncated newest
    checkpoint falls back to the previous one with a warning. Runs of this config left RUNNING by a process that
    no longer exists (killed before their first checkpoint) are closed as KILLED on the way."""
    from rlcore import checkpoint
    from rlcore.runs import reap_orphans, run_state

    found = list(checkpoint.candidates(root / cfg.logging.output_dir, cfg.config_hash()))
    reaped = reap_orphans(root, cfg.logging.experiment, cfg.config_hash()) if _is_main() else []
    for run_id in reaped:
        if not any(r == run_id for _, r in found):  # one with a checkpoint is the run resumed below
            typer.echo(f"run {run_id}: its process is gone and it left no checkpoint; closed as KILLED", err=True)
    states: dict[str, tuple[str | None, bool]] = {}
    for pt, run_id in found:
        status, alive = states.setdefault(run_id, run_state(root, run_id))
        if status in (None, "FINISHED"):  # deleted, or done: its checkpoints are history, not a place to resume
            continue
        if status == "RUNNING" and alive:
            raise ConfigError(f"--resume: run {run_id} of this config is still running (its process is alive)")
        if not checkpoint.intact(pt):
            typer.echo(f"warning: {pt} is truncated or corrupt; trying the previous checkpoint", err=True)
            continue
        checkpoint.clean_temp(pt.parent)
        if _is_main():
            typer.echo(f"resuming from {pt}")
        return pt
    raise ConfigError(f"--resume: no checkpoint of an unfinished run of this config under {cfg.logging.output_dir}/ "
                      "(the config must be identical, overrides included)")


@app.command("eval")
def eval_search(
    file: Annotated[Path, typer.Argument(help="Experiment YAML: its task, prompt, reward (the first component is "
                                              "the truth) and starting policy.")],
    n: Annotated[int, typer.Option("--n", min=1, max=4096, help="Samples per prompt for best-of-N and the oracle.")] = 4,
    rm: Annotated[str | None, typer.Option("--rm", help="Reward model: a trained folder or a `kind: reward_model` "
                                                        "experiment (trained on first use).")] = None,
    prm: Annotated[str | None, typer.Option("--prm", help="Process reward model (a `kind: reward_model` experiment "
                                                          "with type: process, or its folder): adds best-of-N ranked "
                                                          "by it and PRM-guided beam search.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="A policy folder (e.g. outputs/<run_id>/policy) "
                                                                 "instead of the experiment's starting policy.")] = None,
    set_: SetOpt = None,
) -> None:
    """Search at evaluation: greedy vs best-of-N (ranked by an outcome or a process reward model) vs PRM beam search
    vs the oracle, at N samples a prompt."""
    cfg = load_experiment(file, set_ or [])
    from rlcore.tracking import project_root

    root = project_root()
    if policy is not None and not (policy / "config.json").is_file():
        raise ConfigError(f"--policy: {str(policy)!r} is not a model folder (no config.json)")
    from rlcore.loading import check_reward_model_path
    from rlcore.rm_training import resolve

    dirs = {}
    for key, path, want in (("--rm", rm, "outcome"), ("--prm", prm, "process")):
        if path is not None:
            check_reward_model_path(cfg, key, str(Path(path).resolve()), want)
            dirs[key] = resolve(str(Path(path).resolve()), cfg._base_dir, root)
    from rlcore.search import evaluate_search

    rows = evaluate_search(cfg, root, n, dirs.get("--rm"), policy, process_model=dirs.get("--prm"))
    typer.echo(f"{'method':13} {'n':>5} {'accuracy':>9} {'samples':>8} {'tokens':>8}   ({len(rows) and rows[0]['samples']} "
               "held-out prompts)")
    for r in rows:
        typer.echo(f"{r['method']:13} {r['n']:5d} {r['accuracy']:9.3f} {r['samples']:8d} {r['tokens']:8d}")


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Experiment or sweep YAML, or a lesson .md.")],
             set_: SetOpt = None) -> None:
    """Check an experiment, a sweep or a lesson's front matter against its schema without running anything."""
    if file.suffix == ".md":
        if set_:
            raise ConfigError("--set: a lesson's front matter takes no overrides (validate the experiment it names)")
        from rlcore.lessons import check, parse
        from rlcore.tracking import project_root

        lesson = parse(file)
        check(lesson, project_root())
        typer.echo(f"ok: {file} (lesson {lesson.meta.id}: {lesson.meta.title})")
        return
    from rlcore.loading import load_yaml

    if "space" in load_yaml(file):
        from rlcore.sweep_config import load_sweep

        if set_:
            raise ConfigError("--set: not applied to a sweep file; put the keys in its `overrides:` list, or "
                              "validate the base experiment with --set")
        sw = load_sweep(file)
        typer.echo(f"ok: {file} (sweep {sw.name}, {sw.n_trials} trials over {', '.join(sw.space)})")
        return
    cfg = load_experiment(file, set_ or [])
    from rlcore.tracking import project_root

    preflight([cfg], project_root())  # "will it run?" includes the store and the output directory
    what = {"rl": f"algorithm={cfg.algorithm.name}, steps={cfg.trainer.steps}", "sft": f"steps={cfg.trainer.steps}",
            "search": f"n={cfg.search.n}"}.get(cfg.kind)
    typer.echo(f"ok: {file} ({cfg.kind}{', ' + what if what else ''})")


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep YAML (see experiments/sweeps/).")],
    trials: Annotated[int | None, typer.Option(help="Override n_trials.")] = None,
    workers: Annotated[int | None, typer.Option(help="Override workers (processes on this machine).")] = None,
) -> None:
    """Run (or continue) an Optuna sweep; every trial is an MLflow child run of the sweep's parent run."""
    from rlcore.preflight import check_database_url
    from rlcore.sweep import format_summary, load_sweep, run_sweep
    from rlcore.tracking import project_root

    sw = load_sweep(file, trials, workers)  # validate before anything starts
    if sw.storage is not None and "://" in sw.storage:
        check_database_url(sw.storage, "storage")
    root = project_root()
    preflight([load_experiment(sw.base_path, sw.overrides)], root)
    result = run_sweep(file, trials, workers)
    typer.echo("\n" + format_summary(result, sw.objective.metric))


@app.command()
def lesson(
    lesson_id: Annotated[str, typer.Argument(help="Lesson number (03), a range (01-14), a comma list, or all.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the runs.")] = False,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="Runs at once, each in its own process with the cores "
                                      "shared out (same numbers as one at a time: the runs are seeded).")] = 1,
) -> None:
    """Print lessons' paired experiments and run them (variants x seeds), tagged so the dashboard finds them.

    Several lessons at once run each distinct config once and tag it with every lesson that pairs it."""
    import time

    from rlcore.lessons import check, load_all, merged_plan, select
    from rlcore.tracking import project_root

    root = project_root()
    chosen = select(load_all(root), lesson_id)
    for x in chosen:
        check(x, root)
    plan = merged_plan(chosen, root)
    configs = [load_experiment(root / "experiments" / r.file, [*r.overrides, f"logging.tags.lesson='{','.join(r.lessons)}'",
                                                               f"logging.tags.variant='{r.variant}'"])
               for r in plan]  # all validated before the first run
    if not dry_run:
        preflight(configs, root)
    for x in chosen:
        typer.echo(f"lesson {x.meta.id}: {x.meta.title}\n  {x.meta.question}")
    typer.echo(f"{len(plan)} distinct runs:")
    for r in plan:
        typer.echo(f"  experiments/{r.file}  {' '.join(r.overrides)}  (lesson {', '.join(r.lessons)})")
    if dry_run or not plan:
        return
    cpu0, wall0 = _cpu_seconds(), time.time()
    if jobs == 1:
        for i, (r, c) in enumerate(zip(plan, configs, strict=True), 1):
            typer.echo(f"\n[{i}/{len(plan)}] experiments/{r.file} {' '.join(r.overrides)}")
            _report(run_any(c, root), r.file)
    else:
        import multiprocessing as mp

        import torch

        threads = max(1, torch.get_num_threads() // jobs)  # the cores rlcore.threads left free, shared out
        typer.echo(f"\n{jobs} runs at a time, {threads} torch thread(s) each")
        with mp.get_context("spawn").Pool(jobs, initializer=_lesson_worker, initargs=(threads,)) as pool:
            work = [(c, str(root), f"experiments/{r.file} {' '.join(r.overrides)}") for r, c in zip(plan, configs, strict=True)]
            for i, (label, result) in enumerate(pool.imap_unordered(_lesson_run, work), 1):
                typer.echo(f"\n[{i}/{len(plan)}] done: {label}")
                _report(result, label.split()[0])
    typer.echo(f"\n{len(plan)} runs in {time.time() - wall0:.0f} s, {_cpu_seconds() - cpu0:.0f} CPU seconds "
               "(all processes, all threads)")
    for x in chosen:
        typer.echo(f"lesson {x.meta.id} look for: {x.meta.look_for}")
    typer.echo(f"  rlcore dashboard  -> Lessons -> {chosen[0].meta.id}")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the --jobs workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _lesson_worker(threads: int) -> None:
    os.environ["RLCORE_THREADS"] = str(threads)  # K workers share the cores
    from rlcore import threads as _threads

    _threads.apply()  # a spawned worker starts with torch's default (a thread per core) until told otherwise
    os.environ["RLCORE_NO_BAR"] = "1"  # K progress bars on one terminal are unreadable; each finished run is said
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which terminates the pool


def _lesson_run(item):
    cfg, root, label = item
    return label, run_any(cfg, Path(root))


def run_any(cfg, root: Path):
    """A lesson's run of any kind (RL, DPO, a reward model, preference data) as a RunResult."""
    from rlcore.controller import RunResult
    from rlcore.controller import run as run_rl
    from rlcore.tracking import redact, tracking_settings

    uri = redact(tracking_settings(root)["tracking_uri"])
    if cfg.kind == "dpo":
        from rlcore.dpo import train_dpo

        run_id, before, after, out = train_dpo(cfg, root)
        return RunResult(run_id, uri, before, after, out)
    if cfg.kind == "reward_model":
        from rlcore.rm_training import train_reward_model

        run_id, metrics, out = train_reward_model(cfg, root)
        return RunResult(run_id, uri, {}, metrics, out)
    if cfg.kind == "preferences":
        from rlcore.preferences import run_preferences

        out, _, run_id = run_preferences(cfg, root)
        return RunResult(run_id, uri, {}, {}, out)
    if cfg.kind == "search":
        from rlcore.search import run_search

        run_id, last = run_search(cfg, root)
        return RunResult(run_id, uri, {}, last, None)
    if cfg.kind == "sft":
        raise ConfigError("a lesson pairs RL, DPO, reward-model, search or preference runs; a warm start is built by "
                          "`rlcore run`")
    return run_rl(cfg, root)


@app.command()
def replay(file: Annotated[Path, typer.Argument(help="A .jsonl file the tracker kept during an MLflow outage.")]) -> None:
    """Deliver the metrics and final status that a run could not send while MLflow was unreachable."""
    from rlcore.runs import replay as replay_file

    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    try:
        run_id, n, status = replay_file(file)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{file}: not a replay file ({e})") from None
    typer.echo(f"delivered {n} metrics to run {run_id}; status {status}")


@app.command()
def dashboard(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
) -> None:
    """Open the Streamlit dashboard on the MLflow store named by mlflow.yml."""
    import subprocess

    app_path = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    if not app_path.is_file():
        _fail(f"{app_path}: the dashboard is not installed beside rlcore")
    typer.echo(f"dashboard: http://{host}:{port}  (Ctrl-C to stop)")
    # dashboard.serve: `streamlit run app.py` with the pages' heavy imports done before the server starts
    raise typer.Exit(subprocess.call([sys.executable, "-m", "dashboard.serve", "--server.address", host,
                                      "--server.port", str(port), "--server.headless", "true",
                                      "--browser.gatherUsageStats", "false"],
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                         filter(None, [str(app_path.parent.parent), os.environ.get("PYTHONPATH")]))}))


@app.command()
def quickstart(set_: SetOpt = None) -> None:
    """Warm start (cached after the first time) + a short GRPO run on the default tiny model, logged to MLflow."""
    from rlcore.tracking import project_root

    root = project_root()
    path = root / "experiments" / "quickstart.yaml"
    if not path.is_file():
        _fail(f"{path}: not found (run quickstart from the rlcore project directory)")
    cfg = load_experiment(path, set_ or [])
    preflight([cfg], root)
    from rlcore.controller import run as run_rl

    _report(run_rl(cfg, root), "quickstart")
    typer.echo("  compare runs, read the lessons next to them: rlcore dashboard")


def _terminate(signum, frame) -> None:
    # SIGTERM (kill, a scheduler, the dashboard's stop button) unwinds like Ctrl-C, so the MLflow run is closed
    # as KILLED instead of being left RUNNING.
    raise SystemExit(128 + signum)


_HEAVY = {"run", "quickstart", "lesson", "sweep"}  # commands that train (the rest must start fast)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if _HEAVY & set(sys.argv[1:2]) and "--help" not in sys.argv:
            from rlcore import threads

            threads.apply()  # before any torch work; each run prints the choice (threads.describe)
        code = app(standalone_mode=False, prog_name="rlcore")  # usage errors come back here, to be said on one line
    except _click.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(0)
    except _click.UsageError as e:  # unknown option, missing argument, a value of the wrong type
        where = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
        typer.echo(f"error: {e.format_message()}{where}".replace("\n", " "), err=True)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C while click itself was prompting or parsing
        sys.exit(130)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RunFailed as e:  # the run exists and is marked FAILED in MLflow with this reason
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:
        _leave_process_group()
    sys.exit(code if isinstance(code, int) else 0)


def _leave_process_group() -> None:
    """Tear down a torch.distributed process group before the interpreter exits: left to the interpreter's own
    shutdown, gloo's threads can abort a rank ("terminate called without an active exception") after a clean run."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
