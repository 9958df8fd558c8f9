"""Rollout: masks with EOS and padding, KV-cache sampling agrees with a full forward, partition independence."""

from __future__ import annotations

import torch

from rlcore.batch import Problem
from rlcore.config import ModelConfig, TaskConfig, TinyModelConfig
from rlcore.model import char_tokenizer, tiny_model
from rlcore.rollout import RolloutEngine, Sampling, encode_prompts, token_logprobs, top_p_filter
from rlcore.tasks import AdditionTask


def setup(seed: int = 0):
    torch.manual_seed(seed)
    tok = char_tokenizer()
    model = tiny_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64)), tok)
    problems = [Problem("1+2=", "3"), Problem("123+456=", "579"), Problem("9+99=", "108"), Problem("5+5=", "10")]
    return tok, model, problems


def test_prompts_are_left_padded() -> None:
    tok, _, problems = setup()
    ids, mask = encode_prompts(tok, [p.prompt for p in problems])
    assert ids.shape == mask.shape == (4, 9)  # <bos> + "123+456="
    assert mask[0].tolist() == [0] * 4 + [1] * 5
    assert ids[0, :4].tolist() == [tok.pad_token_id] * 4 and ids[0, 4] == tok.bos_token_id


def test_masks_with_eos_and_padding() -> None:
    tok, model, problems = setup()
    engine = RolloutEngine(model, tok, seed=0)
    b = engine.generate(problems * 16, 4, Sampling(8, temperature=2.0))
    resp, m = b.responses, b.response_mask
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert b.finished.any() and (~b.finished).any()  # both kinds of rows are covered
    for i in range(len(b)):
        row = resp[i].tolist()
        if b.finished[i]:
            end = row.index(eos)
            assert m[i, : end + 1].tolist() == [1.0] * (end + 1)  # EOS itself is trained on
            assert m[i, end + 1 :].sum() == 0 and all(t == pad for t in row[end + 1 :])
            # special tokens the model chose stay in the text (a `<pad>` mid-answer is not the answer)
            assert b.completions[i] == tok.decode(row[:end], skip_special_tokens=False)
        else:
            assert eos not in row and m[i].sum() == m.shape[1]
    P = b.prompt_len
    assert torch.equal(b.attention_mask[:, P:], m.long())
    assert b.group.tolist() == [i // 4 for i in range(len(b))]


def test_sampler_logprobs_match_a_full_forward() -> None:
    """KV-cached decoding with left padding gives the same log-probs as one forward of the whole sequence."""
    tok, model, problems = setup()
    b = RolloutEngine(model, tok, seed=1).generate(problems * 4, 2, Sampling(6, temperature=1.0))
    with torch.no_grad():
        logp, ent = token_logprobs(model, b, with_entropy=True)
    m = b.response_mask.bool()
    assert torch.allclose(logp[m], b.sampler_logp[m], atol=1e-4)
    assert bool((ent[m] > 0).all())


def test_sampling_does_not_depend_on_the_process_split() -> None:
    tok, model, problems = setup()
    whole = RolloutEngine(model, tok, seed=5).generate(problems, 3, Sampling(5))
    parts = [RolloutEngine(model, tok, seed=5).generate(problems, 3, Sampling(5), rows=slice(a, a + 2))
             for a in (0, 2)]
    T = min(whole.responses.shape[1], *(p.responses.shape[1] for p in parts))
    joined = torch.cat([p.responses[:, :T] for p in parts])
    assert torch.equal(joined, whole.responses[:, :T])
    assert torch.cat([p.group for p in parts]).tolist() == whole.group.tolist()


def test_greedy_is_deterministic_and_top_p_keeps_the_head() -> None:
    tok, model, problems = setup()
    e = RolloutEngine(model, tok, seed=0)
    a = e.generate(problems, 1, Sampling(5, greedy=True)).responses
    assert torch.equal(a, e.generate(problems, 1, Sampling(5, greedy=True)).responses)
    p = top_p_filter(torch.tensor([[0.5, 0.3, 0.15, 0.05]]), 0.7)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_heldout_is_excluded_from_training_stream() -> None:
    task = AdditionTask(TaskConfig(min_digits=1, max_digits=1, heldout_size=30))
    held = {p.prompt for p in task.heldout}
    stream = task.stream(0)
    seen = {next(stream).prompt for _ in range(2000)}
    assert len(held) == 30 and not (held & seen) and len(seen) == 100 - 30
    assert AdditionTask.verify("579", "579", finished=True) == 1.0
    assert AdditionTask.verify("579", "579", finished=False) == 0.0
    assert AdditionTask.verify("57", "579", finished=True) == 0.0
