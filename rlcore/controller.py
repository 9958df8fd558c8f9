"""Controller: the RL loop. rollout -> reward -> reference -> old log-probs -> advantages -> update -> sync.

Reads top to bottom; one timed line per phase. Under `accelerate launch`/`torchrun` with N processes each samples its
share of the step's prompts, gradients are averaged, and only the main process evaluates and logs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rlcore import checkpoint, rm_training, threads
from rlcore.algorithm import GROUP_FILTERS, Needs, advantages, lookup, requirements
from rlcore.batch import Problem, RolloutBatch
from rlcore.config import ExperimentConfig, RolloutConfig, RunFailed, flatten
from rlcore.critic import Critic, explained_variance
from rlcore.engine_process import Lookahead, make_engine
from rlcore.evaluation import evaluate
from rlcore.metrics import batch_metrics, peak_memory_mb, reset_peak_memory, sample_rows
from rlcore.model import build_policy
from rlcore.prompts import PromptFormat
from rlcore.reference import Reference
from rlcore.reward import Scorer, overlong_penalty, reward_search_path
from rlcore.rollout import RolloutEngine, Sampling, fill_groups
from rlcore.seeding import seed_everything
from rlcore.sft import warm_start_dir, warm_start_tags
from rlcore.tasks import CuratedStream, DatasetTask, Task, make_task
from rlcore.timing import PhaseTimer
from rlcore.tools import make_tool
from rlcore.tracking import CONFIG_TAG, Tracker, git_commit, project_root
from rlcore.trainer import Trainer, accelerator, my_share


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
    task: Task
    scorer: Scorer
    tokenizer: PreTrainedTokenizerBase
    engine: RolloutEngine
    reference: Reference | None
    trainer: Trainer
    critic: Critic | None
    group_filter: Callable
    needs: Needs  # the phases this algorithm runs, from what its axes declare
    local: slice  # this process's share of each step's prompts
    warm_start: Path | None = None  # the directory the policy was loaded from (shipped or built here)


def build(cfg: ExperimentConfig, acc: Accelerator, warm_start: Path | None,
          reward_models: dict[str, Path] | None = None) -> Loop:
    """The roles of one run, from the config and the directory of the policy to start from."""
    seed_everything(cfg.seed)
    policy, tokenizer = build_policy(cfg.model, warm_start)
    task = make_task(cfg.task, cfg._base_dir)
    if isinstance(task, DatasetTask):
        task.check_budget(cfg.trainer.steps, cfg.rollout.prompts_per_step)
    fmt = PromptFormat(cfg.prompt, chat=cfg.model.use_chat_template)
    longest = fmt.check(tokenizer, [p.prompt for p in task.heldout], "a held-out prompt")  # before any run exists
    check_positions(policy, longest, cfg)
    needs = requirements(cfg.algorithm)
    # beta = 0: no reference at all, unless the KL to it is asked for as a measurement only
    reference = Reference(policy) if needs.reference or cfg.logging.kl_to_reference else None
    critic = Critic(policy, cfg, acc) if needs.values else None
    trainer = Trainer(policy, cfg, acc, critic)
    engine = make_engine(cfg, trainer.unwrapped, tokenizer, seed=cfg.seed, fmt=fmt, tool=make_tool(cfg.task.tool),
                         max_tool_calls=cfg.task.max_tool_calls, mask_tool_output=cfg.task.mask_tool_output)
    scorer = Scorer(cfg.reward, task, reward_search_path(cfg), reward_models)
    return Loop(cfg=cfg, acc=acc, task=task, scorer=scorer, tokenizer=tokenizer, engine=engine, reference=reference,
                trainer=trainer, critic=critic, needs=needs, local=my_share(cfg.rollout.prompts_per_step, acc),
                group_filter=lookup(GROUP_FILTERS, cfg.algorithm.group_filter, "group_filter"), warm_start=warm_start)


def check_positions(policy, longest_prompt: int, cfg: ExperimentConfig) -> None:
    """A prompt and its completion must fit the model's positions: past them a tiny Llama's rotary tables run out
    and generation fails or hangs in the first eval. Refused before any run exists (a ConfigError)."""
    from rlcore.config import ConfigError

    limit = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    need = longest_prompt + cfg.rollout.max_new_tokens
    if limit is not None and need > limit:
        raise ConfigError(f"rollout.max_new_tokens: the longest held-out prompt has {longest_prompt} tokens, and "
                          f"{longest_prompt} + {cfg.rollout.max_new_tokens} new tokens = {need} is over the model's "
                          f"{limit} positions (model.tiny.max_position_embeddings for the tiny model); shorten the "
                          "prompt (prompt.max_tokens) or the completions")


def build_for(cfg: ExperimentConfig, root: Path) -> Loop:
    """`build` with this run's process group and warm start (the main process builds a missing one first, and any
    reward model the reward names by its experiment)."""
    acc = accelerator(cfg)
    with acc.main_process_first():
        ws = warm_start_dir(cfg, root, quiet=not acc.is_main_process)
        models = {c.name: rm_training.resolve(c.path, cfg._base_dir, root) for c in cfg.reward.components if c.path}
    return build(cfg, acc, ws, models)


def training_sampling(r: RolloutConfig) -> Sampling:
    """How training rollouts sample (rollout.max_new_tokens, temperature, top_p): one definition for `sample` and
    `submit`, so a batch an async engine samples ahead is drawn exactly as a colocated one."""
    return Sampling(r.max_new_tokens, r.temperature, r.top_p)


def sample(loop: Loop, problems: list[Problem], timer: PhaseTimer, scored: dict[str, float],
           round_: int = 0) -> RolloutBatch:
    """Rollout and reward for this process's share of `problems` (round_ keeps group ids unique across rounds);
    the reward's metrics go to `scored` (reward/errors summed over rounds, component means from the first)."""
    cfg, r = loop.cfg, loop.cfg.rollout
    with timer("rollout"):
        batch = loop.engine.generate(problems, r.samples_per_prompt, training_sampling(r), rows=loop.local,
                                     group_offset=round_ * len(problems))
        if loop.acc.num_processes > 1:
            batch.reduce_sum = lambda t: loop.acc.reduce(t.to(loop.acc.device), reduction="sum").cpu()
    with timer("reward"):
        batch.shaping = overlong_penalty(batch, cfg.algorithm, r.max_new_tokens)  # [B] 0 unless DAPO shaping is on
        rewards, metrics = loop.scorer.score(batch)  # [B] sum_i w_i * component_i
        batch.rewards = rewards + batch.shaping  # [B] the verifiers' reward, plus shaping
    if "reward/errors" in metrics:
        scored["reward/errors"] = scored.get("reward/errors", 0.0) + metrics.pop("reward/errors")
    for k, v in metrics.items():
        scored.setdefault(k, v)
    return batch


def submit(loop: Loop, problems: list[Problem]) -> None:
    """Send a later step's prompts to an async engine now (the Lookahead's hook): it samples them while the trainer
    trains, with the same arguments `sample` would give."""
    r = loop.cfg.rollout
    loop.engine.submit(problems, r.samples_per_prompt, training_sampling(r), rows=loop.local)


def step(loop: Loop, problems: list[Problem],
         draw: Callable[[], list[Problem]] | None = None) -> tuple[RolloutBatch, dict[str, float]]:
    """One RL step over the global list of `problems` (`draw` gives more, for a group filter's extra rounds)."""
    cfg, r, timer, needs = loop.cfg, loop.cfg.rollout, PhaseTimer(), loop.needs
    scored: dict[str, float] = {}
    batch = sample(loop, problems, timer, scored)
    # updates between the weights that sampled this batch and the trainer's (an engine whose weights can lag says)
    lag = getattr(loop.engine, "lag", None)
    filtered: dict[str, float] = {}
    if needs.resample:  # a group filter that draws more rounds (DAPO's dynamic sampling)
        more = (lambda i: sample(loop, draw(), timer, scored, i)) if draw is not None else None
        batch, filtered = fill_groups(batch, r.samples_per_prompt, loop.group_filter, more,
                                      cfg.algorithm.max_sample_rounds, loop.tokenizer.pad_token_id)
    if loop.reference is not None:  # beta = 0: no reference model, no forward, timing/reference stays 0
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
        moved = loop.engine.load_weights(loop.trainer.unwrapped)  # weight-sync: 0 bytes when shared or not due
    metrics = (stats | filtered | batch_metrics(batch, loop.acc, r.samples_per_prompt) | scored
               | timer.metrics())
    if loop.engine.fmt.cfg.max_tokens is not None:
        metrics["prompt/truncated"] = float(loop.engine.fmt.take_truncated())
    if batch.values is not None:
        metrics["critic/explained_var"] = explained_variance(batch)
    metrics["perf/tokens_per_s"] = metrics.pop("_gen_tokens") / metrics["timing/step"]
    metrics["perf/peak_mem_mb"] = peak_memory_mb()
    metrics["perf/sync_mb"] = moved / 2**20
    if lag is not None:
        metrics["rollout/staleness"] = float(lag)
    if hasattr(loop.engine, "metrics"):  # an engine in its own process: its busy time, and each role's idle share
        engine = loop.engine.metrics()
        metrics |= engine
        busy = engine.get("engine/generate_s", 0.0) + engine.get("engine/push_s", 0.0)
        metrics["idle/trainer"] = engine.get("engine/wait_s", 0.0) / metrics["timing/step"]
        metrics["idle/engine"] = max(0.0, 1.0 - busy / metrics["timing/step"])
    if moved and getattr(loop.engine, "verify", False):
        metrics["sync/verified_tensors"] = float(loop.engine.verified)
    return batch, metrics


_first_run = True


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 where that cannot be read)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class NonFiniteError(RunFailed):
    """Non-finite weights, or too many non-finite updates in a row: the run stops FAILED with this message."""


def run(cfg: ExperimentConfig, root: Path | None = None, extra_tags: dict[str, str] | None = None,
        on_start: Callable[[str], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None,
        resume: Path | None = None) -> RunResult:
    """The whole run. `on_start(run_id)` is called once the MLflow run exists; `on_eval(step, metrics)` after each
    periodic held-out eval, and a True return stops the run there (it still finishes normally: a pruned sweep trial).
    `resume`: a checkpoint of this config to continue from, in the same MLflow run.
    """
    # Wall-clock from the process start for its first run (imports count: the user waits for them), from here for
    # the next runs of the process (--seeds, a lesson, a sweep worker).
    global _first_run
    t0 = time.perf_counter() - (process_age() if _first_run else 0.0)
    _first_run = False
    root = root or project_root()
    reset_peak_memory()  # a lesson, --seeds or a sweep worker runs many runs in one process
    loop = build_for(cfg, root)
    cpu0 = time.process_time()  # after the build: a reward model trained on first use is its own run's CPU time
    ckpt = checkpoint.load(resume) if resume is not None else None
    start = checkpoint.restore(loop.trainer, loop.engine, cfg, ckpt) if ckpt is not None else 0
    tracker = Tracker(cfg.logging.experiment, root) if loop.acc.is_main_process else None
    out = RunResult(tracker.run_id if tracker else None, tracker.where if tracker else None, {}, {}, None, start)
    with open_run(loop, tracker, root, extra_tags, ckpt), checkpoint.StopRequest() as stop_request, \
            closing(loop.engine):
        begin(loop, tracker, out, on_start, fresh=start == 0, t0=t0, step=start)
        stream = open_stream(loop, ckpt and ckpt["stream"])  # where the checkpoint left it
        if cfg.rollout.mode == "async":  # the engine samples max_staleness steps ahead: keep it fed
            stream = Lookahead(stream, cfg.rollout.prompts_per_step, loop.engine.staleness + 1, lambda p: submit(loop, p),
                               steps=cfg.trainer.steps - start)
        bar = tqdm(range(start + 1, cfg.trainer.steps + 1), desc="rl", unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=tracker is None or bool(os.environ.get("RLCORE_NO_BAR")), initial=start,
                   total=cfg.trainer.steps)
        for i in bar:
            problems = stream.take(cfg.rollout.prompts_per_step)
            batch, metrics = step(loop, problems, lambda: stream.take(cfg.rollout.prompts_per_step))
            out.steps_done = i
            if isinstance(stream, CuratedStream):  # the estimates learn from every process's groups alike
                rewards = loop.acc.gather(batch.rewards.to(loop.acc.device)).cpu() if loop.acc.num_processes > 1 \
                    else batch.rewards  # [B_global], prompt-major
                stream.observe(problems, rewards.tolist(), cfg.rollout.samples_per_prompt)
                metrics |= stream.metrics()
            check_finite(loop, batch, i)
            metrics["timing/wall"] = time.perf_counter() - t0
            out.stopped_early = report(loop, tracker, out, bar, i, batch, metrics, on_eval)
            out.stopped_early, stop_request.requested = agree(loop.acc, out.stopped_early, stop_request.requested)
            every = cfg.trainer.checkpoint_every
            if every and (i % every == 0 or stop_request.requested) and i < cfg.trainer.steps:
                t = time.perf_counter()
                checkpoint.write(loop.trainer, loop.engine, cfg, root, tracker, loop.acc, i, stream)
                tracker and tracker.log(i, {"timing/checkpoint": time.perf_counter() - t})
            if stop_request.requested:
                raise SystemExit(128 + stop_request.signum)  # the run closes as KILLED, resumable
            if out.stopped_early:
                tracker and tracker.set_tag("rlcore.stopped_at_step", str(i))
                break
        t = time.perf_counter()
        out.output_dir = checkpoint.save_policy(loop.trainer, loop.tokenizer, root, cfg, tracker, loop.acc)
        cpu = {"perf/cpu_s": time.process_time() - cpu0}
        if hasattr(loop.engine, "cpu_s"):  # an engine process: its own CPU seconds, since it started
            cpu["perf/engine_cpu_s"] = loop.engine.cpu_s
        tracker and tracker.log(out.steps_done, {"timing/save": time.perf_counter() - t,
                                                 "timing/total": time.perf_counter() - t0, **cpu})
    return out


def open_stream(loop: Loop, state: dict | None):
    """The run's prompt stream, curated when `curation.enabled` (its state, curation included, resumes as one)."""
    cfg = loop.cfg
    if not cfg.curation.enabled:
        return loop.task.stream(cfg.seed, state)
    stream = CuratedStream(loop.task.stream(cfg.seed), loop.task.bucket, cfg.curation, cfg.seed)
    if state is not None:
        stream.load_state_dict(state)
    return stream


def begin(loop: Loop, tracker: Tracker | None, out: RunResult, on_start, fresh: bool, t0: float, step: int) -> None:
    """On the main process, once the MLflow run exists: say the threads, tell the caller, evaluate step 0, and log
    the start-up time (building the models, loading the warm start or checkpoint, opening the run)."""
    if tracker is None:
        return
    threads.say_once()
    out.run_id = tracker.run_id
    if on_start is not None:
        on_start(tracker.run_id)
    timing = {"timing/startup": time.perf_counter() - t0}
    if fresh:
        t = time.perf_counter()
        out.first_eval = out.last_eval = evaluate(loop.engine, loop.task, loop.cfg, loop.scorer)
        timing["timing/eval"] = time.perf_counter() - t
        tracker.log(0, out.first_eval)
    tracker.log(step, timing)


def open_run(loop: Loop, tracker: Tracker | None, root: Path, extra_tags: dict[str, str] | None, ckpt: dict | None):
    """The MLflow run (new, or the checkpoint's reopened), closed FINISHED/FAILED/KILLED; nothing on other ranks."""
    if tracker is None:
        return nullcontext()
    cfg = loop.cfg
    task = cfg.task.name + (f":{cfg.task.dataset}" if cfg.task.name == "reasoning_gym" else "")
    tags = {"algorithm": cfg.algorithm.name, "task": task, "model": cfg.model.name_or_path or "tiny-llama",
            "git_commit": git_commit(root), "rlcore.kind": "rl", "seed": str(cfg.seed),
            "world_size": str(loop.acc.num_processes), "rlcore.group": cfg.seed_group(),
            "torch_threads": str(torch.get_num_threads()), CONFIG_TAG: cfg.config_hash(),
            **warm_start_tags(loop.warm_start), **cfg.logging.tags, **(extra_tags or {})}
    if launch := os.environ.get("RLCORE_LAUNCH_ID"):  # started from the dashboard's Launch page: link back to it
        tags["rlcore.launch"] = launch
    # MLflow's random names come from the `random` module, which the run has seeded: every run would be called the
    # same. A name from the config is as stable and says what the run is.
    name = cfg.logging.run_name or f"{cfg.algorithm.name}-s{cfg.seed}-{cfg.training_hash()[:6]}"
    return tracker.run(name, tags, flatten(cfg.to_dict()), yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                       resume_id=ckpt and ckpt["run_id"], resume_step=ckpt and ckpt["step"])


def check_finite(loop: Loop, batch: RolloutBatch, i: int) -> None:
    """Stop the run (FAILED, before any checkpoint) on non-finite weights or too many skipped updates in a row."""
    if bad := checkpoint.nonfinite_tensors(loop.trainer.unwrapped.state_dict()):
        raise NonFiniteError(f"non-finite weights after the update of step {i} (phase: update): {bad}; "
                             "no checkpoint was written with them")
    if loop.trainer.nonfinite_streak >= loop.cfg.trainer.max_nonfinite:
        raise NonFiniteError(f"non-finite loss/gradient for {loop.trainer.nonfinite_streak} steps in a row, "
                             f"last at step {i} (phase: {batch.first_nonfinite()}); updates were skipped")


def report(loop: Loop, tracker: Tracker | None, out: RunResult, bar, i: int, batch: RolloutBatch,
           metrics: dict[str, float], on_eval) -> bool:
    """Log the step (and the periodic eval and samples) on the main process; True when `on_eval` asks to stop."""
    cfg, stop = loop.cfg, False
    if tracker is None:
        return False
    if i % cfg.logging.eval_every == 0 or i == cfg.trainer.steps:
        t = time.perf_counter()
        out.last_eval = evaluate(loop.engine, loop.task, cfg, loop.scorer)
        metrics["timing/eval"] = time.perf_counter() - t
        tracker.log(i, out.last_eval)
        if on_eval is not None:
            stop = bool(on_eval(i, out.last_eval)) and i < cfg.trainer.steps
    if cfg.logging.num_samples and (i % cfg.logging.samples_every == 0 or i == 1):
        tracker.log_table(i, sample_rows(batch, cfg.logging.num_samples))
    tracker.log(i, metrics)
    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl/mean', 0.0):.4f}",
                    s_per_step=f"{metrics['timing/step']:.2f}")
    return stop


def agree(acc: Accelerator, stop: bool, requested: bool) -> tuple[bool, bool]:
    """Every process stops at the same step: a stop (pruned) or a signal on any process is a stop on all."""
    if acc.num_processes == 1:
        return stop, requested
    flags = acc.reduce(torch.tensor([float(stop), float(requested)], device=acc.device), reduction="sum").tolist()
    return bool(flags[0]), bool(flags[1])
