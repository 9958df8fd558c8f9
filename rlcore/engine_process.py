"""The rollout engine in a process of its own (`rollout.mode: separate | async`), as vLLM/SGLang servers run beside a
trainer: its own copy of the weights, fed by weight-sync over a pipe (tensors travel in shared memory), one torch
thread, and requests answered in the order they were sent.

`separate`: each step the trainer sends the batch's prompts and waits; after the update it pushes the weights and
waits for the engine to install and verify them. Nothing overlaps; the process boundary costs what it costs.

`async` with `rollout.max_staleness: k`: the engine works through a queue k + 1 batches deep, so it samples step
n + 1's batch (up to n + k) while the trainer trains on step n. The queue is first in, first out and each request
names the weights it must use, so batch j is always sampled with the weights of update max(0, j - 1 - k): the same
weights, noise and prompts as the deterministic simulation (`rollout.staleness: k`, rlcore.rollout.StaleEngine).
Async therefore reproduces the simulation's training numbers bit for bit (tests/test_engine_process.py); the price
of that design is that the staleness is always k once k updates exist, never less, even when newer weights are
ready before a batch starts (an engine that takes the newest weights would be faster to react and not reproducible).

Held-out evaluation samples in the trainer's process with the trainer's weights (`generate(..., generator=g)`): the
policy being trained, not the engine's older copy. The simulation evaluates its engine's copy (k updates older), so
held-out figures are where async and the simulation differ.

If the engine process dies (killed, out of memory) the trainer notices within `POLL_S`, stops the run FAILED with
a message naming the engine, and `--resume` continues from the last checkpoint: the checkpoint keeps the weights
the in-flight batches need, the noise generator's state before the first of them and the prompt stream's position
before it (`Lookahead`), so the resumed run samples the same batches again.

`make_engine` chooses the run's engine, in this process or in its own.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlcore.batch import Problem, RolloutBatch
from rlcore.config import RunFailed
from rlcore.rollout import (
    ENGINES,
    RolloutEngine,
    Sampling,
    SeparateEngine,
    StaleEngine,
    WeightSyncError,
    draw_noise,
    engine_copy,
    push_checksums,
    snapshot,
    transfer,
    verify_push,
)
from rlcore.threads import usable_cores

POLL_S = 0.2  # how often a waiting trainer checks that the engine process is alive


class EngineDied(RunFailed):
    """The rollout engine's process ended while the trainer needed it: the run stops FAILED, resumable."""


# ------------------------------------------------------------------------------------------------ engine process


def serve(conn, tokenizer: PreTrainedTokenizerBase, kw: dict, threads: int) -> None:
    """The engine process: take its model (the first message), then answer requests in order until the pipe closes.
    Messages in: ("push", version, weights, checksums), ("gen", request dict). Out: ("pushed", version, tensors
    verified, t0, t1, CPU seconds so far), ("batch", fields, t0, t1, truncated prompts, CPU seconds so far), or
    ("error", class name, message) before exiting."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pipe
    try:
        model = conn.recv()
    except (EOFError, OSError):
        return
    engine = RolloutEngine(model, tokenizer, seed=0, **kw)  # its noise comes with each request
    mine = model.state_dict()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            return
        try:
            if msg[0] == "push":
                _, version, weights, sums = msg
                t0 = time.monotonic()
                for name, src in weights.items():
                    transfer(mine[name], src)
                verified = verify_push(mine, sums, "rollout engine process") if sums is not None else 0
                conn.send(("pushed", version, verified, t0, time.monotonic(), time.process_time()))
            elif msg[0] == "gen":
                req = msg[1]
                t0 = time.monotonic()
                before = engine.fmt.truncated if engine.fmt is not None else 0
                b = engine.generate(req["problems"], req["k"], req["sampling"], rows=req["rows"],
                                    group_offset=req["group_offset"], noise=req["noise"])
                truncated = (engine.fmt.truncated - before) if engine.fmt is not None else 0
                out = {f.name: getattr(b, f.name) for f in fields(RolloutBatch) if f.name != "reduce_sum"}
                conn.send(("batch", out, t0, time.monotonic(), truncated, time.process_time()))
            else:
                return
        except Exception as e:  # noqa: BLE001 - every failure goes back to the trainer, which fails the run
            if not isinstance(e, RunFailed):
                traceback.print_exc()  # the engine's stderr is the trainer's: the whole trace for a bug report
            conn.send(("error", type(e).__name__, " ".join(str(e).split()) or type(e).__name__))
            return


# ------------------------------------------------------------------------------------------------ trainer side


def wire(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What leaves the trainer for the engine (identity; a test corrupts it to see the checksum catch it)."""
    return weights


@dataclass
class Request:
    """A batch asked of the engine and not yet consumed by a step."""

    problems: list[Problem]
    version: int  # the update whose weights sample it
    rng_before: torch.Tensor  # the noise generator before it: where a resumed run starts again
    reply: tuple | None = None


class ProcessEngine(RolloutEngine):
    """The engine interface over a process of its own (see the module doc). `staleness`: async's max_staleness k
    (batch j samples with update j - 1 - k; the Lookahead keeps k + 1 requests in flight), or None: separate, each
    request sent when the step needs it. The in-process `RolloutEngine` part, over the trainer's own model, serves
    held-out evaluation."""

    verify = True  # weight_sync.verify

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, staleness: int | None,
                 dtype: torch.dtype | None = None, attention: str | None = None, threads: int = 1, **kw):
        super().__init__(model, tokenizer, seed, **kw)
        # One thread per role: the engine's process has `threads`, the trainer keeps the cores left (restored on close)
        self.trainer_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self.trainer_threads, usable_cores() - threads)))
        self.staleness = staleness  # None: separate (synchronous)
        self.syncs = 0  # updates the trainer has made
        self.version = 0  # the update whose weights the engine process holds
        self.sent = 0  # batches requested so far (batch j is the j-th)
        self.last_version: int | None = None  # the version of the last batch handed to a step
        self.dtype = dtype
        self.pending: collections.deque[Request] = collections.deque()  # sent, not yet taken by a step
        self.history = {0: snapshot(model)}  # version -> weights the queue may still need
        self.stats: dict[str, float] = {}
        self.verified = 0  # tensors the engine checked in its last push
        self.version_acked = 0  # the last version the engine said it installed
        self.cpu_s = 0.0  # CPU seconds the engine process had spent at its last reply (perf/engine_cpu_s)
        engine_model = engine_copy(model, dtype, attention)  # the engine's own copy (sent once, in shared memory)
        ctx = mp.get_context("spawn")  # fork is unsafe once torch's threads exist
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, name="rlcore-rollout-engine", daemon=True,
                                args=(child, tokenizer, dict(kw), threads))
        self.proc.start()
        child.close()  # only the engine holds its end: its death closes the pipe
        self._send(engine_model)  # through the pipe, not the Process's arguments, which the parent would keep alive
        del engine_model

    # -------------------------------------------------------------------------------------------- the interface

    @property
    def lag(self) -> int | None:
        """Updates between the weights that sampled the last batch and the trainer's (rollout/staleness)."""
        return None if self.last_version is None else self.syncs - self.last_version

    def submit(self, problems: list[Problem], k: int, sampling: Sampling, rows: slice | None = None,
               group_offset: int = 0) -> None:
        """Ask for a batch now; the step that later calls `generate` with the same `problems` list gets it."""
        self.sent += 1
        # FIFO: batch j samples with update j - 1 - k (separate: the newest; a filter's extra round: the step's)
        version = self.syncs if self.staleness is None else min(self.syncs, max(0, self.sent - 1 - self.staleness))
        if version != self.version:
            self._push(version)
        before = self.generator.get_state()
        noise = draw_noise(self.generator, len(problems), k, sampling.max_new_tokens)  # [B_global, T]
        self._send(("gen", {"problems": problems, "k": k, "sampling": sampling, "rows": rows,
                            "group_offset": group_offset, "noise": noise}))
        self.pending.append(Request(problems, version, before))

    def generate(self, problems: list[Problem], k: int, sampling: Sampling, rows: slice | None = None,
                 group_offset: int = 0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> RolloutBatch:
        """A training batch from the engine process (sent earlier by `submit`, or now); with `generator`
        (held-out evaluation) sampled here with the trainer's weights."""
        if generator is not None or noise is not None:
            return super().generate(problems, k, sampling, rows, group_offset, generator, noise)
        if not self.pending or self.pending[0].problems is not problems:
            if self.pending:
                raise RuntimeError("rollout engine: a batch was asked for out of the order it was submitted")
            self.submit(problems, k, sampling, rows, group_offset)
        t = time.perf_counter()
        req = self.pending[0]
        while req.reply is None:
            self._receive("generating a batch")
        self.pending.popleft()
        _, out, t0, t1, truncated, self.cpu_s = req.reply
        if self.fmt is not None:
            self.fmt.truncated += truncated
        self.last_version = req.version
        batch = RolloutBatch(**out)
        batch.version = req.version
        self.stats["engine/generate_s"] = t1 - t0
        self.stats["engine/wait_s"] = time.perf_counter() - t
        return batch

    @torch.no_grad()
    def load_weights(self, policy: torch.nn.Module) -> int:
        """After an update: keep the weights as version `syncs`; separate pushes them now and waits for the engine to
        install and verify them, async when a queued batch first needs them. Returns the bytes of the push."""
        self.syncs += 1
        snap = snapshot(policy)
        self.history[self.syncs] = snap
        for v in [v for v in self.history if v < self.syncs - (self.staleness or 0)]:
            del self.history[v]
        if self.staleness is None:
            self._push(self.syncs)
            while self.version_acked < self.syncs:
                self._receive("installing pushed weights")
        return sum(t.numel() * t.element_size() for t in snap.values())

    def metrics(self) -> dict[str, float]:
        """The engine's side of the last step: seconds generating the batch, installing weights, and waiting."""
        out, self.stats = self.stats, {}
        return out

    def state_dict(self) -> dict:
        """What a resumed run needs: the update count and the weights of every version a queued batch may use."""
        return {"process": True, "syncs": self.syncs, "history": dict(self.history)}

    def rng_state(self) -> torch.Tensor:
        """The noise generator before the first batch not yet consumed (the queue is drawn again on resume)."""
        return self.pending[0].rng_before if self.pending else self.generator.get_state()

    @torch.no_grad()
    def load_state_dict(self, state: dict, policy: torch.nn.Module) -> None:
        """Resume: the process holds the warm start (version 0); requests are sent again from update `syncs` on."""
        if not state.get("process"):
            raise RunFailed("this checkpoint was written by a run whose rollout engine was not a process; resume it "
                            "with the same rollout.mode")
        self.syncs = self.sent = state["syncs"]
        self.history = dict(state["history"])
        self.last_version = None

    def close(self) -> None:
        """Stop the engine process (its end of the pipe closes; it exits)."""
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(timeout=2)  # a batch still being sampled (a run stopped early) is not waited for
            if self.proc.is_alive():
                self.proc.kill()
        self.conn.close()
        torch.set_num_threads(self.trainer_threads)

    # -------------------------------------------------------------------------------------------- the pipe


    def _push(self, version: int) -> None:
        weights = self.history[version]
        sums = push_checksums(weights, self.dtype) if self.verify else None
        t = time.perf_counter()
        self._send(("push", version, wire(dict(weights)), sums))
        self.stats["engine/push_send_s"] = self.stats.get("engine/push_send_s", 0.0) + time.perf_counter() - t
        self.version = version

    def _send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError) as e:
            raise self._died(f"sending to it ({type(e).__name__})") from None

    def _receive(self, doing: str) -> None:
        """Wait for the engine's next message, checking that its process lives; file it."""
        while not self.conn.poll(POLL_S):
            if not self.proc.is_alive():
                raise self._died(doing)
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(timeout=1)
            raise self._died(doing) from None
        if msg[0] == "error":
            kind, text = msg[1], msg[2]
            raise (WeightSyncError if kind == "WeightSyncError" else RunFailed)(
                text if kind in ("WeightSyncError", "PromptTooLong") else
                f"the rollout engine process failed: {kind}: {text} (its traceback is above)")
        if msg[0] == "pushed":
            _, version, verified, t0, t1, self.cpu_s = msg
            self.version_acked, self.verified = version, verified
            self.stats["engine/push_s"] = self.stats.get("engine/push_s", 0.0) + t1 - t0
            return
        next(r for r in self.pending if r.reply is None).reply = msg

    def _died(self, doing: str) -> EngineDied:
        code = self.proc.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else
               f"exited with code {code}" if code is not None else "stopped answering")
        return EngineDied(f"the rollout engine process (pid {self.proc.pid}) {how} while {doing}; the trainer stopped "
                          "here. Continue from the last checkpoint with --resume")


def make_engine(cfg, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, **kw) -> RolloutEngine:
    """The run's engine: with `rollout.mode` separate or async a process of its own; colocated: `rollout.engine`,
    with `rollout.staleness: k > 0` a StaleEngine, with `rollout.dtype` other than float32 (or `rollout.attention`
    other than the trainer's) a copy in that precision (with that kernel)
    (both need weights of their own, so both imply a separate engine)."""
    r = cfg.rollout
    dtype = None if r.dtype == "float32" else getattr(torch, r.dtype)
    attention = None if r.attention == "same" else r.attention
    if r.mode != "colocated":  # a process of its own (rlcore.engine_process)
        k = None if r.mode == "separate" else (1 if r.max_staleness is None else r.max_staleness)
        engine: RolloutEngine = ProcessEngine(model, tokenizer, seed, k, dtype=dtype, attention=attention, **kw)
        engine.verify = cfg.weight_sync.verify
    elif r.staleness > 0:
        engine = StaleEngine(model, tokenizer, seed, r.staleness, dtype=dtype, attention=attention, **kw)
    elif dtype is not None or attention is not None or cfg.weight_sync.every > 1:
        engine = SeparateEngine(model, tokenizer, seed, dtype=dtype, attention=attention, **kw)
    else:
        engine = ENGINES[r.engine](model, tokenizer, seed, **kw)
    if isinstance(engine, SeparateEngine):
        engine.verify, engine.every = cfg.weight_sync.verify, cfg.weight_sync.every
    return engine


class Lookahead:
    """The prompt stream read ahead for an async engine: `take` keeps `depth` steps' prompts submitted to the engine
    and returns the oldest. Its position and state are those before the first prompts not yet taken, so a
    checkpoint resumes the stream where training (not the engine) was."""

    def __init__(self, stream, n: int, depth: int, submit: Callable[[list[Problem]], None], steps: int):
        self.stream, self.n, self.depth, self.submit = stream, n, depth, submit
        self.left = steps  # steps the run still needs: nothing is sampled for a step that will not come
        self.queued: collections.deque[tuple[int, dict, list[Problem]]] = collections.deque()

    def take(self, n: int) -> list[Problem]:
        assert n == self.n, "an async engine's lookahead reads whole steps"
        while len(self.queued) < self.depth and self.left > 0:
            position, state = self.stream.position, self.stream.state_dict()
            problems = self.stream.take(self.n)
            self.queued.append((position, state, problems))
            self.left -= 1
            self.submit(problems)
        return self.queued.popleft()[2]

    @property
    def position(self) -> int:
        return self.queued[0][0] if self.queued else self.stream.position

    def state_dict(self) -> dict:
        return self.queued[0][1] if self.queued else self.stream.state_dict()
