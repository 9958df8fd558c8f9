"""The warm start's loss: plain causal-LM cross-entropy, or with label smoothing, computed by hand here."""

from __future__ import annotations

import torch

from rlcore.batch import Problem
from rlcore.config import ModelConfig
from rlcore.model import build_policy
from rlcore.sft import _encode, sft_loss


def _batch():
    torch.manual_seed(0)
    model, tok = build_policy(ModelConfig(tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2}))
    ids, mask, labels = _encode(tok, [Problem("12+5=", "17"), Problem("3+4=", "7")])
    return model, ids, mask, labels


def test_unsmoothed_loss_is_hugging_faces() -> None:
    model, ids, mask, labels = _batch()
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ours = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert torch.equal(hf, ours)  # bit for bit: warm starts without smoothing (sft_plain.yaml) rebuild identically


def test_label_smoothing_by_hand() -> None:
    model, ids, mask, labels = _batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = logits[:, :-1].log_softmax(-1)  # [B, L-1, V]
    y = labels[:, 1:]  # [B, L-1]
    keep = y != -100
    nll = -logp.gather(-1, y.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)[keep]  # [N] target NLL
    uniform = -logp.mean(-1)[keep]  # [N] NLL averaged over the vocabulary
    eps = 0.1
    expected = ((1 - eps) * nll + eps * uniform).mean()
    assert torch.allclose(sft_loss(logits, labels, eps), expected, atol=1e-6)
    assert keep.sum() == 3 + 2  # "17<eos>" and "7<eos>": only the completions are targets
