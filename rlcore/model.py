"""The policy: a tiny Llama built from config with a character tokenizer, or any HF causal LM.

Both paths give the same pair (model, tokenizer) with Hugging Face interfaces, so the rest of rlcore never
knows which one it has. Nothing is fetched from a hub unless `model.allow_download` is set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from rlcore.config import ModelConfig

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# Digits and arithmetic for the default task, plus brackets/letters so tool calls (agentic lessons) fit.
CHARS = list("0123456789+-*=()[] ,.:?") + list("abcdefghijklmnopqrstuvwxyz")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer wrapped as an HF fast tokenizer (save_pretrained/from_pretrained round-trip)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a token
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,  # halves the embedding parameters of a model this small
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).to(_DTYPES[cfg.dtype])


def load_pretrained(path_or_id: str | Path, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load an HF causal LM and its tokenizer from a local directory, a named local source (rlcore.sources,
    converted once and cached) or (only if allowed) the hub."""
    from rlcore import sources

    local_only = not cfg.allow_download
    if str(path_or_id) in sources.SOURCES:
        path_or_id = sources.resolve(str(path_or_id))
    local = Path(path_or_id).expanduser()
    if local_only and not local.is_dir():
        raise FileNotFoundError(
            f"model.name_or_path: {path_or_id!r} is not a local directory (set model.allow_download=true to fetch it)"
        )
    src = str(local) if local.is_dir() else str(path_or_id)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=local_only, dtype=_DTYPES[cfg.dtype])
    if tokenizer.pad_token_id is None:  # many base models ship without a pad token; reuse EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def build_policy(cfg: ModelConfig, warm_start_dir: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The model RL starts from: an HF model, a cached warm start, or a fresh tiny model; with `model.lora`, wrapped
    with fresh adapters (B = 0, so the policy starts as the base model exactly)."""
    if cfg.name_or_path is not None:
        model, tokenizer = load_pretrained(cfg.name_or_path, cfg)
    elif warm_start_dir is not None:
        model, tokenizer = load_pretrained(warm_start_dir, cfg.model_copy(update={"allow_download": False}))
    else:
        tokenizer = char_tokenizer()
        model = tiny_model(cfg, tokenizer)
    return (with_lora(model, cfg) if cfg.lora is not None else model), tokenizer


def with_lora(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """peft's LoRA on `cfg.lora.target_modules`; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    from rlcore.config import ConfigError

    lc = cfg.lora
    names = {n for n, _ in model.named_modules()}
    for t in lc.target_modules:  # peft matches a target by the end of a module's dotted name
        if not any(n == t or n.endswith("." + t) for n in names):
            linear = sorted({n.rsplit(".", 1)[-1] for n, x in model.named_modules() if isinstance(x, torch.nn.Linear)})
            raise ConfigError(f"model.lora.target_modules: {t!r} is not a layer of this model (its linear layers: "
                              f"{', '.join(linear)})")
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights an update changes: every entry of the state dict, or with LoRA only the adapters' (what
    checkpoints and weight-sync carry)."""
    state = model.state_dict()
    if not is_lora(model):
        return state
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}
