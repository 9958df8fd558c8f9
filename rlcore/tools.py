"""Tools for agentic multi-turn rollouts (lesson 08): the environment's side of a tool call.

A tool turn, inside one completion: the model writes `[12+345]`; on the closing bracket the rollout engine stops
sampling that row, asks the tool, and appends its answer `(357)` as *forced* tokens; then the model continues,
e.g. `357<eos>`. The forced tokens are in the context (attention sees them) but carry response_mask = 0, so the
loss, the KL and the entropy never count them: the policy is not trained to predict what the environment says.
"""

from __future__ import annotations

import re


class Calculator:
    """Evaluates `a+b`, `a-b`, `a*b` over non-negative integers (no eval(): a regex and int arithmetic)."""

    open, close = "[", "]"
    _expr = re.compile(r"^\s*(\d{1,12})\s*([+\-*])\s*(\d{1,12})\s*$")

    def respond(self, call: str) -> str:
        """The tool's output for the text between `[` and `]`; `(?)` when it cannot parse it."""
        m = self._expr.match(call)
        if m is None:
            return "(?)"
        a, op, b = int(m[1]), m[2], int(m[3])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"({value})"

    @staticmethod
    def final_answer(completion: str, used_tool: bool) -> str:
        """What the grader reads: the text after the last tool output (all of it when no tool was called)."""
        return completion.rsplit(")", 1)[-1] if used_tool else completion

    def trace(self, prompt: str, answer: str) -> tuple[str, str, str]:
        """A supervised tool-use trace for the warm start: (call, tool output, answer); the prompt is `A+B=`."""
        call = f"{self.open}{prompt.rstrip('=')}{self.close}"
        return call, self.respond(prompt.rstrip("=")), answer


TOOLS: dict[str, type[Calculator]] = {"calculator": Calculator}


def make_tool(name: str) -> Calculator | None:
    return None if name == "none" else TOOLS[name]()
