"""Bottleneck and health findings: explicit rules over a run's config, its logged per-step metrics and its
wall-clock split, each naming the lesson that explains it.

A rule sees the run's params (flattened config, strings as MLflow stores them), a frame of its per-step metrics,
and its wall-clock split (`wall_clock`); it returns a finding or None. Advice reads the config: a rule never
suggests turning on what is already on, and quotes the current value of the knob it suggests. Thresholds are
constants stated in each message, so a reader can check the arithmetic on the page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from rlcore.timing import PHASES

# Wall-clock parts, in the order the page stacks them: everything a run's process spends its time on.
WALL_PARTS = ("startup", "steps", "eval", "checkpoint", "other")


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "warn" or "info"
    message: str
    lesson: str  # the lesson that explains it; the page links it only if that lesson exists


def phase_shares(steps: pd.DataFrame) -> pd.Series:
    """Share of the total step time spent in each phase, plus 'other' (step minus the phases); empty without
    step timings. A frame that carries exact shares in `attrs["shares"]` (summed in SQL over every step, when the
    frame itself is downsampled) gives those."""
    if "shares" in steps.attrs:
        return pd.Series(steps.attrs["shares"], dtype=float)
    total = steps["timing/step"].sum() if "timing/step" in steps else 0.0
    shares = {p: steps.get(f"timing/{p}", pd.Series(dtype=float)).sum() / total for p in PHASES} if total else {}
    if shares:
        shares["other"] = max(0.0, 1 - sum(shares.values()))
    return pd.Series(shares, dtype=float)


def shares_from_sums(sums: dict[str, float]) -> pd.Series:
    """`phase_shares` from the sums of `timing/<phase>` and `timing/step` over every step."""
    total = sums.get("timing/step", 0.0)
    if not total:
        return pd.Series(dtype=float)
    shares = {p: sums.get(f"timing/{p}", 0.0) / total for p in PHASES}
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    return pd.Series(shares, dtype=float)


def wall_clock(sums: dict[str, float], duration_s: float | None = None) -> pd.Series:
    """Seconds of the run's wall-clock per part (WALL_PARTS) and `total`, from the sums of its timing metrics over
    every logged step (`timing/<x>` -> seconds). The total is `timing/total` (logged at the end), else the last
    `timing/wall` (a run still going, or killed), else the MLflow run's duration (runs logged before these metrics
    existed: start-up before the run opened is then not counted). `other` = total - the parts (logging, MLflow,
    process exit)."""
    parts = {"startup": sums.get("timing/startup", 0.0), "steps": sums.get("timing/step", 0.0),
             "eval": sums.get("timing/eval", 0.0),
             "checkpoint": sums.get("timing/checkpoint", 0.0) + sums.get("timing/save", 0.0)}
    total = sums.get("timing/total") or sums.get("max:timing/wall") or duration_s or sum(parts.values())
    parts["other"] = max(0.0, total - sum(parts.values()))
    return pd.Series({**parts, "total": max(total, sum(parts.values()))}, dtype=float)


Rule = Callable[[dict, pd.DataFrame, "pd.Series | None"], "Finding | None"]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _col(steps: pd.DataFrame, key: str) -> pd.Series:
    return steps[key].dropna() if key in steps else pd.Series(dtype=float)


def _num(params: dict, key: str, default: float = 0.0) -> float:
    try:
        return float(params.get(key, default))
    except (TypeError, ValueError):
        return default


def _share(wall: pd.Series | None, part: str) -> float:
    return float(wall[part] / wall["total"]) if wall is not None and wall.get("total", 0) > 0 else 0.0


def _error_share(params: dict, steps: pd.DataFrame) -> float:
    """Failed reward calls per step over the calls a step makes (samples x components), averaged over steps."""
    errors = _col(steps, "reward/errors")
    calls = _num(params, "rollout.prompts_per_step") * _num(params, "rollout.samples_per_prompt")
    return float(errors.mean() / calls) if len(errors) and calls > 0 else 0.0


# ------------------------------------------------------------------------------------------------ the reward first


@rule
def reward_errors(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    """Before any advice that reads the reward: a reward that raised is 0, not a measurement."""
    share = _error_share(params, steps)
    if share >= 0.05:
        what = ("every sample's reward is 0 because the reward raised: the other findings about rewards, groups "
                "and the KL read a broken reward, not the policy" if share >= 0.5 else
                "those samples scored 0 whatever they said")
        return Finding("reward_errors", "warn", f"reward/errors: {share:.0%} of reward calls failed (raised, timed "
                       f"out or returned no number) on the average step (>= 5 %): {what}. Fix the reward function "
                       "(its first error is in the run's rlcore.failure tag when it stopped the run).", "03")
    return None


# ------------------------------------------------------------------------------------------------ the step


@rule
def rollout_bound(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    share = phase_shares(steps).get("rollout", 0.0)
    if share >= 0.5:
        cap = params.get("rollout.max_new_tokens", "?")
        clip = _col(steps, "response/clip_ratio")
        cut = (f" {clip.mean():.0%} of completions hit the cap, so a lower cap would cut answers."
               if len(clip) and clip.mean() > 0.05 else " Few completions hit the cap: a lower cap costs nothing.")
        return Finding("rollout_bound", "warn", f"Rollout is {share:.0%} of the step (>= 50 %): generation "
                       f"dominates. rollout.max_new_tokens is {cap}.{cut} More prompts per forward (larger "
                       "rollout.prompts_per_step) or a faster engine buy the most here.", "28")
    return None


@rule
def update_bound(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    share = phase_shares(steps).get("update", 0.0)
    if share >= 0.5:
        epochs, micro = int(_num(params, "algorithm.ppo_epochs", 1)), params.get("trainer.micro_batch_size", "?")
        more = (f" algorithm.ppo_epochs = {epochs}: each extra pass costs one more update; try 1."
                if epochs > 1 else "")
        return Finding("update_bound", "warn", f"The update is {share:.0%} of the step (>= 50 %): forward and "
                       f"backward over the batch dominate.{more} trainer.micro_batch_size is {micro}: larger "
                       "micro-batches use the cores better while memory allows (same gradient: the loss is "
                       "aggregated over the whole batch).", "05")
    return None


@rule
def reference_bound(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    share = phase_shares(steps).get("reference", 0.0)
    kl = _col(steps, "kl/mean")
    if share >= 0.25 and not (len(kl) and kl.abs().mean() < 1e-3):  # the tiny-KL case is reference_removable's
        return Finding("reference_bound", "warn", f"The reference forward is {share:.0%} of the step (>= 25 %), "
                       f"at beta = {_num(params, 'algorithm.kl_coef'):g}. It is one forward of the batch with no "
                       "backward, so it should cost well under the update: a larger trainer.micro_batch_size "
                       f"(now {params.get('trainer.micro_batch_size', '?')}) speeds it; beta = 0 removes it.", "03")
    return None


@rule
def reference_removable(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    beta = _num(params, "algorithm.kl_coef")
    kl = _col(steps, "kl/mean")
    if beta > 0 and len(kl) and kl.abs().mean() < 1e-3 and _error_share(params, steps) < 0.5:
        ref = phase_shares(steps).get("reference", 0.0)
        return Finding("reference_removable", "info", f"beta = {beta:g} but the KL stays below 1e-3 nats "
                       f"(mean {kl.abs().mean():.2e}): the anchor does almost nothing while the reference forward "
                       f"costs {ref:.0%} of the step. Try algorithm.kl_coef=0 (drops the reference model).", "03")
    return None


@rule
def zero_variance_groups(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    z = _col(steps, "reward/zero_var_group_frac")
    if len(z) and z.mean() >= 0.4 and _error_share(params, steps) < 0.5:  # all-zero from a broken reward: not this
        k = params.get("rollout.samples_per_prompt", "?")
        if params.get("algorithm.group_filter", "none") not in ("none", None, ""):
            fix = (f"The group filter ({params['algorithm.group_filter']}) is already on: it draws up to "
                   f"algorithm.max_sample_rounds = {params.get('algorithm.max_sample_rounds', '?')} rounds, and "
                   "each drawn round costs a rollout; a larger K (now " + str(k) + ") or harder prompts help more.")
        else:
            fix = (f"DAPO's dynamic sampling (algorithm.group_filter=nonzero_std) or a larger K (now {k}) "
                   "fixes it.")
        return Finding("zero_variance_groups", "warn", f"{z.mean():.0%} of groups have zero reward variance "
                       f"(>= 40 %): their advantages are 0, so those samples are wasted compute. {fix}", "13")
    return None


@rule
def length_cap(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    c = _col(steps, "response/clip_ratio")
    if len(c) and c.tail(max(1, len(c) // 4)).mean() >= 0.2:
        shaping = " (the overlong penalty is on)" if _num(params, "algorithm.overlong_buffer") > 0 else \
            " or add the overlong penalty"
        return Finding("length_cap", "warn", f"{c.tail(max(1, len(c) // 4)).mean():.0%} of recent completions hit "
                       f"rollout.max_new_tokens = {params.get('rollout.max_new_tokens', '?')} without EOS (>= 20 %): "
                       f"answers are cut, rewards truncated. Raise the cap{shaping}.", "13")
    return None


@rule
def entropy_collapse(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    e = _col(steps, "actor/entropy")
    if len(e) >= 4 and e.iloc[0] > 0 and e.tail(max(1, len(e) // 4)).mean() < 0.2 * e.iloc[0]:
        high = params.get("algorithm.clip_eps_high")
        fix = ("Clip-higher (algorithm.clip_eps_high=0.28) or a lower lr" if high in (None, "", "None")
               else f"Clip-higher is already on (clip_eps_high = {high}): a lower trainer.lr (now "
                    f"{params.get('trainer.lr', '?')})")
        return Finding("entropy_collapse", "warn", f"Entropy fell from {e.iloc[0]:.3f} to "
                       f"{e.tail(max(1, len(e) // 4)).mean():.3f} nats (< 20 % of its start): the policy stops "
                       f"exploring. {fix}.", "13")
    return None


@rule
def kl_blowup(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    kl = _col(steps, "kl/mean")
    if len(kl) >= 4:
        base = kl.iloc[: max(2, len(kl) // 2)].median()
        last = kl.iloc[-1]
        if last > 1.0 or (base > 0 and last > 10 * base and last > 0.01):
            return Finding("kl_blowup", "warn", f"KL to the reference jumped to {last:.3g} nats (early median "
                           f"{base:.3g}): the policy is leaving the anchor fast. Lower trainer.lr (now "
                           f"{params.get('trainer.lr', '?')}) or raise beta (now "
                           f"{_num(params, 'algorithm.kl_coef'):g}).", "03")
    return None


@rule
def logging_overhead(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    other = phase_shares(steps).get("other", 0.0)
    if other >= 0.15:
        return Finding("logging_overhead", "info", f"{other:.0%} of the step is outside every phase (>= 15 %): "
                       "metrics, logging and bookkeeping. Log less often or batch it.", "07")
    return None


@rule
def clipped_too_much(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    hi, lo = _col(steps, "actor/clipfrac_high"), _col(steps, "actor/clipfrac_low")
    if len(hi) and len(lo) and (hi + lo).mean() > 0.3:
        return Finding("clipped_too_much", "warn", f"{(hi + lo).mean():.0%} of tokens are clipped (> 30 %): "
                       "pi_old is stale or the sampler and trainer disagree.", "10")
    return None


# ------------------------------------------------------------------------------------------------ off-policy rollout


def _staleness(params: dict) -> str:
    k = params.get("rollout.max_staleness")
    return "1 (the default)" if k in (None, "", "None") else str(k)


@rule
def engine_waits_for_trainer(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    idle = _col(steps, "idle/engine")
    if params.get("rollout.mode") == "async" and len(idle) and idle.mean() >= 0.4:
        return Finding("engine_waits_for_trainer", "info", f"The async engine idles {idle.mean():.0%} of each step "
                       "(>= 40 %): training is the longer role, so the overlap already hides all of the rollout. A "
                       f"deeper queue (rollout.max_staleness is {_staleness(params)}) adds staleness, not speed; the "
                       "trainer's cores, or a colocated run on all of them, would.", "19")
    return None


@rule
def trainer_waits_for_engine(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    idle = _col(steps, "idle/trainer")
    mode = params.get("rollout.mode")
    if mode == "async" and len(idle) > 2 and idle.iloc[2:].mean() >= 0.2:  # the queue fills in the first steps
        return Finding("trainer_waits_for_engine", "warn", f"The trainer waits for samples {idle.iloc[2:].mean():.0%}"
                       " of each step (>= 20 %): generation is the bottleneck. A faster or larger engine, or a "
                       f"lower rollout.max_new_tokens (now {params.get('rollout.max_new_tokens', '?')}), shortens "
                       f"the step; a deeper queue (rollout.max_staleness is {_staleness(params)}) helps only if "
                       "rollouts are uneven.", "22c")
    if mode == "separate" and len(idle) and idle.mean() >= 0.2:
        return Finding("trainer_waits_for_engine", "info", f"The trainer waits for samples {idle.mean():.0%} of "
                       "each step (>= 20 %) and the engine waits for the update: rollout.mode=async would overlap "
                       "them, one update stale.", "19")
    return None


@rule
def sampler_disagrees(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
    k3 = _col(steps, "mismatch/kl_k3")
    corrected = params.get("algorithm.behaviour_correction", "none") not in ("none", "", None) or \
        params.get("algorithm.ratio_anchor") == "behaviour"
    if len(k3) and k3.mean() > 1e-3 and not corrected:
        return Finding("sampler_disagrees", "warn", f"The sampler's policy is {k3.mean():.2g} nats/token (k3) from "
                       "the trainer's (> 1e-3) and nothing corrects it: stale samples or another precision bias "
                       "the update. Turn on algorithm.behaviour_correction=tis_token, or "
                       "algorithm.ratio_anchor=behaviour (the clip acts on pi/mu).", "24")
    return None


# ------------------------------------------------------------------------------------------------ the wall-clock


def wall_rule(name: str, part: str, limit: float, severity: str, what: str, advice: Callable[[dict], str]) -> Rule:
    """A rule that fires when `part` of the wall-clock (WALL_PARTS) takes `limit` or more of it."""

    def fn(params: dict, steps: pd.DataFrame, wall: pd.Series | None) -> Finding | None:
        share = _share(wall, part)
        if share >= limit:
            return Finding(name, severity, f"{what} is {share:.0%} of the wall-clock (>= {limit:.0%}): "
                           f"{advice(params)}", "07")
        return None

    fn.__name__ = name
    return rule(fn)


eval_bound = wall_rule(
    "eval_bound", "eval", 0.25, "warn", "Held-out evaluation",
    lambda p: f"logging.eval_every is {p.get('logging.eval_every', '?')} and task.eval_samples "
              f"{p.get('task.eval_samples', '?')} x task.heldout_size {p.get('task.heldout_size', '?')}. Evaluate less "
              "often, or on fewer samples (the held-out set stays paired across runs).")
startup_bound = wall_rule(
    "startup_bound", "startup", 0.25, "info", "Start-up",
    lambda p: "building the models, loading the warm start, opening the run. A short run pays it in full; more "
              f"steps per run (trainer.steps is {p.get('trainer.steps', '?')}) amortise it.")
checkpoint_bound = wall_rule(
    "checkpoint_bound", "checkpoint", 0.15, "info", "Checkpoints and the final save",
    lambda p: f"trainer.checkpoint_every is {p.get('trainer.checkpoint_every', '?')}. Checkpoint less often (a "
              "resume then repeats more steps).")


def diagnose(params: dict, steps: pd.DataFrame, wall: pd.Series | None = None) -> list[Finding]:
    """All findings for one run. `steps`: one row per step, one column per metric; `wall`: `wall_clock(...)`."""
    return [f for r in RULES if (f := r(params, steps, wall)) is not None]
