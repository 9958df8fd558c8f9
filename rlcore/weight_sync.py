"""Weight-sync: keep the rollout engine's weights equal to the policy's after every update.

With `rollout.engine: shared` the engine samples from the policy module itself and sync is a no-op. With
`separate` it holds its own copy (as an inference server such as vLLM does) and every update is pushed to it;
the copy is what `timing/sync` measures and what lesson 24 (trainer/sampler mismatch) is about.
"""

from __future__ import annotations

import copy

import torch


class WeightSync:
    def __init__(self, mode: str, policy: torch.nn.Module):
        self.mode = mode
        self.engine_model = copy.deepcopy(policy).eval() if mode == "separate" else policy
        if mode == "separate":
            self.engine_model.requires_grad_(False)

    @torch.no_grad()
    def push(self, policy: torch.nn.Module) -> int:
        """Copy the policy's weights into the engine; returns the bytes moved (0 when shared)."""
        if self.mode == "shared":
            return 0
        moved = 0
        for dst, src in zip(self.engine_model.state_dict().values(), policy.state_dict().values(), strict=True):
            dst.copy_(src)
            moved += src.numel() * src.element_size()
        return moved
