"""Trainer: the policy under HF Accelerate, its optimizer, and the update over micro-batches.

Loss normalisation is global: every aggregation divides by counts over the whole rollout batch across all
micro-batches and processes (`AggNorm`), and each process's loss is multiplied by the world size because DDP
averages gradients. So 1 process x 4 micro-batches, 2 processes x 2 and 1 x 1 give the same gradient.
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from rlcore.algorithm import (
    IS_CORRECTIONS,
    KL_ESTIMATORS,
    LOSS_AGG,
    POLICY_LOSSES,
    AggNorm,
    kl_estimate,
    lookup,
    mismatch_stats,
)
from rlcore.batch import LossInputs, RolloutBatch
from rlcore.config import ConfigError, ExperimentConfig, TrainerConfig
from rlcore.critic import Critic
from rlcore.model import is_lora, trainable_state
from rlcore.rollout import token_logprobs


@dataclass
class Learner:
    """One model the update steps: its optimizer and the loss of a micro-batch. The policy is the first; a critic
    (or, later, a reward model) is another, stepped in the same backward."""

    name: str
    model: torch.nn.Module  # prepared by Accelerate
    optimizer: torch.optim.Optimizer
    loss: Callable[[RolloutBatch, AggNorm], tuple[torch.Tensor, dict[str, tuple[float, float]]]]


def process_group() -> Accelerator:
    """The process group (one process, or N under torchrun / `accelerate launch`)."""
    # cpu=True on a machine without CUDA is what makes Accelerate join a torchrun/`accelerate launch` process
    # group over gloo; without it every process silently trains alone.
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but Accelerate joined "
                           f"{acc.num_processes} process(es)")
    return acc


def accelerator(cfg: ExperimentConfig) -> Accelerator:
    """The process group of an RL run: every process takes the same share of each step's prompts."""
    acc = process_group()
    world = acc.num_processes
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step: must be divisible by the {world} processes, got "
                          f"{cfg.rollout.prompts_per_step}")
    return acc


def adamw(params, t: TrainerConfig, lr: float | None = None,
          cosine_over: int | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its schedule: linear warm-up over `t.warmup_steps`, then constant (RL), or with `cosine_over` a
    cosine decay to 10 % of the peak at that step (the usual recipe of a short supervised run)."""
    optimizer = torch.optim.AdamW(params, lr=t.lr if lr is None else lr, betas=t.betas, weight_decay=t.weight_decay)
    warm = max(t.warmup_steps, 1)

    def factor(s: int) -> float:
        w = min(1.0, (s + 1) / warm)
        if cosine_over is None:
            return w
        return w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / cosine_over, 1.0))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_learners(learners: list[Learner], micro: list, norm: AggNorm | None, grad_clip: float,
                  acc: Accelerator | None = None,
                  collect: Callable[[dict], None] | None = None) -> tuple[list[float], bool]:
    """The trainer core, one optimizer step: zero -> accumulate every micro-batch (one backward over all learners'
    graphs; only the last micro-batch all-reduces) -> clip each learner -> non-finite guard -> step.

    Each learner's loss is already divided by a *global* normaliser (`norm`), so the split into micro-batches and
    processes never changes the gradient; each process's loss is multiplied by the world size because DDP averages.
    `collect` receives each loss's metrics. Returns the learners' gradient norms and whether it stepped (a
    non-finite norm on any learner skips the step for all, on every process alike: the norms are all-reduced).
    """
    world = acc.num_processes if acc is not None else 1
    for learner in learners:
        learner.optimizer.zero_grad(set_to_none=True)
    for i, m in enumerate(micro):
        with ExitStack() as stack:
            if acc is not None and i < len(micro) - 1:
                for learner in learners:
                    stack.enter_context(acc.no_sync(learner.model))
            losses = []
            for learner in learners:  # disjoint graphs: one backward reaches every model
                loss, stats = learner.loss(m, norm)
                losses.append(loss)
                if collect is not None:
                    collect(stats)
            total = sum(losses[1:], losses[0]) * world
            acc.backward(total) if acc is not None else total.backward()
    clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
    norms = [float(clip(x.model.parameters(), grad_clip)) for x in learners]
    if not all(math.isfinite(n) for n in norms):
        for learner in learners:
            learner.optimizer.zero_grad(set_to_none=True)
        return norms, False
    for learner in learners:
        learner.optimizer.step()
    return norms, True


def my_share(n: int, acc: Accelerator | None) -> slice:
    """This process's contiguous share of n rows (sizes differ by at most one; a global normaliser keeps the
    gradient that of the whole batch whatever the split)."""
    world, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    return slice(rank * n // world, (rank + 1) * n // world)


def my_rows(part: list, acc: Accelerator | None) -> tuple[list, float]:
    """This process's rows of a batch and the weight of their loss. A process whose share is empty (a last batch
    smaller than the process group) still joins the all-reduce: it scores one row and weighs its loss 0."""
    mine = part[my_share(len(part), acc)]
    return (mine, 1.0) if mine else (part[:1], 0.0)


def epoch_batches(rows: list, epochs: int, size: int, seed: int) -> Iterator[list]:
    """`epochs` passes over `rows`, each in a new seeded order, in batches of `size` (a pass's last batch shorter)."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = rows[:]
        rng.shuffle(order)
        for i in range(0, len(order), size):
            yield order[i : i + size]


def global_sum(values: dict[str, float], acc: Accelerator | None) -> dict[str, float]:
    """Each value summed over the processes (identity on one): per-process shares of a global mean add up to it."""
    if acc is None or acc.num_processes == 1:
        return values
    t = acc.reduce(torch.tensor(list(values.values()), dtype=torch.float64), reduction="sum")
    return dict(zip(values, t.tolist(), strict=True))


class Trainer:
    def __init__(self, policy: PreTrainedModel, cfg: ExperimentConfig, accelerator: Accelerator,
                 critic: Critic | None = None):
        self.cfg, self.acc = cfg, accelerator
        optimizer, scheduler = adamw([p for p in policy.parameters() if p.requires_grad], cfg.trainer)
        # The schedule is not prepared: Accelerate's wrapper steps it once per process, so N processes would warm up
        # N times faster than one. It acts on the same parameter groups as the prepared optimizer.
        self.model, self.optimizer = accelerator.prepare(policy, optimizer)
        self.scheduler = scheduler
        self.critic = critic
        self.learners = [Learner("actor", self.model, self.optimizer, self._loss)]
        if critic is not None:
            self.learners.append(Learner(critic.name, critic.model, critic.optimizer, critic.loss))
        self.nonfinite_streak = 0  # consecutive steps with a skipped (non-finite) update
        a = cfg.algorithm
        self.policy_loss = lookup(POLICY_LOSSES, a.policy_loss, "policy_loss")
        self.loss_agg = lookup(LOSS_AGG, a.loss_agg, "loss_agg")
        self.correction = lookup(IS_CORRECTIONS, a.behaviour_correction, "behaviour_correction")
        r = cfg.rollout
        # The gap between the engine's policy and the trainer's is measured (mismatch/*, is/*) when it is corrected
        # or when the engine samples with other weights than the trainer's: stale, another precision, pushed rarely.
        self.watch_mismatch = (a.behaviour_correction != "none" or r.staleness > 0 or r.dtype != "float32"
                               or cfg.weight_sync.every > 1 or r.mode != "colocated"
                               or r.attention != "same")
        lookup(KL_ESTIMATORS, a.kl_estimator, "kl_estimator")  # fails early on an unknown name

    @property
    def unwrapped(self) -> PreTrainedModel:
        return self.acc.unwrap_model(self.model)

    def micro(self, batch: RolloutBatch) -> list[RolloutBatch]:
        mb = self.cfg.trainer.micro_batch_size
        return [batch.rows(slice(i, i + mb)) for i in range(0, len(batch), mb)]

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """Policy log-probs before the update (the 'old' policy of the PPO ratio). -> [B, T]"""
        return torch.cat([token_logprobs(self.unwrapped, m)[0].cpu() for m in self.micro(batch)])

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        if self.acc.num_processes > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.tolist()

    def _global_max(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t[0])

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """ppo_epochs x minibatches optimizer steps on the rollout batch; returns the step's actor metrics."""
        a = self.cfg.algorithm
        sums: dict[str, float] = defaultdict(float)  # metric -> sum over tokens (all micro-batches)
        counts: dict[str, float] = defaultdict(float)
        grad_norms: list[float] = []
        skipped = 0  # optimizer steps skipped by the NaN/inf guard
        loss_sum = 0.0  # each minibatch's loss is split over micro-batches and processes; their sum is the loss
        n_mini = a.minibatches
        size = -(-len(batch) // n_mini)
        is_max = 0.0  # the largest behaviour-correction weight of the step (all micro-batches)

        def collect(stats: dict) -> None:
            nonlocal loss_sum, is_max
            loss_sum += float(stats.pop("_policy_loss", 0.0))  # the policy's, for actor/loss
            is_max = max(is_max, stats.pop("_is_max", (0.0, 0.0))[0])
            for k, (v, c) in stats.items():
                sums[k] += v
                counts[k] += c

        for _ in range(a.ppo_epochs):
            for start in range(0, len(batch), size):
                mini = batch.rows(slice(start, start + size))
                tokens, seqs = self._global_sum([float(mini.response_mask.sum()), float(len(mini))])
                norm = AggNorm(tokens=tokens, seqs=seqs, max_len=float(self.cfg.rollout.max_new_tokens))
                norms, stepped = step_learners(self.learners, self.micro(mini), norm, self.cfg.trainer.grad_clip,
                                               self.acc, collect)
                for learner, n in zip(self.learners[1:], norms[1:], strict=True):  # the policy's is below
                    if math.isfinite(n):
                        sums[f"{learner.name}/grad_norm"] += n
                        counts[f"{learner.name}/grad_norm"] += 1
                if not stepped:
                    skipped += 1
                    continue
                grad_norms.append(norms[0])
                self.scheduler.step()
        keys = sorted(sums)
        reduced = self._global_sum([sums[k] for k in keys] + [counts[k] for k in keys] + [loss_sum])
        out = {k: reduced[i] / max(reduced[len(keys) + i], 1e-12) for i, k in enumerate(keys)}
        n_steps = len(grad_norms) + skipped
        out["actor/loss"] = reduced[-1] / n_steps  # mean over optimizer steps
        if grad_norms:
            out["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        if "is/weight_mean" in out:
            # Kish's effective sample size as a share of the tokens: (mean w)^2 / mean w^2, 1 when every weight is equal
            out["is/ess"] = out["is/weight_mean"] ** 2 / max(out.pop("is/weight_sq_mean"), 1e-12)
            out["is/weight_max"] = self._global_max(is_max)
        out = {k: v for k, v in out.items() if math.isfinite(v)}  # a NaN loss is counted below, not charted
        out["actor/nonfinite_skips"] = float(skipped)
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        out["actor/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def state_dict(self) -> dict:
        """Everything the update needs to continue: weights, optimizers, schedule, the non-finite streak."""
        state = {"policy": trainable_state(self.unwrapped), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "nonfinite_streak": self.nonfinite_streak}
        return state | (self.critic.state_dict() if self.critic is not None else {})

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self.unwrapped.load_state_dict(state["policy"], strict=not is_lora(self.unwrapped))
        if unexpected or any("lora_" in k for k in missing):  # with LoRA only the frozen base may be missing
            raise ValueError(f"checkpoint does not fit the policy: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_streak = state["nonfinite_streak"]
        if self.critic is not None:
            self.critic.load_state_dict(state)

    def _loss(self, m: RolloutBatch, norm: AggNorm) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """Loss of one micro-batch (already divided by the global normaliser) and its metric (sum, count) pairs."""
        a = self.cfg.algorithm
        dev = self.acc.device
        mask = m.response_mask.to(dev)  # [b, T]
        logp, entropy = token_logprobs(self.model, m, with_entropy=True)  # [b, T], [b, T]
        old = m.old_logp.to(dev) if m.old_logp is not None else logp.detach()  # on-policy: ratio = 1, grad = PG
        sampler = m.sampler_logp.to(dev)  # [b, T] the behaviour policy mu
        anchor = sampler if a.ratio_anchor == "behaviour" else old  # coupled PPO clips pi/mu, decoupled pi/pi_prox
        view = LossInputs(anchor, m.adv.to(dev), mask, sampler)
        per_token, pl_metrics = self.policy_loss(logp, view, a)  # [b, T]
        tok = float(mask.sum())
        stats = {k: (float((v * mask).sum()), tok) for k, v in pl_metrics.items()}
        if self.watch_mismatch:
            log_w = (old - sampler) * mask  # [b, T] log pi_prox - log mu (0 on padding)
            w = self.correction(log_w, mask, a)  # [b, T] detached weights (all 1 without a correction)
            per_token = per_token * w
            stats |= {k: (float((v * mask).sum()), tok) for k, v in mismatch_stats(log_w, w, mask).items()}
            stats["_is_max"] = (float((w * mask).max()) if tok else 0.0, 0.0)
        stats["actor/pg_loss"] = (float((per_token.detach() * mask).sum()), tok)
        stats["actor/entropy"] = (float((entropy * mask).sum()), tok)
        stats["actor/sampler_logp_gap"] = (float(((logp.detach() - sampler).abs() * mask).sum()), tok)
        if m.ref_logp is not None:
            kl = kl_estimate(a.kl_estimator, logp, m.ref_logp.to(dev), a.kl_clamp)  # [b, T]
            if a.kl_placement == "loss" and a.kl_coef > 0:  # `reward`: the anchor shaped the advantages; 0: logged only
                per_token = per_token + a.kl_coef * kl
            stats["kl/mean"] = (float((kl.detach() * mask).sum()), tok)
            # One yardstick whatever estimator the loss uses, so runs with k1, k2 and k3 can be compared (lesson 03).
            k3 = kl if a.kl_estimator == "k3" else kl_estimate("k3", logp.detach(), m.ref_logp.to(dev), a.kl_clamp)
            stats["kl/k3_mean"] = (float((k3.detach() * mask).sum()), tok)
            # Per sequence (summed over its tokens): the KL Gao et al. (2022) put on the x axis as sqrt(KL).
            stats["kl/k3_seq"] = (float((k3.detach() * mask).sum()), float((mask.sum(-1) > 0).sum()))
        loss = self.loss_agg(per_token, mask, norm)
        stats["_policy_loss"] = float(loss.detach())
        return loss, stats
