"""The metric catalogue: every metric rlcore logs, with its unit, formula and the lesson that explains it; and the
functions that compute the batch's statistics and probe memory.

The tracker refuses to log a key that is not here (a test enforces it), and the dashboard reads this table for
its tooltips, so any number on screen is one hop from its definition. (torch is imported inside the functions that
use it: the tracker and the dashboard read the catalogue without loading torch.)
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rlcore.batch import RolloutBatch


@dataclass(frozen=True)
class MetricDef:
    name: str
    unit: str
    formula: str
    lesson: str  # lesson id that explains it ("" when none yet)
    healthy: str = ""  # what a working run shows (ranges measured on this lab's runs where a number is given)
    red_flag: str = ""  # the reading that means something is wrong, and the usual cause


CATALOGUE: list[MetricDef] = [
    # reward
    MetricDef("reward/mean", "reward", "mean of sequence rewards over the step's B = prompts x K completions", "01"),
    MetricDef("reward/std", "reward", "std of sequence rewards over the batch", "01"),
    MetricDef("reward/overlong_penalty", "reward", "mean DAPO overlong shaping added to the reward (0 when off)", "13"),
    MetricDef("reward/errors", "samples", "reward-function calls this step that raised or returned a non-finite value "
              "(each scored 0); logged for every reward but the addition task's own verifier", "01"),
    MetricDef("reward/<component>", "reward", "unweighted mean of one reward component (reward.components[].name) "
              "over the batch; logged when the reward has more than one component", "01"),
    MetricDef("reward/true", "reward", "mean of the task's own verifier over the batch, logged when the reward is "
              "a learned reward model or reward.log_true is set (the reward is then a proxy): the two diverging is "
              "over-optimisation or a hack", "15"),
    MetricDef("prompt/truncated", "prompts", "training prompts cut to prompt.max_tokens this step (overflow: truncate)", "01"),
    MetricDef("reward/zero_var_group_frac", "fraction", "groups whose K rewards are all equal (zero GRPO advantage: wasted samples)", "02"),
    # rollout (dynamic sampling)
    MetricDef("rollout/rounds", "rounds", "rollout rounds this step (1 without a group filter)", "13"),
    MetricDef("rollout/kept_group_frac", "fraction", "drawn groups the group filter kept (DAPO: groups with reward variance)", "13"),
    MetricDef("rollout/filler_groups", "groups", "filtered-out groups used to fill the batch after max_sample_rounds", "13"),
    # curation (lesson 18a)
    MetricDef("curation/kept_frac", "fraction", "prompts kept of those drawn so far by the pass-rate curation", "18a"),
    MetricDef("curation/skipped_buckets", "buckets", "difficulty buckets now skipped: seen in enough groups and "
              "estimated to pass at most curation.low or at least curation.high", "18a"),
    # advantage
    MetricDef("adv/mean", "adv", "mean advantage over response tokens", "04"),
    MetricDef("adv/abs_mean", "adv", "mean |advantage| over response tokens (signal strength)", "04"),
    # actor
    MetricDef("actor/loss", "loss", "aggregated policy objective incl. beta*KL when KL is in the loss", "05"),
    MetricDef("actor/pg_loss", "loss", "token mean of the per-token policy loss (without KL)", "05"),
    MetricDef("actor/entropy", "nats", "token mean of -sum_v p(v) log p(v) of the policy's next-token distribution", "13"),
    MetricDef("actor/clipfrac_low", "fraction", "tokens whose PPO ratio was clipped below 1-eps (A<0)", "10"),
    MetricDef("actor/clipfrac_high", "fraction", "tokens whose PPO ratio was clipped above 1+eps (A>0)", "10"),
    MetricDef("actor/clipfrac_dual", "fraction", "tokens with A<0 whose loss was capped at c|A| by dual-clip", "10"),
    MetricDef("actor/ratio", "ratio", "token mean of pi_theta / pi_old", "10"),
    MetricDef("actor/ppo_kl", "nats", "token mean of k3(pi_old, pi_theta): how far the update moved", "10"),
    MetricDef("actor/grad_norm", "norm", "global L2 norm of the gradient before clipping (mean over optimizer steps)", "05"),
    MetricDef("actor/nonfinite_skips", "updates", "optimizer steps skipped because the gradient was NaN/inf", "24"),
    MetricDef("actor/lr", "lr", "learning rate at this step", "05"),
    MetricDef("actor/sampler_logp_gap", "nats", "token mean of |log pi_sampler - log pi_trainer| (engine/trainer mismatch)", "24"),
    # critic (PPO with GAE)
    MetricDef("critic/value_loss", "loss", "token mean of 0.5 max((V-R)^2, (V_clip-R)^2), R = GAE return", "10"),
    MetricDef("critic/vpred", "reward", "token mean of the critic's value V(s_t) during the update", "10"),
    MetricDef("critic/clipfrac", "fraction", "tokens whose value loss used the clipped value", "10"),
    MetricDef("critic/grad_norm", "norm", "global L2 norm of the critic's gradient before clipping", "10"),
    MetricDef("critic/explained_var", "fraction", "1 - Var(R - V_old) / Var(R) over response tokens (1 = perfect critic)", "10"),
    # KL to reference
    MetricDef("kl/mean", "nats", "token mean of the chosen estimator of KL(pi_theta || pi_ref)", "03"),
    MetricDef("kl/k3_mean", "nats", "token mean of k3 = rho - 1 - log rho, rho = pi_ref / pi_theta, whatever "
              "kl_estimator the loss uses: the KL figure to compare across estimators", "03"),
    MetricDef("kl/k3_seq", "nats", "k3 summed over a completion's tokens, mean over completions: an estimate of the "
              "sequence-level KL(pi_theta || pi_ref); over-optimisation is read against sqrt of it (Gao et al., 2022)",
              "15"),
    # response
    MetricDef("response/length_mean", "tokens", "mean completion length (tokens up to and including EOS)", "14"),
    MetricDef("response/length_max", "tokens", "longest completion in the batch", "14"),
    MetricDef("response/length_wrong_mean", "tokens", "mean length of completions the task scored wrong (task reward "
              "< 1, before shaping); absent when every completion is right", "14"),
    MetricDef("response/length_right_mean", "tokens", "mean length of completions the task scored right; absent when "
              "none is", "14"),
    MetricDef("response/tool_call_frac", "fraction", "completions that called the tool (agentic runs only)", "08"),
    MetricDef("response/clip_ratio", "fraction", "completions cut at max_new_tokens without EOS", "22b"),
    # eval (held-out, never trained on)
    MetricDef("eval/greedy_accuracy", "fraction", "held-out prompts whose greedy completion is exactly right", "01"),
    MetricDef("eval/sampled_reward", "reward", "expected reward at T=1 per held-out prompt: pi(answer, EOS | prompt) "
              "exactly (char model, no tool), else the mean of k samples", "01"),
    MetricDef("eval/true_accuracy", "fraction", "held-out greedy completions the task's own verifier accepts, logged "
              "when the reward is a learned reward model or reward.log_true is set", "15"),
    MetricDef("eval/proxy_reward", "reward", "the learned reward (the whole weighted reward) of the held-out greedy "
              "completions", "15"),
    # search at evaluation (kind: search, lesson 17): logged at step N, the samples per prompt
    MetricDef("search/greedy", "fraction", "held-out true accuracy of one greedy answer (budget 1, the same at every N)", "17"),
    MetricDef("search/sample", "fraction", "held-out true accuracy of one sample at T = 1 (the mean over the N)", "17"),
    MetricDef("search/majority", "fraction", "true accuracy of the answer most of the N samples give (self-consistency)", "17"),
    MetricDef("search/best_of_n", "fraction", "true accuracy of the sample the outcome (Bradley-Terry) model scores "
              "highest among N", "17"),
    MetricDef("search/best_of_n_pointwise", "fraction", "true accuracy of the sample the pointwise outcome model scores "
              "highest among N (trained on the process model's answers, one label each)", "17"),
    MetricDef("search/best_of_n_prm", "fraction", "true accuracy of the sample whose weakest step the process model "
              "scores highest among N", "17"),
    MetricDef("search/prm_beam", "fraction", "true accuracy of PRM-guided beam search with N candidates a step", "17"),
    MetricDef("search/prm_beam_dedup", "fraction", "prm_beam with each distinct candidate prefix ranked once", "17"),
    MetricDef("search/oracle", "fraction", "pass@N: a right answer is among the N samples (a perfect ranker's ceiling)", "17"),
    MetricDef("search_tokens/<method>", "tokens", "tokens the method generated for all held-out prompts at this N", "17"),
    # sft warm start
    MetricDef("sft/loss", "nats", "token mean cross-entropy on the completion tokens", "01"),
    # reward model (kind: reward_model)
    MetricDef("rm/loss", "nats", "mean Bradley-Terry loss -log sigma(r_chosen - r_rejected) over the step's pairs (+ centring)", "15"),
    MetricDef("rm/accuracy", "fraction", "training pairs of the step whose chosen completion scores higher", "15"),
    MetricDef("rm/heldout_accuracy", "fraction", "held-out pairs ranked as labelled, among those whose true rewards "
              "differ (the labels carry the data set's label_noise: about 1 - label_noise is the ceiling)", "15"),
    MetricDef("rm/heldout_true_accuracy", "fraction", "held-out pairs with different true rewards ranked as the true "
              "reward ranks them (noise-free: the model may beat its noisy labels)", "15"),
    MetricDef("rm/heldout_margin", "reward", "mean r_chosen - r_rejected over held-out pairs", "15"),
    # DPO / IPO (kind: dpo), TRL's names: rewards are implicit, beta * (log pi - log pi_ref) of a whole completion
    MetricDef("prm/loss", "nats", "mean binary cross-entropy of the process reward model's score after each answer "
              "token against its label (is the answer so far still right?)", "17"),
    MetricDef("prm/accuracy", "fraction", "training steps (answer tokens) whose score has the label's sign", "17"),
    MetricDef("prm/heldout_step_accuracy", "fraction", "held-out answer tokens classified right (logit > 0 iff the "
              "answer so far can still be right)", "17"),
    MetricDef("prm/heldout_final_accuracy", "fraction", "held-out answers whose last step (EOS) is classified right: "
              "the process model used as an outcome model", "17"),
    MetricDef("dpo/loss", "nats", "mean pairwise loss over the step's pairs (sigmoid: -log sigma(beta * margin); ipo: "
              "(h - 1/(2 beta))^2)", "16"),
    MetricDef("rewards/chosen", "reward", "mean implicit reward beta * (log pi(y_c|x) - log pi_ref(y_c|x)) of the chosen completions", "16"),
    MetricDef("rewards/rejected", "reward", "mean implicit reward of the rejected completions", "16"),
    MetricDef("rewards/margins", "reward", "mean of rewards/chosen - rewards/rejected per pair", "16"),
    MetricDef("rewards/accuracies", "fraction", "pairs whose chosen completion has the higher implicit reward", "16"),
    # timing: seconds per phase of one step (lesson 07 is this picture)
    MetricDef("timing/rollout", "s", "sampling completions (prefill + KV-cached decode)", "07"),
    MetricDef("timing/reward", "s", "decoding and scoring completions", "07"),
    MetricDef("timing/reference", "s", "reference model forward (0 when beta = 0)", "07"),
    MetricDef("timing/old_logprob", "s", "policy forward before the update (when a batch is reused, or KL is placed in the reward)", "07"),
    MetricDef("timing/values", "s", "critic forward for V_old (0 without a critic)", "07"),
    MetricDef("timing/advantage", "s", "advantage estimation", "07"),
    MetricDef("timing/update", "s", "policy forward/backward over micro-batches + optimizer step", "07"),
    MetricDef("timing/sync", "s", "pushing weights to the rollout engine (0 when shared)", "06"),
    MetricDef("timing/step", "s", "wall time of the whole step; step - sum(phases) is 'other' (logging, metrics)", "07"),
    # wall-clock outside the steps (the Bottlenecks page's wall-clock split)
    MetricDef("timing/startup", "s", "process start of the run to its first step: building models, loading the warm start or checkpoint, opening the MLflow run", "07"),
    MetricDef("timing/eval", "s", "held-out evaluation at this step (logged on eval steps)", "07"),
    MetricDef("timing/checkpoint", "s", "writing a resumable checkpoint at this step", "07"),
    MetricDef("timing/save", "s", "saving the final policy at the end of the run", "07"),
    MetricDef("timing/wall", "s", "wall-clock since the run's process started, at the end of this step", "07"),
    MetricDef("timing/total", "s", "wall-clock of the whole run, logged once at its end", "07"),
    # perf
    MetricDef("perf/tokens_per_s", "tokens/s", "generated response tokens (all processes) / timing/step", "22"),
    MetricDef("rollout/staleness", "updates", "how many updates older than the trainer's the weights that sampled "
              "this step's batch are (rollout.staleness or async max_staleness k: min(step - 1, k))", "24"),
    MetricDef("engine/generate_s", "s", "seconds the engine process spent generating this step's batch, on its own "
              "clock (rollout.mode separate or async; in async it overlaps the trainer's phases)", "19"),
    MetricDef("engine/push_s", "s", "seconds the engine process spent installing and checking pushed weights this step",
              "19"),
    MetricDef("engine/push_send_s", "s", "seconds the trainer spent sending weights to the engine process this step "
              "(tensors travel in shared memory)", "19"),
    MetricDef("engine/wait_s", "s", "seconds the trainer waited for this step's batch (timing/rollout less the "
              "hand-over): the trainer's idle time", "22c"),
    MetricDef("idle/trainer", "fraction", "engine/wait_s / timing/step: the share of the step the trainer waited for "
              "samples (separate: about rollout / step; async: 0 when the engine keeps ahead)", "22c"),
    MetricDef("idle/engine", "fraction", "1 - (engine/generate_s + engine/push_s) / timing/step: the share of the step "
              "the engine had nothing to do, with one batch per step (separate: the update's share)", "22c"),
    MetricDef("sync/verified_tensors", "tensors", "tensors of the last weight push checked on the engine by checksum "
              "(a mismatch stops the run FAILED)", "06"),
    MetricDef("mismatch/kl_k1", "nats", "KL(mu || pi_prox) per token by k1 = log mu - log pi_prox, mu the engine that "
              "sampled, pi_prox the trainer's policy before the update (logged with a behaviour correction)", "24"),
    MetricDef("mismatch/kl_k3", "nats", "the same KL by k3 = r - 1 - log r, r = pi_prox/mu: never negative per token", "24"),
    MetricDef("is/weight_mean", "ratio", "mean behaviour-correction weight over response tokens (1 when the engine "
              "samples from the trainer's policy)", "24"),
    MetricDef("is/weight_max", "ratio", "largest behaviour-correction weight of the step", "24"),
    MetricDef("is/ess", "fraction", "Kish's effective sample size of the weights as a share of the tokens, "
              "(mean w)^2 / mean w^2: 1 when all weights are equal, small when a few tokens carry the batch", "24"),
    MetricDef("is/masked_frac", "fraction", "response tokens whose weight is 0 (masked IS rejected them)", "24"),
    MetricDef("perf/cpu_s", "s", "CPU seconds the run's process spent (all its threads; rank 0's on several processes), "
              "logged at the end: compute compared across methods on a shared machine, where wall-clock is noisy", "18a"),
    MetricDef("perf/engine_cpu_s", "s", "CPU seconds the rollout engine's own process spent (rollout.mode separate "
              "or async; start-up included), logged at the end beside perf/cpu_s, which counts the trainer's", "19"),
    MetricDef("perf/peak_mem_mb", "MB", "peak memory of this run: CUDA max allocated, or on CPU the peak RSS since the run began (Linux)", "22"),
    # sweeps (the parent run of `rlcore sweep`)
    MetricDef("sweep/best_value", "objective", "best objective value among the trials completed so far", "26"),
    MetricDef("perf/sync_mb", "MB", "bytes pushed to the rollout engine this step", "06"),
]

# Healthy readings and red flags: (healthy, red flag). Numbers are from this lab's lesson runs (tiny Llama, addition,
# 30 steps x 32 prompts x 8 samples from the shipped warm start) unless the text says otherwise; other models and
# tasks have other scales, the shape of the curve carries over.
HEALTH: dict[str, tuple[str, str]] = {
    "reward/true": ("rises with the training reward, or at least does not fall (here 0.59 → 0.67 over 80 steps of "
                    "GRPO on a reward model at beta = 0.2)", "falling while reward/mean rises: the policy is "
                    "exploiting the proxy (lesson 15's over-optimisation, lesson 18's leak)"),
    "eval/true_accuracy": ("steady or rising (here 0.867 → 0.818 ± 0.019 on a reward model at beta = 0.2)",
                           "a steady fall while the proxy rises (0.867 → 0.39 under a leaky verifier at beta = 0)"),
    "mismatch/kl_k3": ("float rounding on-policy (below 1e-6 here); about 5e-4 with a bfloat16 sampler", "growing "
                       "step by step: a stale engine, a sync that did not happen, or a ratio anchored to the wrong "
                       "policy (0.08 at staleness 2 without a correction, lesson 24)"),
    "is/ess": ("near 1 (0.96-0.99 with staleness 2 and a correction)", "well below 1: a few tokens carry the batch; "
                "the engine and the trainer disagree too much for a reweighting to help"),
    "idle/trainer": ("near 0 in async when generation is the shorter role; in separate the rollout's share of "
                     "the step", "high in async: generation is the bottleneck; more engine capacity (or a shorter "
                     "max_new_tokens) would pay, not a faster trainer"),
    "idle/engine": ("the update's share of the step in separate; near 0 in async when generation is the longer role",
                    "high in async: the trainer is the bottleneck, and a deeper queue (max_staleness) only adds "
                    "staleness"),
    "rollout/staleness": ("the staleness you configured, and no more", "above max_staleness, or growing: the engine "
                          "is not receiving weights"),
    "prm/heldout_step_accuracy": ("well above the base rate of always saying 'right' (0.880 against 0.585 here)",
                                  "at the base rate: the process model learned nothing but the label frequency"),
    "rm/heldout_accuracy": ("below 1 - label noise, rising over the epochs (0.75 ± 0.06 here on 350 clean pairs)",
                            "at 0.5: the reward model ranks at random; above the ceiling: leaked or duplicated pairs"),
    "rewards/accuracies": ("rises towards 1 on the training pairs", "near 1 while held-out accuracy falls: DPO is "
                           "over-fitting the pairs (lesson 16)"),
    "reward/mean": ("rises over tens of steps, noisily (here about 0.61 over the first ten steps, 0.63-0.65 over "
                    "the last ten of 30, 0.75 after 100)",
                    "flat from step 0: no group has reward variance, or the lr is far too small; a sudden fall: the "
                    "policy collapsed (look at actor/entropy and kl/mean)"),
    "reward/zero_var_group_frac": ("well below 1: most groups disagree and carry a signal (here 0.06-0.11 over 30 "
                                   "steps at K = 8, rising to about 0.28 by step 100 as the policy sharpens)",
                                   "near 1: almost every group is all-right or all-wrong, so GRPO/RLOO learn "
                                   "nothing; use harder or easier prompts, a larger K, or DAPO's group filter"),
    "adv/abs_mean": ("steady; here about 0.75-0.8 with std scaling (GRPO), 0.3-0.45 without (Dr.GRPO, RLOO)",
                     "falling to 0 while reward is not 1: groups stopped disagreeing (zero_var_group_frac rises)"),
    "actor/entropy": ("falls slowly as the policy sharpens (here about 0.86 to 0.69 nats over 30 steps, 0.45 "
                      "after 100)", "a fast fall to ~0: collapse to one answer per prompt "
                      "(exploration is gone); a rise: the update is too large or the KL anchor too weak"),
    "actor/grad_norm": ("of the same order from step to step", "spikes of 10x or more, or NaN: lr too high, a "
                        "bad batch; actor/nonfinite_skips counts skipped steps"),
    "actor/loss": ("noisy around 0 for on-policy GRPO (mean advantage is 0); not a progress measure",
                   "a steady trend is not progress either: read reward and eval instead"),
    "actor/clipfrac_low": ("0 on-policy (one update per batch: the ratio is 1 by construction); 0.01-0.2 with "
                           "several epochs", "above about 0.3: the epochs move the policy past the trust region"),
    "actor/clipfrac_high": ("as clipfrac_low", "as clipfrac_low; much above clipfrac_low: positive advantages "
                            "are pushing probabilities up fast (DAPO's clip-higher widens this side on purpose)"),
    "actor/ppo_kl": ("below about 0.02 nats per token per step", "growing across epochs: the batch is reused "
                     "for too many epochs or the lr is too high"),
    "critic/value_loss": ("falls over the first steps as the critic learns the reward scale",
                          "rising, or stuck high: the critic cannot fit the returns (lr, or value clipping too tight)"),
    "critic/explained_var": ("rises from <= 0 towards 0.2-0.6; 1 would be a perfect critic",
                             "negative for long: the critic is worse than predicting the mean, so GAE adds noise"),
    "kl/mean": ("grows slowly from 0; here about 0.02 to 0.05 nats per token over 30 steps at beta 0.04, 0.1-0.2 "
                "after 100", "shooting up: the anchor "
                "is not holding (beta too small, lr too high); negative values: the k1 estimator, not a bug"),
    "kl/k3_mean": ("as kl/mean, and comparable across estimators", "as kl/mean"),
    "response/length_mean": ("stable, or drifting slowly for a reason the task explains",
                             "growing without reward growing: length bias or reward hacking (lesson 14)"),
    "response/length_wrong_mean": ("flat or falling", "rising while right answers stay short: the per-sequence "
                                   "length normalisation under-penalises long wrong answers (lesson 14)"),
    "response/clip_ratio": ("near 0", "above a few percent: answers run into max_new_tokens (raise it, or shape "
                            "with DAPO's overlong penalty)"),
    "response/tool_call_frac": ("rises when calling the tool pays", "0 throughout: the warm start never calls "
                                "it, so RL has nothing to reinforce"),
    "eval/sampled_reward": ("rises with reward/mean on prompts never trained on", "reward/mean rises but this "
                            "does not: the policy is fitting the training stream, not the task"),
    "eval/greedy_accuracy": ("above the sampled reward and roughly flat: RL sharpens what greedy already gets "
                             "right", "falling: the update damaged the policy's best guesses"),
    "timing/step": ("stable step to step", "creeping up: something grows with the run (a leak, a cache)"),
    "perf/tokens_per_s": ("stable", "falling over a run: see timing/* for the phase that grew"),
}

CATALOGUE = [MetricDef(m.name, m.unit, m.formula, m.lesson, *HEALTH.get(m.name, ("", ""))) for m in CATALOGUE]


class _Catalogue(dict):
    """name -> MetricDef; a name of a family (`reward/<component>`) resolves to the family's entry."""

    FAMILIES = {"reward/": "reward/<component>", "search_tokens/": "search_tokens/<method>"}

    def _family(self, key: object) -> str | None:
        if isinstance(key, str) and "/" in key:
            fam = self.FAMILIES.get(key.split("/", 1)[0] + "/")
            if fam is not None and re.fullmatch(r"[a-z][a-z0-9_]*", key.split("/", 1)[1]):
                return fam
        return None

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (self._family(key) is not None and key != self._family(key))

    def __getitem__(self, key: str) -> MetricDef:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        fam = self._family(key)
        if fam is None:
            raise KeyError(key)
        return dict.__getitem__(self, fam)

    def get(self, key, default=None):
        return self[key] if key in self else default


BY_NAME: dict[str, MetricDef] = _Catalogue({m.name: m for m in CATALOGUE})
NAMED = frozenset(m.name for m in CATALOGUE if "<" not in m.name)  # the exact names (no family)


# ------------------------------------------------------------------------------------------ computed

def batch_metrics(batch: RolloutBatch, acc: Accelerator, k: int) -> dict[str, float]:
    """Reward and response statistics over the global batch (gathered from every process)."""
    import torch

    lengths = batch.response_mask.sum(-1)  # [B]
    local = torch.stack([batch.rewards.float(), lengths, (~batch.finished).float(), batch.shaping.float()], 1)  # [B, 4]
    g = acc.gather(local.to(acc.device)).cpu() if acc.num_processes > 1 else local  # [B_global, 4]
    rewards, lengths, clipped, shaping = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    groups = rewards.view(-1, k)  # rows are prompt-major, so each row of this view is one group
    mask = batch.response_mask
    right = (rewards - shaping) >= 1.0  # [B_global] the task's verdict, before any length shaping
    by_verdict = {f"response/length_{name}_mean": float(lengths[rows].mean())
                  for name, rows in (("wrong", ~right), ("right", right)) if bool(rows.any())}
    return by_verdict | {
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
    } | tool_metrics(batch)


def tool_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Agentic runs: how often the policy chose to call the tool (over every process's rows); {} without a tool."""
    import torch

    if batch.tool_mask is None:
        return {}
    used = (batch.tool_mask.sum(-1) > 0).float()  # [B]
    total, n = batch.reduce_sum(torch.stack([used.sum(), torch.tensor(float(len(batch)))]))
    return {"response/tool_call_frac": float(total / n)}


def reset_peak_memory() -> None:
    """Start a new high-water mark, so each run reports its own peak, not the process's."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the RSS peak is the process's lifetime peak (see peak_memory_mb)


def peak_memory_mb() -> float:
    import torch

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
