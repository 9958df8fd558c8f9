"""Rollout: the engine interface and its implementations: batched sampling with a KV cache, K samples per prompt.

An engine is anything with `generate(problems, k, sampling) -> RolloutBatch`, `load_weights(policy)` (weight-sync:
returns the bytes it moved) and `rng_state()` / `set_rng_state()` (what a checkpoint keeps). `RolloutEngine`
samples with the policy module itself (`rollout.engine: shared`, sync is free); `SeparateEngine` holds its own copy
fed by weight-sync, as an inference server (vLLM, SGLang) does (`separate`); `StaleEngine` samples with older weights
(a simulated staleness). `rlcore.engine_process` runs an engine in a process of its own (`rollout.mode: separate |
async`) behind the same methods, and chooses the run's engine (`make_engine`).

Sampling uses inverse-CDF draws from one uniform per (row, position), taken from a seeded generator over the
*global* batch and sliced to this process's rows. So a prompt's completions do not depend on how prompts are
split across processes: one process and two processes sample the same tokens.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlcore.batch import Problem, RolloutBatch
from rlcore.config import RunFailed
from rlcore.model import trainable_state
from rlcore.prompts import PromptFormat
from rlcore.tools import Calculator


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], width: int | None = None, fmt: PromptFormat | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Format (rlcore.prompts; default: BOS + the question) and left-pad prompts to `width` (default: the longest).
    Returns ids [n, P], mask [n, P]."""
    if fmt is not None:
        rows = [fmt.ids(tokenizer, p) for p in prompts]
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return pad_rows(rows, tokenizer.pad_token_id, width, left=True)


def pad_rows(rows: list[list], pad: float, width: int | None = None, left: bool = False,
             dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of values as one tensor, filled with `pad` to `width` (default: the longest) on the right, or on the left
    (prompts, so that generation continues every row at the last column). -> values [n, L], mask [n, L] (1 on real
    entries)"""
    L = max(width or 0, max(len(r) for r in rows))
    out = torch.full((len(rows), L), pad, dtype=dtype)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(L - len(r), L) if left else slice(0, len(r))
        out[i, span], mask[i, span] = torch.tensor(r, dtype=dtype), 1
    return out, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [B, L] -> [B, L]."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens with mass >= top_p and renormalise. [n, V] -> [n, V]."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)  # [n, V]
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # always keeps the top token
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def draw_noise(generator: torch.Generator, n_global: int, k: int, max_new_tokens: int) -> torch.Tensor:
    """One uniform per (global row, position), drawn even for rows other processes own (see module doc).
    -> [n_global * k, max_new_tokens]"""
    return torch.rand((n_global * k, max_new_tokens), generator=generator)


@dataclass(frozen=True)
class Sampling:
    """How to sample: the length cap, temperature and nucleus mass, or greedy (argmax)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


class Engine(Protocol):
    """The rollout role's interface: what the controller, evaluation and checkpoints use of an engine. Optional, by
    engines that have them: `lag` (updates behind the trainer, rollout/staleness), `submit` (start a later step's
    batch now: async), `metrics()` (the engine's own per-step measurements) and `cpu_s` (its process's CPU
    seconds)."""

    def generate(self, problems: list[Problem], k: int, sampling: Sampling, rows: slice | None = None,
                 group_offset: int = 0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> RolloutBatch: ...

    def load_weights(self, policy: torch.nn.Module) -> int: ...

    def rng_state(self) -> torch.Tensor: ...

    def set_rng_state(self, state: torch.Tensor) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, policy: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


class RolloutEngine:
    """The first engine: samples completions from `model`, the policy module itself (weight-sync is free)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int,
                 fmt: PromptFormat | None = None, tool: Calculator | None = None, max_tool_calls: int = 1,
                 mask_tool_output: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.generator = torch.Generator().manual_seed(seed)
        self.tool, self.max_tool_calls = tool, max_tool_calls
        # False only to show the bug (lesson 08): the tool's tokens enter response_mask with the policy's log-prob
        # of them, as if the model had sampled them.
        self.mask_tool_output = mask_tool_output
        if tool is not None:
            self._open, self._close = (tokenizer.convert_tokens_to_ids(c) for c in (tool.open, tool.close))

    def load_weights(self, policy: torch.nn.Module) -> int:
        """Weight-sync: nothing to move, the engine samples with the policy's own weights. Returns 0 bytes."""
        return 0

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the engine besides its RNG (nothing: its weights are the policy's)."""
        return {}

    def load_state_dict(self, state: dict, policy: torch.nn.Module) -> None:
        """Resume: the engine takes the restored policy's weights (weight-sync)."""
        self.load_weights(policy)

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def close(self) -> None:
        """Release what the engine holds outside this process (nothing here; a process engine stops its process)."""

    @torch.no_grad()
    def generate(self, problems: list[Problem], k: int, sampling: Sampling, rows: slice | None = None,
                 group_offset: int = 0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> RolloutBatch:
        """Sample k completions for each problem; `rows` selects this process's problems from the global list.
        `generator`: draw the noise from it instead of the engine's own (evaluation's paired noise); `noise`: the
        noise itself, drawn by `draw_noise` (an engine in another process gets it from the trainer's)."""
        max_new_tokens, temperature, top_p, greedy = (sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                                      sampling.greedy)
        n_global = len(problems)
        if noise is None:
            noise = draw_noise(generator or self.generator, n_global, k, max_new_tokens)  # [B_global, T]
        width = None
        if rows is not None:
            width = encode_prompts(self.tokenizer, [p.prompt for p in problems], fmt=self.fmt)[0].shape[1]
            idx = range(n_global)[rows]
            problems = problems[rows]
            noise = noise[idx.start * k : idx.stop * k]
            group_offset += idx.start
        counted = self.fmt.truncated if self.fmt is not None and rows is not None else None
        ids, mask = encode_prompts(self.tokenizer, [p.prompt for p in problems], width, self.fmt)  # [n, P]
        if counted is not None:  # the global pass above counted every process's truncated prompts already
            self.fmt.truncated = counted
        ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # [B, P]
        group = torch.arange(len(problems)).repeat_interleave(k) + group_offset  # [B]
        B, P = ids.shape
        device = self.model.device
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

        was_training = self.model.training
        self.model.eval()
        pos = positions(mask)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                         use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1].float()  # [B, V]
        tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long)
        sampler_logp = torch.zeros((B, max_new_tokens))
        resp_mask = torch.zeros((B, max_new_tokens))  # tokens the model chose (loss, KL, entropy)
        alive = torch.zeros((B, max_new_tokens), dtype=torch.long)  # tokens in the context (model's and tool's)
        tool_mask = torch.zeros((B, max_new_tokens))
        forced: list[list[int]] = [[] for _ in range(B)]  # per row: tool tokens still to append
        calls = torch.zeros(B, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool)
        attn, last_pos = mask.to(device), pos[:, -1:].to(device)
        T = max_new_tokens
        for t in range(max_new_tokens):
            logits = logits.cpu()
            if greedy:
                tok = logits.argmax(-1)  # [B]
                logp = torch.zeros(B)
            else:
                probs = top_p_filter(F.softmax(logits / temperature, -1), top_p)  # [B, V]
                cdf = probs.cumsum(-1)  # [B, V]
                tok = torch.searchsorted(cdf, (noise[:, t] * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)  # [B]
                tok = tok.clamp(max=probs.shape[-1] - 1)  # guards float round-off at the top of the CDF
                logp = probs.gather(-1, tok[:, None]).squeeze(-1).log()  # [B]
            active = ~finished
            chosen = active.clone()  # rows whose token at t is the model's (not the tool's)
            for i in (i for i in range(B) if forced[i]):
                tok[i], chosen[i] = forced[i].pop(0), False
                tool_mask[i, t] = 1.0
                if not self.mask_tool_output:
                    logp[i] = 0.0 if greedy else probs[i, tok[i]].clamp(min=1e-30).log()
            counted = chosen if self.mask_tool_output else active  # rows whose token at t the loss, KL, entropy count
            tokens[:, t] = torch.where(active, tok, pad)
            sampler_logp[:, t] = torch.where(counted, logp, 0.0)
            resp_mask[:, t] = counted.float()
            alive[:, t] = active.long()
            finished |= chosen & (tok == eos)
            if self.tool is not None:
                self._call_tools(tokens, t, chosen & (tok == self._close) & (calls < self.max_tool_calls), forced)
                calls += (chosen & (tok == self._close)).long()
            if bool(finished.all()):
                T = t + 1
                break
            attn = torch.cat([attn, active.long().to(device)[:, None]], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=tokens[:, t : t + 1].to(device), attention_mask=attn, position_ids=last_pos,
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        self.model.train(was_training)

        tokens, sampler_logp, resp_mask = tokens[:, :T], sampler_logp[:, :T], resp_mask[:, :T]
        alive, tool_mask = alive[:, :T], tool_mask[:, :T]
        completions = []
        for row, m in zip(tokens.tolist(), alive.tolist(), strict=True):
            kept = [t for t, keep in zip(row, m, strict=True) if keep and t != eos]
            # Special tokens the model chose (a <pad> mid-answer) stay in the text: `12<pad>3` is not `123`. So the
            # reward has one rewarded token sequence, the answer then EOS (what exact evaluation relies on).
            completions.append(self.tokenizer.decode(kept, skip_special_tokens=False))
        used = tool_mask.sum(-1) > 0  # [B]
        answers = completions if self.tool is None else [
            self.tool.final_answer(c, bool(u)) for c, u in zip(completions, used.tolist(), strict=True)]
        return RolloutBatch(
            input_ids=torch.cat([ids, tokens], 1),
            attention_mask=torch.cat([mask, alive], 1),
            response_mask=resp_mask,
            group=group,
            sampler_logp=sampler_logp,
            finished=finished,
            prompt_len=P,
            problems=[p for p in problems for _ in range(k)],
            completions=completions,
            answers=answers,
            tool_mask=tool_mask if self.tool is not None else None,
        )

    def _call_tools(self, tokens: torch.Tensor, t: int, calling: torch.Tensor, forced: list[list[int]]) -> None:
        """For each row that just closed a call, queue the tool's answer as forced tokens."""
        for i in calling.nonzero().flatten().tolist():
            row = tokens[i, : t].tolist()  # the call is the text since the last `[` (exclusive) up to `]`
            start = max((j for j, tok in enumerate(row) if tok == self._open), default=-1) + 1
            call = self.tokenizer.decode(row[start:], skip_special_tokens=True) if start > 0 else ""
            forced[i] = self.tokenizer(self.tool.respond(call), add_special_tokens=False)["input_ids"]


def engine_copy(model: PreTrainedModel, dtype: torch.dtype | None = None, attention: str | None = None) -> PreTrainedModel:
    """The engine's own copy of the policy, frozen; in another precision or with another attention kernel than the
    trainer's when asked (rollout.dtype, rollout.attention: lesson 24's sources of mismatch)."""
    out = copy.deepcopy(model).eval()
    out.requires_grad_(False)
    if dtype is not None:
        out.to(dtype)
    if attention is not None:
        out.set_attn_implementation(attention)
    return out


class WeightSyncError(RunFailed):
    """A pushed tensor arrived different on the engine: the run stops FAILED rather than sample from wrong weights."""


def transfer(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Move one tensor into the engine (in-process here; over NCCL or shared memory in a real system)."""
    dst.copy_(src)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(t: torch.Tensor) -> tuple[int, int]:
    """A cheap fingerprint of a tensor: the sums of its elements' bit patterns, as integers, and of their squares
    (wrapping at 2**64). Any changed element moves the first. Integer sums are exact in any order, so the trainer's
    process and the engine's agree whatever their thread counts (float sums would not); computed in the engine's
    precision on both sides, so a bfloat16 copy still matches."""
    x = t.detach().contiguous().view(_BITS[t.element_size()]).to(torch.int64)
    return int(x.sum()), int((x * x).sum())


def push_checksums(weights: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, tuple[int, int]]:
    """The trainer's checksum of every tensor it pushes, taken in the engine's precision (`dtype`; None: as is)."""
    return {name: checksum(t if dtype is None else t.to(dtype)) for name, t in weights.items()}


def verify_push(mine: dict[str, torch.Tensor], sums: dict[str, tuple[int, int]], where: str = "rollout engine") -> int:
    """Compare every pushed tensor's copy on the engine (`mine`) with the trainer's checksum; raise naming the first
    that differs. Returns the number of tensors checked."""
    for name, want in sums.items():
        got = checksum(mine[name])
        if got != want:
            raise WeightSyncError(f"weight-sync: {name} differs on the {where} after the push (checksum "
                                  f"{got[0]} vs {want[0]} on the trainer): the engine would sample from "
                                  "weights the trainer never had")
    return len(sums)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights weight-sync moves (with LoRA: the adapters only), apart from the live ones."""
    return {k: v.detach().clone() for k, v in trainable_state(model).items()}


class SeparateEngine(RolloutEngine):
    """An engine with its own copy of the weights, refreshed by weight-sync (how vLLM/SGLang engines are fed); the
    copy is what `timing/sync` and `perf/sync_mb` measure (lesson 06). `load_weights` is called after every update
    and pushes on every `every`-th (weight_sync.every); in between the engine samples with older weights, and `lag`
    says how many updates older (None when it pushes every update)."""

    verify = True  # check every pushed tensor by checksum (weight_sync.verify)
    every = 1  # push on every N-th update (weight_sync.every)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int,
                 fmt: PromptFormat | None = None, tool: Calculator | None = None, max_tool_calls: int = 1,
                 mask_tool_output: bool = True, dtype: torch.dtype | None = None, attention: str | None = None):
        super().__init__(engine_copy(model, dtype, attention), tokenizer, seed, fmt, tool, max_tool_calls,
                         mask_tool_output)
        self.dtype = dtype  # the engine copy's precision (None: the trainer's), in which pushes are checksummed
        self.syncs = 0  # updates the trainer has made
        self.version = 0  # the update whose weights the engine holds
        self.verified = 0  # tensors checked by the last push

    @property
    def lag(self) -> int | None:
        return self.syncs - self.version if self.every > 1 else None

    def generate(self, *args, **kw) -> RolloutBatch:
        """RolloutEngine.generate, the batch labelled with the update whose weights sampled it."""
        batch = super().generate(*args, **kw)
        batch.version = self.version
        return batch

    @torch.no_grad()
    def load_weights(self, policy: torch.nn.Module) -> int:
        """After an update: push the policy's weights if this is the `every`-th; returns the bytes moved."""
        self.syncs += 1
        if self.syncs % self.every:
            return 0
        self.version = self.syncs
        return self._install(trainable_state(policy))  # with LoRA: the adapters only

    def _install(self, pushed: dict[str, torch.Tensor]) -> int:
        """Copy tensors into the engine's model and check each by checksum; returns the bytes moved."""
        moved = 0
        mine = self.model.state_dict()
        for name, src in pushed.items():
            transfer(mine[name], src)
            moved += src.numel() * src.element_size()
        self.verified = verify_push(mine, push_checksums(pushed, self.dtype)) if self.verify else 0
        return moved

    def state_dict(self) -> dict:
        """The engine's own weights (older than the policy's between pushes) and its update count."""
        return {"weights": snapshot(self.model), "syncs": self.syncs,
                "version": self.version}

    @torch.no_grad()
    def load_state_dict(self, state: dict, policy: torch.nn.Module) -> None:
        if "weights" not in state:
            return super().load_state_dict(state, policy)
        self.syncs, self.version = state.get("syncs", 0), state.get("version", 0)
        mine = self.model.state_dict()
        for name, src in state["weights"].items():
            mine[name].copy_(src)


class StaleEngine(SeparateEngine):
    """A separate engine that samples with the weights of `staleness` updates ago (`rollout.staleness: k`): the
    statistics of an asynchronous engine whose batches are k versions old, without its timing, so they reproduce bit
    for bit. Each weight-sync keeps a snapshot and loads the one k syncs back; until k updates exist the engine keeps
    the initial weights. `lag` is the staleness of the next batch (min(updates so far, k))."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, staleness: int,
                 **kw):
        super().__init__(model, tokenizer, seed, **kw)
        self.staleness = staleness
        self.history: collections.deque[dict[str, torch.Tensor]] = collections.deque(maxlen=staleness + 1)

    @property
    def lag(self) -> int:
        return self.syncs - self.version

    @torch.no_grad()
    def load_weights(self, policy: torch.nn.Module) -> int:
        """Keep the policy's weights as version `syncs + 1`, load the version k back; returns the bytes loaded."""
        self.syncs += 1
        self.history.append(snapshot(policy))
        if self.syncs - self.staleness < 1:
            return 0
        self.version = self.syncs - self.staleness
        return self._install(self.history[0])

    def state_dict(self) -> dict:
        return {"history": list(self.history), **super().state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict, policy: torch.nn.Module) -> None:
        if "history" not in state:  # a checkpoint of another engine: start the history from the restored policy
            return RolloutEngine.load_state_dict(self, state, policy)
        self.history.clear()
        self.history.extend(state["history"])
        super().load_state_dict(state, policy)


ENGINES: dict[str, type[RolloutEngine]] = {"shared": RolloutEngine, "separate": SeparateEngine}


def token_logprobs(
    model: PreTrainedModel, batch: RolloutBatch, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each response token under `model` (and the entropy of its next-token distribution).

    Returns logp [B, T] and entropy [B, T] (or None); gradients flow unless the caller disables them.
    """
    device = model.device
    mask = batch.attention_mask.to(device)
    T = batch.response_mask.shape[1]
    # Only the last T + 1 positions reach the LM head: a real model's prompt is most of the sequence, and its
    # logits over a 49k vocabulary would cost more memory than the rest of the forward pass.
    out = model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=positions(mask), use_cache=False,
                logits_to_keep=T + 1)
    logits = out.logits[:, :T].float()  # [B, T, V] the position before response token t predicts it
    logp_all = F.log_softmax(logits, -1)  # [B, T, V]
    logp = logp_all.gather(-1, batch.responses.to(device).unsqueeze(-1)).squeeze(-1)  # [B, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
    return logp, entropy


def fill_groups(batch: RolloutBatch, k: int, keep_groups: Callable[[torch.Tensor, int], torch.Tensor],
                next_round: Callable[[int], RolloutBatch] | None, max_rounds: int,
                pad_id: int) -> tuple[RolloutBatch, dict[str, float]]:
    """Group filtering with resampling (DAPO's dynamic sampling): draw rounds (`next_round(i)`: the i-th extra
    round, rolled out and rewarded) until every process has as many kept groups as it started with, or `max_rounds`;
    then fill any shortfall with filtered-out groups.

    Every process runs the same number of rounds (they agree on 'done' by a sum over processes), so the prompt
    stream stays in step and DDP sees equal batch sizes.
    """
    need = len(batch) // k
    kept: list[RolloutBatch] = []
    dropped: list[RolloutBatch] = []
    rounds = drawn = n_kept = 0
    while True:
        keep = keep_groups(batch.rewards, k)  # [G] bool per group
        rows = keep.repeat_interleave(k)  # [B]
        kept.append(batch.rows(rows.nonzero().flatten()))
        dropped.append(batch.rows((~rows).nonzero().flatten()))
        rounds, drawn, n_kept = rounds + 1, drawn + len(keep), n_kept + int(keep.sum())
        short = torch.tensor([float(n_kept < need)])
        if float(batch.reduce_sum(short)) == 0 or rounds >= max_rounds or next_round is None:
            break
        batch = next_round(rounds)
    pool = RolloutBatch.cat(kept + dropped, pad_id)  # kept groups first
    totals = batch.reduce_sum(torch.tensor([float(drawn), float(n_kept), float(max(need - n_kept, 0))]))
    out = pool.rows(slice(0, need * k))
    out.reduce_sum = batch.reduce_sum
    return out, {"rollout/rounds": float(rounds), "rollout/kept_group_frac": float(totals[1] / totals[0]),
                 "rollout/filler_groups": float(totals[2])}
