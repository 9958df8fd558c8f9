"""Controller: the RL loop. rollout -> reward -> reference -> old log-probs -> advantages -> update -> sync.

Reads top to bottom; one timed line per phase. Runs the same under `accelerate launch`/`torchrun` with N
processes: each process samples its share of the step's prompts, gradients are averaged, and only the main
process evaluates and logs.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rlcore import checkpoint, threads
from rlcore.algorithm import GROUP_FILTERS, Needs, advantages, lookup, overlong_penalty, requirements
from rlcore.batch import Problem, RolloutBatch
from rlcore.config import ConfigError, ExperimentConfig, RunFailed, flatten
from rlcore.critic import Critic, explained_variance
from rlcore.evaluation import evaluate
from rlcore.model import build_policy
from rlcore.reference import Reference
from rlcore.rollout import ENGINES, RolloutEngine, Sampling
from rlcore.seeding import seed_everything
from rlcore.sft import SHIPPED_DIR, sha256, warm_start_dir
from rlcore.tasks import AdditionTask, make_task, score
from rlcore.timing import PhaseTimer
from rlcore.tools import make_tool
from rlcore.tracking import CONFIG_TAG, Tracker, git_commit, project_root
from rlcore.trainer import Trainer


@dataclass
class RunResult:
    run_id: str | None
    tracking_uri: str | None
    first_eval: dict[str, float]
    last_eval: dict[str, float]
    output_dir: Path | None
    steps_done: int = 0
    stopped_early: bool = False  # `on_eval` asked to stop (a sweep's pruner)


@dataclass
class Loop:
    """The roles of one run, built once by `build`; `step` drives them."""

    cfg: ExperimentConfig
    acc: Accelerator
    task: AdditionTask
    tokenizer: PreTrainedTokenizerBase
    engine: RolloutEngine
    reference: Reference | None
    trainer: Trainer
    critic: Critic | None
    group_filter: Callable
    needs: Needs  # the phases this algorithm runs, from what its axes declare
    local: slice  # this process's share of each step's prompts
    warm_start: Path | None = None  # the directory the policy was loaded from (shipped or built here)


def build(cfg: ExperimentConfig, root: Path) -> Loop:
    # cpu=True on a machine without CUDA is what makes Accelerate join a torchrun/`accelerate launch` process
    # group over gloo; without it every process silently trains alone.
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    if world != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but Accelerate joined {world} process(es)")
    n = cfg.rollout.prompts_per_step
    if n % world:
        raise ConfigError(f"rollout.prompts_per_step: must be divisible by the {world} processes, got {n}")
    seed_everything(cfg.seed)
    with acc.main_process_first():  # the main process builds the warm start once; the others then load it
        ws = warm_start_dir(cfg, root, quiet=not acc.is_main_process)
    policy, tokenizer = build_policy(cfg.model, ws)
    needs = requirements(cfg.algorithm)
    reference = Reference(policy) if needs.reference else None  # beta = 0: no reference at all
    critic = Critic(policy, cfg, acc) if needs.values else None
    trainer = Trainer(policy, cfg, acc, critic)
    return Loop(
        cfg=cfg, acc=acc, task=make_task(cfg.task), tokenizer=tokenizer,
        engine=ENGINES[cfg.rollout.engine](trainer.unwrapped, tokenizer, seed=cfg.seed, chat=cfg.model.use_chat_template,
                             tool=make_tool(cfg.task.tool), max_tool_calls=cfg.task.max_tool_calls),
        reference=reference, trainer=trainer, critic=critic,
        group_filter=lookup(GROUP_FILTERS, cfg.algorithm.group_filter, "group_filter"), needs=needs,
        local=slice(rank * n // world, (rank + 1) * n // world),
        warm_start=ws,
    )


def sample(loop: Loop, problems: list[Problem], timer: PhaseTimer, round_: int = 0) -> RolloutBatch:
    """Rollout and reward for this process's share of `problems` (round_ keeps group ids unique across rounds)."""
    cfg, r = loop.cfg, loop.cfg.rollout
    with timer("rollout"):
        batch = loop.engine.generate(problems, r.samples_per_prompt, Sampling(r.max_new_tokens, r.temperature, r.top_p),
                                     rows=loop.local, group_offset=round_ * len(problems))
        if loop.acc.num_processes > 1:
            batch.reduce_sum = lambda t: loop.acc.reduce(t.to(loop.acc.device), reduction="sum").cpu()
    with timer("reward"):
        batch.shaping = overlong_penalty(batch, cfg.algorithm, r.max_new_tokens)  # [B] 0 unless DAPO shaping is on
        batch.rewards = score(loop.task, batch) + batch.shaping  # [B] the verifier's reward, plus shaping
    return batch


def fill_batch(loop: Loop, batch: RolloutBatch, draw: Callable[[], list[Problem]] | None,
               timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
    """Group filtering with resampling (DAPO's dynamic sampling): draw rounds until every process has as many kept
    groups as it started with, or `max_sample_rounds`; then fill any shortfall with filtered-out groups.

    Every process runs the same number of rounds (they agree on 'done' by a sum over processes), so the prompt
    stream stays in step and DDP sees equal batch sizes.
    """
    a, k = loop.cfg.algorithm, loop.cfg.rollout.samples_per_prompt
    need = len(batch) // k
    kept: list[RolloutBatch] = []
    dropped: list[RolloutBatch] = []
    rounds = drawn = n_kept = 0
    while True:
        keep = loop.group_filter(batch.rewards, k)  # [G] bool per group
        rows = keep.repeat_interleave(k)  # [B]
        kept.append(batch.rows(rows.nonzero().flatten()))
        dropped.append(batch.rows((~rows).nonzero().flatten()))
        rounds, drawn, n_kept = rounds + 1, drawn + len(keep), n_kept + int(keep.sum())
        short = torch.tensor([float(n_kept < need)])
        if float(batch.reduce_sum(short)) == 0 or rounds >= a.max_sample_rounds or draw is None:
            break
        batch = sample(loop, draw(), timer, rounds)
    pool = RolloutBatch.cat(kept + dropped, loop.tokenizer.pad_token_id)  # kept groups first
    totals = batch.reduce_sum(torch.tensor([float(drawn), float(n_kept), float(max(need - n_kept, 0))]))
    out = pool.rows(slice(0, need * k))
    out.reduce_sum = batch.reduce_sum
    return out, {"rollout/rounds": float(rounds), "rollout/kept_group_frac": float(totals[1] / totals[0]),
                 "rollout/filler_groups": float(totals[2])}


def step(loop: Loop, problems: list[Problem],
         draw: Callable[[], list[Problem]] | None = None) -> tuple[RolloutBatch, dict[str, float]]:
    """One RL step over the global list of `problems` (`draw` gives more, for a group filter's extra rounds)."""
    cfg, r, timer, needs = loop.cfg, loop.cfg.rollout, PhaseTimer(), loop.needs
    batch = sample(loop, problems, timer)
    filtered: dict[str, float] = {}
    if needs.resample:  # a group filter that draws more rounds (DAPO's dynamic sampling)
        batch, filtered = fill_batch(loop, batch, draw, timer)
    if needs.reference:  # beta = 0: no reference model, no forward, timing/reference stays 0
        with timer("reference"):
            batch.ref_logp = loop.reference.logprobs(batch, cfg.trainer.micro_batch_size)
    if needs.old_logp:  # otherwise the loss uses logp.detach(): on-policy ratio = 1
        with timer("old_logprob"):
            batch.old_logp = loop.trainer.logprobs(batch)
    if needs.values:  # only estimators that declare `values` (GAE) have a critic
        with timer("values"):
            batch.values = loop.critic.values(loop.trainer.micro(batch))  # [B, T] V_old
    with timer("advantage"):
        batch.adv, batch.returns = advantages(batch, cfg.algorithm)  # [B, T], and the critic's targets or None
    with timer("update"):
        stats = loop.trainer.update(batch)
    with timer("sync"):
        moved = loop.engine.load_weights(loop.trainer.unwrapped)  # weight-sync: 0 bytes when shared
    metrics = stats | filtered | batch_metrics(batch, loop.acc, r.samples_per_prompt) | timer.metrics()
    if batch.tool_mask is not None:  # agentic runs: how often the policy chose to call the tool
        used = (batch.tool_mask.sum(-1) > 0).float()  # [B]
        total, n = batch.reduce_sum(torch.stack([used.sum(), torch.tensor(float(len(batch)))]))
        metrics["response/tool_call_frac"] = float(total / n)
    if batch.values is not None:
        metrics["critic/explained_var"] = explained_variance(batch)
    metrics["perf/tokens_per_s"] = metrics.pop("_gen_tokens") / metrics["timing/step"]
    metrics["perf/peak_mem_mb"] = peak_memory_mb()
    metrics["perf/sync_mb"] = moved / 2**20
    return batch, metrics


class NonFiniteError(RunFailed):
    """Too many non-finite updates in a row: the run stops as FAILED with this message."""


def run(cfg: ExperimentConfig, root: Path | None = None, extra_tags: dict[str, str] | None = None,
        on_start: Callable[[str], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None,
        resume: Path | None = None) -> RunResult:
    """The whole run. `on_start(run_id)` is called once the MLflow run exists; `on_eval(step, metrics)` after each
    periodic held-out eval, and a True return stops the run there (it still finishes normally: a pruned sweep trial).
    `resume`: a checkpoint of this config to continue from, in the same MLflow run.
    """
    root = root or project_root()
    reset_peak_memory()  # a lesson, --seeds or a sweep worker runs many runs in one process
    loop = build(cfg, root)
    acc = loop.acc
    if acc.is_main_process:
        threads.say_once()
    ckpt = checkpoint.load(resume) if resume is not None else None
    start = restore(loop, ckpt) if ckpt is not None else 0
    tracker = Tracker(cfg.logging.experiment, root) if acc.is_main_process else None
    first_eval: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    managed = nullcontext()  # ranks other than 0 log nothing
    if tracker is not None:
        tags = {"algorithm": cfg.algorithm.name, "task": cfg.task.name, "model": cfg.model.name_or_path or "tiny-llama",
                "git_commit": git_commit(root), "rlcore.kind": "rl", "seed": str(cfg.seed),
                "world_size": str(acc.num_processes), "rlcore.group": cfg.seed_group(),
                "torch_threads": str(torch.get_num_threads()), CONFIG_TAG: cfg.config_hash(),
                **warm_start_tags(loop.warm_start), **cfg.logging.tags,
                **(extra_tags or {})}
        # MLflow's random names come from the `random` module, which the run has seeded: every run would be called
        # the same. A name from the config is as stable and says what the run is.
        name = cfg.logging.run_name or f"{cfg.algorithm.name}-s{cfg.seed}-{cfg.training_hash()[:6]}"
        managed = tracker.run(name, tags, flatten(cfg.to_dict()),
                              yaml.safe_dump(cfg.to_dict(), sort_keys=False), resume_id=ckpt and ckpt["run_id"])
    steps_done, stop = start, False
    with managed, StopRequest() as stop_request:
        if tracker is not None:
            if on_start is not None:
                on_start(tracker.run_id)
            if start == 0:
                first_eval = last_eval = evaluate(loop.engine, loop.task, cfg)
                tracker.log(0, first_eval)
        stream = loop.task.stream(cfg.seed)
        drawn = 0
        for _ in range(ckpt["drawn"] if ckpt else 0):  # the prompt stream continues where the checkpoint left it
            next(stream)
            drawn += 1

        def draw() -> list[Problem]:
            nonlocal drawn
            drawn += cfg.rollout.prompts_per_step
            return [next(stream) for _ in range(cfg.rollout.prompts_per_step)]

        quiet = not acc.is_main_process or bool(os.environ.get("RLCORE_NO_BAR"))
        bar = tqdm(range(start + 1, cfg.trainer.steps + 1), desc="rl", unit="step", disable=quiet,
                   dynamic_ncols=True, file=sys.stderr, initial=start, total=cfg.trainer.steps)
        for i in bar:
            batch, metrics = step(loop, draw(), draw)
            steps_done = i
            if bad := checkpoint.nonfinite_tensors(loop.trainer.unwrapped.state_dict()):
                raise NonFiniteError(f"non-finite weights after the update of step {i} (phase: update): {bad}; "
                                     "no checkpoint was written with them")
            if loop.trainer.nonfinite_streak >= cfg.trainer.max_nonfinite:
                raise NonFiniteError(f"non-finite loss/gradient for {loop.trainer.nonfinite_streak} steps in a row, "
                                     f"last at step {i} (phase: {nonfinite_phase(batch)}); updates were skipped")
            if tracker is not None:
                if i % cfg.logging.eval_every == 0 or i == cfg.trainer.steps:
                    last_eval = evaluate(loop.engine, loop.task, cfg)
                    tracker.log(i, last_eval)
                    if on_eval is not None:
                        stop = bool(on_eval(i, last_eval)) and i < cfg.trainer.steps
                if cfg.logging.num_samples and (i % cfg.logging.samples_every == 0 or i == 1):
                    tracker.log_table(i, sample_rows(batch, cfg.logging.num_samples))
                tracker.log(i, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl/mean', 0.0):.4f}",
                                s_per_step=f"{metrics['timing/step']:.2f}")
            if acc.num_processes > 1:  # every process stops at the same step
                flags = torch.tensor([float(stop), float(stop_request.requested)], device=acc.device)
                stop, stop_request.requested = (bool(x) for x in acc.reduce(flags, reduction="sum").tolist())
            every = cfg.trainer.checkpoint_every
            if every and (i % every == 0 or stop_request.requested) and i < cfg.trainer.steps:
                write_checkpoint(loop, root, tracker, i, drawn)
            if stop_request.requested:
                raise SystemExit(128 + stop_request.signum)  # the run closes as KILLED, resumable
            if stop:
                if tracker is not None:
                    tracker.client.set_tag(tracker.run_id, "rlcore.stopped_at_step", str(i))
                break
        out_dir = save_policy(loop.trainer, loop.tokenizer, root, cfg, tracker, acc)
    return RunResult(tracker.run_id if tracker else None, tracker.where if tracker else None, first_eval, last_eval,
                     out_dir, steps_done, stop)


def warm_start_tags(ws: Path | None) -> dict[str, str]:
    """Which weights the run started from: the shipped copy or one built here, and their digest."""
    if ws is None or not (ws / "model.safetensors").is_file():
        return {}
    return {"warm_start.source": "shipped" if ws.parent.name == SHIPPED_DIR else "built here",
            "warm_start.sha256": sha256(ws / "model.safetensors")[:16]}


class StopRequest:
    """SIGTERM/SIGINT finish the current step, write a checkpoint, then end the run as KILLED (a second signal
    stops at once). Only in the main thread; elsewhere signals keep their default handling."""

    def __init__(self) -> None:
        self.requested, self.signum, self._old = False, 0, {}

    def _handle(self, signum, frame) -> None:
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


def nonfinite_phase(batch: RolloutBatch) -> str:
    """The first phase whose output holds a NaN/inf (update when every input was finite)."""
    for phase, t in (("reward", batch.rewards), ("reference", batch.ref_logp), ("old_logprob", batch.old_logp),
                     ("values", batch.values), ("advantage", batch.adv)):
        if t is not None and not bool(torch.isfinite(t).all()):
            return phase
    return "update"


def checkpoint_state(loop: Loop, step: int, run_id: str | None, drawn: int) -> dict:
    return {"step": step, "run_id": run_id, "drawn": drawn, "config_hash": loop.cfg.config_hash(),
            "reference": loop.cfg.model.warm_start or loop.cfg.model.name_or_path or "fresh",
            "rng": checkpoint.rng_state(loop.engine.rng_state()), **loop.trainer.state_dict()}


def write_checkpoint(loop: Loop, root: Path, tracker: Tracker | None, step: int, drawn: int) -> None:
    """Main process writes; every process waits so none runs ahead of a checkpoint."""
    if tracker is not None:
        tracker.drain()  # metrics up to this step are stored before the checkpoint exists: a resume misses none
        d = root / loop.cfg.logging.output_dir / tracker.run_id / "checkpoints"
        checkpoint.save(d, step, checkpoint_state(loop, step, tracker.run_id, drawn), loop.cfg.trainer.keep_checkpoints)
    loop.acc.wait_for_everyone()


def restore(loop: Loop, ckpt: dict) -> int:
    """Load a checkpoint into a freshly built loop; returns its step."""
    if ckpt["config_hash"] != loop.cfg.config_hash():
        raise ConfigError("--resume: the checkpoint was written by a different config")
    loop.trainer.load_state_dict(ckpt)
    loop.engine.set_rng_state(checkpoint.restore_rng(ckpt["rng"]))
    loop.engine.load_weights(loop.trainer.unwrapped)  # a separate rollout engine gets the restored weights
    return int(ckpt["step"])


def batch_metrics(batch: RolloutBatch, acc: Accelerator, k: int) -> dict[str, float]:
    """Reward and response statistics over the global batch (gathered from every process)."""
    lengths = batch.response_mask.sum(-1)  # [B]
    local = torch.stack([batch.rewards.float(), lengths, (~batch.finished).float(), batch.shaping.float()], 1)  # [B, 4]
    g = acc.gather(local.to(acc.device)).cpu() if acc.num_processes > 1 else local  # [B_global, 4]
    rewards, lengths, clipped, shaping = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    groups = rewards.view(-1, k)  # rows are prompt-major, so each row of this view is one group
    mask = batch.response_mask
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "reward/overlong_penalty": float(shaping.mean()),
        "reward/zero_var_group_frac": float((groups.max(1).values == groups.min(1).values).float().mean()),
        "adv/mean": float((batch.adv * mask).sum() / mask.sum().clamp(min=1)),
        "adv/abs_mean": float((batch.adv.abs() * mask).sum() / mask.sum().clamp(min=1)),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clip_ratio": float(clipped.mean()),
        "_gen_tokens": float(lengths.sum()),
    }


def reset_peak_memory() -> None:
    """Start a new high-water mark, so each run reports its own peak, not the process's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the RSS peak is the process's lifetime peak (see peak_memory_mb)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()  # VmHWM honours reset_peak_memory
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sample_rows(batch: RolloutBatch, n: int) -> list[dict]:
    return [{"prompt": batch.problems[i].prompt, "completion": batch.completions[i],
             "answer": batch.problems[i].answer, "reward": float(batch.rewards[i])} for i in range(min(n, len(batch)))]


def save_policy(trainer, tokenizer, root: Path, cfg: ExperimentConfig, tracker, acc: Accelerator) -> Path | None:
    """Final weights to <output_dir>/<run_id>/policy (main process)."""
    acc.wait_for_everyone()
    if tracker is None:
        return None
    out = root / cfg.logging.output_dir / tracker.run_id / "policy"
    trainer.unwrapped.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
