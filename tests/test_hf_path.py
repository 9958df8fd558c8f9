"""The real Hugging Face path: `model.name_or_path` loads a local directory with AutoModelForCausalLM/AutoTokenizer.

The model is a GPT-2-architecture network the test saves itself (no hub access), so the path is exercised on an
architecture other than the built-in tiny Llama.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from rlcore.controller import run
from rlcore.loading import load_experiment
from rlcore.model import char_tokenizer
from rlcore.tracking import tracking_settings


def save_local_model(path: Path) -> Path:
    tok = char_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "123+456=579"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and len(tok(text)["input_ids"]) == len(text)
    assert again.decode(again(text)["input_ids"]) == text
    assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_rl_runs_on_a_local_hf_model(lab: Path, tmp_path: Path) -> None:
    model_dir = save_local_model(tmp_path / "gpt2-tiny")
    cfg = load_experiment(lab / "rl.yaml", ["model.warm_start=null", f"model.name_or_path={model_dir}",
                                            "trainer.steps=2"])
    res = run(cfg, root=lab)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    r = c.get_run(res.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["model"] == str(model_dir)
    assert len(c.get_metric_history(res.run_id, "actor/loss")) == 2


def test_missing_model_dir_is_a_one_line_error(lab: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--set", "model.warm_start=null",
                           "--set", "model.name_or_path=some-org/not-downloaded"], cwd=lab, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.name_or_path: 'some-org/not-downloaded' is not")
