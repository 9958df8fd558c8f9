"""Two processes (accelerate launch, gloo on CPU) give the same losses and final weights as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlcore.tracking import tracking_settings

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(lab: Path, name: str, processes: int, *overrides: str, file: str = "rl.yaml",
           run_id_after: str = "MLflow run id:") -> str:
    args = ["-m", "rlcore.cli", "run", file, "--set", "logging.experiment=test-mp", "--set", f"logging.run_name={name}"]
    if file == "rl.yaml":
        args += ["--set", "trainer.steps=3"]
    for o in overrides:
        args += ["--set", o]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        # `--cpu --num_processes 2` silently starts ONE process in accelerate 1.15; --multi_gpu starts 2 on gloo.
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=lab, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split(run_id_after)[1].split()[0].rstrip("):")


def history(c: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_processes_match_one_process(lab: Path) -> None:
    # a warm-up: Accelerate's prepared scheduler would step once per process (N times as fast); rlcore's is not prepared
    one, two = launch(lab, "one-process", 1, "trainer.warmup_steps=3"), launch(lab, "two-processes", 2, "trainer.warmup_steps=3")
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    r1, r2 = c.get_run(one), c.get_run(two)
    assert r1.data.tags["world_size"] == "1"
    assert r2.data.tags["world_size"] == "2"  # the launcher really started two processes
    assert len(c.search_runs([r2.info.experiment_id], "tags.mlflow.runName LIKE '%process%'")) == 2  # rank 0 only
    for key in ("actor/loss", "actor/pg_loss", "kl/mean", "reward/mean", "actor/grad_norm", "response/length_mean",
                "actor/lr"):
        h1 = [m.value for m in sorted(c.get_metric_history(one, key), key=lambda m: m.step)]
        h2 = [m.value for m in sorted(c.get_metric_history(two, key), key=lambda m: m.step)]
        assert len(h1) == len(h2) == 3, key
        assert torch.allclose(torch.tensor(h1), torch.tensor(h2), rtol=1e-4, atol=1e-6), (key, h1, h2)
    w1 = load_file(lab / "outputs" / one / "policy" / "model.safetensors")
    w2 = load_file(lab / "outputs" / two / "policy" / "model.safetensors")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    start = load_file(next((lab / ".rlcore_cache" / "warm_start").iterdir()) / "model.safetensors")
    assert any(not torch.equal(start[k], w1[k]) for k in w1)  # the comparison is over weights that moved


def test_ppo_critic_two_processes_match_one_process(lab: Path) -> None:
    """The critic is a second DDP model: its value loss and GAE's global whitening agree across process splits."""
    # minibatches stay 1: each process splits its own rows into minibatches (as verl does), so a global minibatch
    # depends on the split; epochs and micro-batches do not.
    ppo = ("algorithm.advantage=gae", "algorithm.ppo_epochs=2", "trainer.micro_batch_size=4")
    one, two = launch(lab, "ppo-one", 1, *ppo), launch(lab, "ppo-two", 2, *ppo)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_run(two).data.tags["world_size"] == "2"
    for key in ("actor/loss", "critic/value_loss", "critic/explained_var", "critic/grad_norm"):
        h1, h2 = history(c, one, key), history(c, two, key)
        assert len(h1) == len(h2) == 3, key
        assert torch.allclose(torch.tensor(h1), torch.tensor(h2), rtol=1e-4, atol=1e-6), (key, h1, h2)


def test_async_engines_two_processes_match_one_process(lab: Path) -> None:
    """rollout.mode async under accelerate: each trainer process has its own engine process sampling its share of
    the prompts one step ahead; the numbers are those of one trainer with one engine."""
    mode = ("rollout.mode=async", "rollout.max_staleness=1")
    one, two = launch(lab, "async-one", 1, *mode), launch(lab, "async-two", 2, *mode)
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_run(two).data.tags["world_size"] == "2"
    assert history(c, two, "rollout/staleness") == [0.0, 1.0, 1.0]
    for key in ("actor/loss", "reward/mean", "kl/mean", "mismatch/kl_k3"):
        h1, h2 = history(c, one, key), history(c, two, key)
        assert len(h1) == len(h2) == 3, key
        assert torch.allclose(torch.tensor(h1), torch.tensor(h2), rtol=1e-4, atol=1e-6), (key, h1, h2)


def test_dynamic_sampling_runs_in_lock_step_on_two_processes(lab: Path) -> None:
    """Each process filters its own groups; they agree on the number of rounds, so no collective hangs."""
    two = launch(lab, "dapo-two", 2, "algorithm.group_filter=nonzero_std", "algorithm.max_sample_rounds=3")
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    assert c.get_run(two).data.tags["world_size"] == "2"
    rounds = history(c, two, "rollout/rounds")
    assert len(rounds) == 3 and all(1 <= r <= 3 for r in rounds)


def test_reward_model_process_model_and_dpo_trainers_two_processes_match_one_process(lab: Path) -> None:
    """Each process scores a share of every batch of pairs (an odd batch splits unevenly); the loss is divided by the
    whole batch's pair count, so the all-reduced gradients are the whole batch's. The warm-up schedule advances once
    per step, not once per process."""
    from tests.conftest import dedent

    (lab / "mp_prefs.yaml").write_text(dedent(f"""
        kind: preferences
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16, eval_samples: 0}}
        rollout: {{max_new_tokens: 4}}
        preferences: {{prompts: 24, samples_per_prompt: 4, skip_ties: true}}
        logging: {{experiment: test-mp}}
    """))
    common = f"""
        model: {{warm_start: {lab / 'sft.yaml'}}}
        task: {{min_digits: 1, max_digits: 1, heldout_size: 16, eval_samples: 0}}
        rollout: {{max_new_tokens: 4}}
        trainer: {{lr: 1.0e-3, warmup_steps: 2}}
        logging: {{experiment: test-mp, eval_every: 100}}
    """
    (lab / "mp_rm.yaml").write_text("kind: reward_model\nreward_model: {pairs: mp_prefs.yaml, epochs: 1, batch_size: "
                                    "5, heldout_frac: 0.25}\n" + dedent(common))
    (lab / "mp_prm.yaml").write_text("kind: reward_model\nreward_model: {type: process, prompts: 24, samples_per_prompt: "
                                     "2, epochs: 1, batch_size: 5, heldout_frac: 0.25}\n" + dedent(common))
    (lab / "mp_dpo.yaml").write_text("kind: dpo\ndpo: {pairs: mp_prefs.yaml, epochs: 1, batch_size: 5}\n" + dedent(common))
    c = MlflowClient(tracking_settings(lab)["tracking_uri"])
    subprocess.run([sys.executable, "-m", "rlcore.cli", "run", "mp_prefs.yaml"], cwd=lab, check=True, timeout=300,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # built once, before the race
    for file, keys in (("mp_rm.yaml", ("rm/loss", "rm/accuracy", "rm/heldout_accuracy", "rm/heldout_margin")),
                       ("mp_prm.yaml", ("prm/loss", "prm/accuracy", "prm/heldout_step_accuracy")),
                       ("mp_dpo.yaml", ("dpo/loss", "rewards/margins", "rewards/accuracies", "actor/lr",
                                        "eval/greedy_accuracy"))):
        after = "MLflow run " if file != "mp_dpo.yaml" else "MLflow run id:"
        one = launch(lab, f"{file}-one", 1, file=file, run_id_after=after)
        two = launch(lab, f"{file}-two", 2, file=file, run_id_after=after)
        assert c.get_run(one).data.tags["world_size"] == "1" and c.get_run(two).data.tags["world_size"] == "2"
        for key in keys:
            h1, h2 = history(c, one, key), history(c, two, key)
            assert len(h1) == len(h2) >= 2, (file, key)
            assert torch.allclose(torch.tensor(h1), torch.tensor(h2), rtol=1e-4, atol=1e-6), (file, key, h1, h2)
        assert len(set(history(c, one, keys[0]))) > 1  # the loss moved: the comparison is over a real training run
