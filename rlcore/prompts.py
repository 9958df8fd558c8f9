"""Prompts: how a problem's question becomes the token ids the model is conditioned on.

`prompt.template` makes the user message from the question; `prompt.system` and `prompt.examples` (worked
exchanges) come before it; with `model.use_chat_template` they are system/user/assistant turns of the tokenizer's
chat template, without it plain text separated by blank lines (BOS first where the tokenizer has one). A prompt over
`prompt.max_tokens` is an error or is cut to its last max_tokens tokens and counted: never cut silently.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlcore.config import ConfigError, PromptConfig, RunFailed


class PromptTooLong(RunFailed):
    """A training prompt over prompt.max_tokens with overflow: error (the run stops FAILED with this message)."""


class PromptFormat:
    def __init__(self, cfg: PromptConfig, chat: bool = False):
        self.cfg, self.chat = cfg, chat
        self.truncated = 0  # prompts cut to max_tokens since the last `take_truncated`

    def messages(self, question: str) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        for ex in self.cfg.examples:
            out += [{"role": "user", "content": self.user(ex["question"])},
                    {"role": "assistant", "content": ex["answer"]}]
        return out + [{"role": "user", "content": self.user(question)}]

    def user(self, question: str) -> str:
        return self.cfg.template.replace("{question}", question)

    def text(self, question: str) -> str:
        """The plain-text prompt (no chat template)."""
        parts = [self.cfg.system] if self.cfg.system else []
        parts += [self.user(ex["question"]) + ex["answer"] for ex in self.cfg.examples]
        return "\n\n".join([*parts, self.user(question)])

    def ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
        """Token ids of the prompt for `question`, checked against max_tokens."""
        if self.chat:
            row = list(tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])
        else:
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            row = bos + tokenizer(self.text(question), add_special_tokens=False)["input_ids"]
        limit = self.cfg.max_tokens
        if limit is not None and len(row) > limit:
            if self.cfg.overflow == "error":
                raise PromptTooLong(f"prompt.max_tokens: a prompt has {len(row)} tokens, over the limit of {limit} "
                                    f"(question starts {question[:60]!r}); raise it or set prompt.overflow: truncate")
            self.truncated += 1
            row = row[-limit:]  # the end holds the question and the generation prompt
        return row

    def check(self, tokenizer: PreTrainedTokenizerBase, questions: list[str], what: str) -> int:
        """The longest prompt among `questions` in tokens; with overflow: error one over the limit is a ConfigError
        (called on the held-out set before the run starts)."""
        try:
            longest = max(len(self.ids(tokenizer, q)) for q in questions)
        except PromptTooLong as e:
            raise ConfigError(f"{e} [{what}]") from None
        self.truncated = 0
        return longest

    def take_truncated(self) -> int:
        n, self.truncated = self.truncated, 0
        return n
