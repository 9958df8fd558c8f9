"""Agentic multi-turn: the tool's tokens are context, never trained on; the turn cap holds; SFT traces mask them too."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlcore.batch import Problem, RolloutBatch
from rlcore.config import AlgorithmConfig, ExperimentConfig, RewardConfig
from rlcore.model import char_tokenizer
from rlcore.reward import Scorer
from rlcore.rollout import RolloutEngine, Sampling
from rlcore.sft import _encode
from rlcore.tasks import AdditionTask
from rlcore.tools import Calculator


class Scripted(torch.nn.Module):
    """A fake causal LM that, at response position t of row i, puts all its mass on script[i][t].

    The engine calls it once for the prompt and then once per position (with a KV cache it ignores); positions where
    the tool's tokens are forced still advance the script, so a script reserves placeholders for them.
    """

    def __init__(self, tok, scripts: list[str]):
        super().__init__()
        self.V = len(tok)
        self.ids = [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in scripts]
        self.t = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0):
        if past_key_values is None:
            self.t = 0
        logits = torch.full((input_ids.shape[0], 1, self.V), -30.0)
        for i, ids in enumerate(self.ids):
            logits[i, 0, ids[min(self.t, len(ids) - 1)]] = 30.0
        self.t += 1
        return SimpleNamespace(logits=logits, past_key_values="cache")


def run(scripts: list[str], problems: list[Problem], max_calls: int = 1, mask: bool = True) -> RolloutBatch:
    tok = char_tokenizer()
    engine = RolloutEngine(Scripted(tok, scripts), tok, seed=0, tool=Calculator(), max_tool_calls=max_calls,
                           mask_tool_output=mask)
    return engine.generate(problems, 1, Sampling(24))


def test_tool_tokens_are_context_but_masked_exactly() -> None:
    # Row 0 calls the tool; "....." are the 5 positions where the engine forces "(357)". Row 1 answers directly.
    b = run(["[12+345].....357", "357"], [Problem("12+345=", "357"), Problem("12+345=", "357")])
    assert b.completions == ["[12+345](357)357", "357"]
    assert b.answers == ["357", "357"]
    assert score_rows(b) == [1.0, 1.0]
    P = b.prompt_len
    tool0 = b.tool_mask[0].tolist()
    assert tool0[:8] == [0.0] * 8 and tool0[8:13] == [1.0] * 5 and sum(tool0) == 5  # exactly the span "(357)"
    assert b.response_mask[0, 8:13].sum() == 0  # not in the loss/KL/entropy
    assert b.response_mask[0, :8].sum() == 8 and b.response_mask[0, 13:17].sum() == 4  # "357<eos>" counted
    assert b.attention_mask[0, P + 8 : P + 13].tolist() == [1] * 5  # but in the context
    assert b.tool_mask[1].sum() == 0 and b.response_mask[1].sum() == 4
    assert (b.sampler_logp[0, 8:13] == 0).all()


def test_mask_off_trains_on_the_tool_output_with_the_policys_logprob() -> None:
    # Lesson 08's bug on purpose: the same rollout, but the tool's span "(357)" enters the loss/KL/entropy mask,
    # each token with the log-prob the policy gave it (the script put its mass elsewhere: about -60 nats).
    on = run(["[12+345].....357"], [Problem("12+345=", "357")])
    off = run(["[12+345].....357"], [Problem("12+345=", "357")], mask=False)
    assert off.completions == on.completions and torch.equal(off.tool_mask, on.tool_mask)
    assert off.response_mask[0, 8:13].tolist() == [1.0] * 5 and off.response_mask.sum() == on.response_mask.sum() + 5
    assert (off.sampler_logp[0, 8:13] < -50).all() and torch.equal(off.sampler_logp[0, :8], on.sampler_logp[0, :8])


def test_mask_off_needs_a_tool() -> None:
    import pytest

    from rlcore.config import ConfigError
    from rlcore.loading import validate_model

    with pytest.raises(ConfigError, match="mask_tool_output"):
        validate_model(ExperimentConfig, {"task": {"mask_tool_output": False}}, "experiment")
    cfg = validate_model(ExperimentConfig, {"task": {"tool": "calculator", "mask_tool_output": False}}, "experiment")
    assert cfg.task.mask_tool_output is False


def score_rows(b: RolloutBatch) -> list[float]:
    return Scorer(RewardConfig(), AdditionTask.__new__(AdditionTask)).score(b)[0].tolist()


def test_turn_cap_leaves_later_calls_as_text() -> None:
    b = run(["[1+1]...[2+2]4"], [Problem("1+1=", "2")], max_calls=1)
    assert b.completions == ["[1+1](2)[2+2]4"]  # second `]` got no answer
    assert b.tool_mask.sum() == 3  # "(2)" only
    two = run(["[1+1]...[2+2]...4"], [Problem("1+1=", "2")], max_calls=2)
    assert two.completions == ["[1+1](2)[2+2](4)4"] and two.tool_mask.sum() == 6


def test_bad_call_gets_an_error_token_not_a_crash() -> None:
    assert Calculator().respond("12+") == "(?)" and Calculator().respond("7*6") == "(42)"


def test_tool_span_never_reaches_the_loss() -> None:
    """Advantages, KL and entropy on tool positions are ignored: changing them does not change the loss."""
    from accelerate import Accelerator

    from rlcore.algorithm import AggNorm
    from rlcore.config import ModelConfig, TinyModelConfig
    from rlcore.model import tiny_model
    from rlcore.trainer import Trainer

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        intermediate_size=64)), tok)
    b = run(["[12+345].....357"], [Problem("12+345=", "357")])
    cfg = ExperimentConfig(algorithm=AlgorithmConfig(kl_coef=0.1))
    trainer = Trainer(model, cfg, Accelerator(cpu=True))
    b.ref_logp = torch.zeros_like(b.sampler_logp)
    b.adv = torch.ones_like(b.sampler_logp)
    norm = AggNorm(tokens=float(b.response_mask.sum()), seqs=1.0, max_len=24.0)
    loss, stats = trainer._loss(b, norm)
    b.adv = b.adv + 100.0 * b.tool_mask  # garbage on the tool span only
    b.ref_logp = b.ref_logp - 50.0 * b.tool_mask
    loss2, stats2 = trainer._loss(b, norm)
    assert torch.allclose(loss, loss2) and stats["kl/mean"] == stats2["kl/mean"]
    assert stats["actor/entropy"] == stats2["actor/entropy"]


def test_sft_trace_masks_the_tool_output() -> None:
    tok = char_tokenizer()
    ids, mask, labels = _encode(tok, [Problem("1+2=", "3"), Problem("1+2=", "3")], Calculator(), [True, False])
    text = tok.decode(ids[0][mask[0].bool()].tolist(), skip_special_tokens=True)
    assert text == "1+2=[1+2](3)3"
    targets = tok.decode([t for t in labels[0].tolist() if t != -100], skip_special_tokens=True)
    assert targets == "[1+2]3"  # the call and the answer are learnt; "(3)" is the environment's
    assert tok.decode([t for t in labels[1].tolist() if t != -100], skip_special_tokens=True) == "3"
