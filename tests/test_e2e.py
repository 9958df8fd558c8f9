"""End to end: a few-step run lands in MLflow FINISHED with every metric; failures are FAILED; runs repeat exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlcore.controller import run
from rlcore.loading import load_experiment
from rlcore.metrics import BY_NAME
from rlcore.tracking import tracking_settings

STEP_KEYS = [
    "reward/mean", "reward/std", "reward/zero_var_group_frac", "kl/mean", "actor/entropy", "actor/clipfrac_low",
    "actor/clipfrac_high", "actor/grad_norm", "actor/lr", "actor/loss", "response/length_mean", "response/length_max",
    "response/clip_ratio", "timing/rollout", "timing/reward", "timing/reference", "timing/old_logprob",
    "timing/advantage", "timing/update", "timing/sync", "timing/step", "perf/tokens_per_s", "perf/peak_mem_mb",
]


def client_for(root: Path) -> MlflowClient:
    return MlflowClient(tracking_settings(root)["tracking_uri"])


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_few_step_run_is_finished_with_all_metrics(lab: Path) -> None:
    cfg = load_experiment(lab / "rl.yaml", ["rollout.engine=separate"])
    res = run(cfg, root=lab)
    c = client_for(lab)
    r = c.get_run(res.run_id)
    assert r.info.status == "FINISHED"
    for key in STEP_KEYS:
        assert [s for s, _ in history(c, res.run_id, key)] == [1, 2, 3], key
    assert [s for s, _ in history(c, res.run_id, "eval/greedy_accuracy")] == [0, 2, 3]
    assert all(k in BY_NAME for k in r.data.metrics)
    assert r.data.params["algorithm.clip_eps"] == "0.2" and r.data.params["rollout.engine"] == "separate"
    assert r.data.tags["algorithm"] == "grpo" and r.data.tags["world_size"] == "1" and r.data.tags["git_commit"]
    assert c.get_metric_history(res.run_id, "timing/sync")[0].value > 0  # separate engine: a real copy is timed
    artifacts = {a.path for a in c.list_artifacts(res.run_id)}
    assert {"config.yaml", "samples"} <= artifacts
    assert {a.path for a in c.list_artifacts(res.run_id, "samples")} == {"samples/step_000001.json",
                                                                           "samples/step_000002.json"}
    assert (res.output_dir / "model.safetensors").is_file()


def test_same_config_and_seed_give_identical_metrics(lab: Path) -> None:
    cfg = load_experiment(lab / "rl.yaml")
    a, b = run(cfg, root=lab), run(cfg, root=lab)
    c = client_for(lab)
    keys = [k for k in c.get_run(a.run_id).data.metrics if not k.startswith(("timing/", "perf/"))]
    assert "actor/loss" in keys and "reward/mean" in keys
    for k in keys:
        assert history(c, a.run_id, k) == history(c, b.run_id, k), k
    from safetensors.torch import load_file

    sa, sb = load_file(a.output_dir / "model.safetensors"), load_file(b.output_dir / "model.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_learning_moves_the_weights(lab: Path) -> None:
    """The update really trains: weights change and the grad norm is non-zero."""
    from safetensors.torch import load_file

    from rlcore.sft import warm_start_dir

    cfg = load_experiment(lab / "rl.yaml")
    res = run(cfg, root=lab)
    start = load_file(warm_start_dir(cfg, lab) / "model.safetensors")
    end = load_file(res.output_dir / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    c = client_for(lab)
    assert all(v > 0 for _, v in history(c, res.run_id, "actor/grad_norm"))


def test_failed_run_is_marked_failed(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rlcore.controller as controller

    def boom(*a, **k):
        raise RuntimeError("reward server exploded")

    monkeypatch.setattr(controller.Scorer, "score", boom)
    cfg = load_experiment(lab / "rl.yaml", ["logging.run_name=doomed"])
    with pytest.raises(RuntimeError, match="reward server exploded"):
        run(cfg, root=lab)
    c = client_for(lab)
    exp = c.get_experiment_by_name("test-rl")
    runs = c.search_runs([exp.experiment_id], "attributes.run_name = 'doomed'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def test_cli_run_prints_run_id_and_store(lab: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--set", "trainer.steps=1"],
                          cwd=lab, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MLflow run id:" in proc.stdout and f"sqlite:///{lab}" in proc.stdout
    run_id = proc.stdout.split("MLflow run id:")[1].split()[0]
    assert client_for(lab).get_run(run_id).info.status == "FINISHED"


def test_sigterm_closes_the_run_as_killed(lab: Path) -> None:
    """A run stopped by SIGTERM (a scheduler, `kill`) is KILLED in MLflow with its logged steps, not left RUNNING."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--set", "trainer.steps=500",
                             "--set", "logging.run_name=to-be-killed"], cwd=lab, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    c = client_for(lab)
    deadline = time.time() + 120
    run_id = None
    while time.time() < deadline and run_id is None:
        time.sleep(0.5)
        exp = c.get_experiment_by_name("test-rl")
        runs = c.search_runs([exp.experiment_id], "attributes.run_name = 'to-be-killed'") if exp else []
        if runs and c.get_metric_history(runs[0].info.run_id, "reward/mean"):
            run_id = runs[0].info.run_id
    assert run_id is not None, "the run never logged a step"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert c.get_run(run_id).info.status == "KILLED"
    assert len(c.get_metric_history(run_id, "reward/mean")) >= 1


def test_seeds_give_one_run_each_with_a_shared_group(lab: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--seeds", "3,4", "--set",
                           "trainer.steps=1", "--set", "logging.experiment=test-seeds"], cwd=lab, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = client_for(lab)
    runs = c.search_runs([c.get_experiment_by_name("test-seeds").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["3", "4"]
    assert len({r.data.tags["rlcore.group"] for r in runs}) == 1 and all(r.info.status == "FINISHED" for r in runs)
    # Named from the config, not by MLflow's generator (which draws from the seeded `random` and repeats itself).
    names = sorted(r.info.run_name for r in runs)
    assert names[0].startswith("grpo-s3-") and names[1].startswith("grpo-s4-") and names[0][-6:] == names[1][-6:]
    bad = subprocess.run([sys.executable, "-m", "rlcore.cli", "run", "rl.yaml", "--seeds", "1,x"], cwd=lab,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seeds: expected comma-separated integers" in bad.stderr


@pytest.mark.parametrize("overrides", [
    ["algorithm.advantage=reinforce_pp", "algorithm.kl_placement=reward", "algorithm.kl_estimator=k1"],
    ["algorithm.advantage=rloo", "algorithm.policy_loss=gspo", "algorithm.clip_eps=0.0003"],
    ["algorithm.advantage=reinforce", "algorithm.policy_loss=pg", "algorithm.kl_coef=0"],
    ["algorithm.clip_eps_high=0.28", "algorithm.dual_clip=3", "algorithm.minibatches=2", "algorithm.ppo_epochs=2",
     "algorithm.overlong_buffer=2"],
    ["algorithm.advantage=gae", "algorithm.ppo_epochs=2", "algorithm.minibatches=2", "algorithm.lam=0.9"],
    ["algorithm.group_filter=nonzero_std", "algorithm.max_sample_rounds=3", "algorithm.clip_eps_high=0.28"],
    ["task.tool=calculator", "rollout.max_new_tokens=12", "rollout.temperature=3.0"],
])
def test_every_axis_trains_end_to_end(lab: Path, overrides: list[str]) -> None:
    """Each registry entry runs in the real loop: finite loss, weights move (TRL's smoke test, per preset)."""
    cfg = load_experiment(lab / "rl.yaml", ["trainer.steps=2", "logging.num_samples=0", *overrides])
    res = run(cfg, root=lab)
    c = client_for(lab)
    losses = [v for _, v in history(c, res.run_id, "actor/loss")]
    assert len(losses) == 2 and all(abs(v) < 1e6 for v in losses)
    if cfg.algorithm.kl_coef == 0:
        assert all(v == 0 for _, v in history(c, res.run_id, "timing/reference"))  # beta = 0: no reference forward
        assert not history(c, res.run_id, "kl/mean")
    if cfg.algorithm.kl_placement == "reward" or cfg.algorithm.ppo_epochs > 1:
        assert all(v > 0 for _, v in history(c, res.run_id, "timing/old_logprob"))
    if cfg.algorithm.advantage == "gae":
        assert all(v > 0 for _, v in history(c, res.run_id, "timing/values"))
        assert len(history(c, res.run_id, "critic/value_loss")) == 2
        assert len(history(c, res.run_id, "critic/explained_var")) == 2
    if cfg.algorithm.group_filter != "none":
        rounds = [v for _, v in history(c, res.run_id, "rollout/rounds")]
        kept = [v for _, v in history(c, res.run_id, "rollout/kept_group_frac")]
        filler = [v for _, v in history(c, res.run_id, "rollout/filler_groups")]
        assert len(rounds) == 2 and all(1 <= r <= 3 for r in rounds) and all(0 <= f <= 1 for f in kept)
        # the batch is full of informative groups unless the cap forced fillers
        zero_var = [v for _, v in history(c, res.run_id, "reward/zero_var_group_frac")]
        assert all(z * 8 <= f + 1e-9 for z, f in zip(zero_var, filler, strict=True))
    if cfg.task.tool != "none":
        calls = [v for _, v in history(c, res.run_id, "response/tool_call_frac")]
        assert len(calls) == 2 and all(0 <= v <= 1 for v in calls)
