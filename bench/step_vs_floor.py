"""Our GRPO step vs a plain-PyTorch floor doing the same work, timed alternately in one process.

The floor is what a person would write by hand with no framework: HF `generate` (KV cache, sampling) -> reward ->
reference forward -> policy forward/backward (GRPO loss + k3 KL) -> AdamW. Both sides start from the same weights
and sample the same batch shape (8 prompts x 8 samples, completions <= 8 tokens). rlcore's step is the controller's
own `step()`, metrics and MLflow logging (to a throwaway store) included.

    python bench/step_vs_floor.py [--steps 30] [--warmup 5]

Prints the median ratio rlcore/floor with its interquartile range, and rlcore's per-phase breakdown.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlcore.config import ExperimentConfig  # noqa: E402
from rlcore.controller import build_for, step  # noqa: E402
from rlcore.rollout import encode_prompts, positions  # noqa: E402
from rlcore.tasks import AdditionTask  # noqa: E402
from rlcore.timing import PHASES  # noqa: E402
from rlcore.tracking import Tracker  # noqa: E402


class Floor:
    """The hand-written baseline: same model weights, same work, no framework."""

    def __init__(self, policy, tokenizer, beta: float, lr: float, k: int, max_new: int):
        self.policy = copy.deepcopy(policy).train()
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=lr)
        self.tok, self.beta, self.k, self.max_new = tokenizer, beta, k, max_new

    def step(self, problems) -> None:
        tok = self.tok
        ids, mask = encode_prompts(tok, [p.prompt for p in problems])
        ids, mask = ids.repeat_interleave(self.k, 0), mask.repeat_interleave(self.k, 0)  # [B, P]
        P = ids.shape[1]
        with torch.no_grad():
            seq = self.policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=self.max_new,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_k=0)
        resp = seq[:, P:]  # [B, T]
        is_eos = resp == tok.eos_token_id
        resp_mask = ((is_eos.cumsum(-1) - is_eos.long()) == 0).float()  # up to and including the first EOS
        texts = tok.batch_decode(resp, skip_special_tokens=True)
        rewards = torch.tensor([float(t == p.answer) for t, p in zip(texts, [p for p in problems for _ in range(self.k)],
                                                                      strict=True)])
        groups = rewards.view(-1, self.k)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).view(-1, 1)  # [B, 1]
        attn = torch.cat([mask, resp_mask.long()], 1)
        pos = positions(attn)

        def logp_of(model):
            logits = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, P - 1 : -1].float()
            return F.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)  # [B, T]

        with torch.no_grad():
            ref_logp = logp_of(self.ref)
        logp = logp_of(self.policy)
        ratio = (logp - logp.detach()).exp()
        kl = (ref_logp - logp).exp() - 1 - (ref_logp - logp)
        loss = ((-adv * ratio + self.beta * kl) * resp_mask).sum() / resp_mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--warm-start", default=None, help="directory of a saved policy (default: fresh tiny model)")
    args = ap.parse_args()

    cfg = ExperimentConfig.model_validate({
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 8, "max_new_tokens": 8},
        "model": {"name_or_path": args.warm_start},
        "logging": {"experiment": "bench"},
    })
    tmp = Path(tempfile.mkdtemp(prefix="rlcore-bench-"))
    (tmp / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\n")
    torch.manual_seed(0)
    loop = build_for(cfg, tmp)
    floor = Floor(loop.trainer.unwrapped, loop.tokenizer, cfg.algorithm.kl_coef, cfg.trainer.lr, 8, 8)
    tracker = Tracker("bench", tmp)
    tracker.start("step-vs-floor", {}, {}, "")
    stream = AdditionTask(cfg.task).stream(0)

    ours, base, phases = [], [], {p: [] for p in PHASES}
    for i in range(args.warmup + args.steps):
        problems = [next(stream) for _ in range(8)]
        order = ("ours", "floor") if i % 2 == 0 else ("floor", "ours")  # alternate so drift hits both equally
        for who in order:
            t0 = time.perf_counter()
            if who == "ours":
                _, metrics = step(loop, problems)
                tracker.log(i, metrics)
            else:
                floor.step(problems)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                (ours if who == "ours" else base).append(dt)
                if who == "ours":
                    for p in PHASES:
                        phases[p].append(metrics[f"timing/{p}"])
    tracker.finish()

    ratios = sorted(a / b for a, b in zip(ours, base, strict=True))
    q = statistics.quantiles(ratios, n=4)
    print(f"steps timed: {args.steps} (after {args.warmup} warm-up), torch threads: {torch.get_num_threads()}")
    print(f"rlcore step  median {statistics.median(ours) * 1e3:7.1f} ms")
    print(f"floor step   median {statistics.median(base) * 1e3:7.1f} ms")
    print(f"ratio rlcore/floor: median {statistics.median(ratios):.3f}  IQR [{q[0]:.3f}, {q[2]:.3f}]  "
          f"min {ratios[0]:.3f}  max {ratios[-1]:.3f}")
    total = statistics.median(ours)
    print("rlcore per-phase median (ms, share of the step):")
    for p in PHASES:
        m = statistics.median(phases[p])
        print(f"  {p:12s} {m * 1e3:7.1f}  {m / total:6.1%}")
    other = total - sum(statistics.median(phases[p]) for p in PHASES)
    print(f"  {'other':12s} {other * 1e3:7.1f}  {other / total:6.1%}  (metrics, logging call)")


if __name__ == "__main__":
    main()
