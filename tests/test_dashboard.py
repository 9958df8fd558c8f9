"""The dashboard against a store filled by real short runs: every page in AppTest (what it shows), the data layer
against the official MLflow client, the findings rules, and the launcher's sandbox."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from rlcore.config import ConfigError
from rlcore.controller import run
from rlcore.loading import load_experiment
from rlcore.tracking import tracking_settings
from tests.conftest import write_course, write_lab

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")

LESSON = """\
---
id: "11"
title: GRPO — drop the critic
part: II
force: estimator
question: What replaces the critic?
experiments: [rl.yaml]
metrics: [reward/mean, kl/mean]
look_for: the reward rises
---
The group mean replaces the critic: $A_i = (r_i - \\bar r) / \\sigma$.
"""

# A lesson with a plan: two variants x two seeds, a source line and a folded answer.
VARIANT_LESSON = """\
---
id: "12"
title: Variants of beta
part: II
force: estimator
question: Does beta matter?
experiments: [rl.yaml]
overrides: [trainer.steps=3, logging.eval_every=3, logging.num_samples=0]
variants: [[algorithm.kl_coef=0], [algorithm.kl_coef=0.2]]
seeds: [0, 1]
metrics: [reward/mean, adv/abs_mean]
---
## Where rlcore does it

<!-- source: rlcore.algorithm.adv_grpo -->

## Questions

<details><summary>What does beta = 0 remove?</summary>

The reference model and its forward pass.

</details>
"""


@pytest.fixture(scope="module")
def dash(lab: Path, tmp_path_factory) -> Path:
    """A lab with: two GRPO seeds (one group), an RLOO run, a rollout-bound run, a sweep, a lesson, and a lesson
    whose plan (2 variants x 2 seeds) was run the way `rlcore lesson 12` runs it, plus a run of an older plan."""
    root = write_course(tmp_path_factory.mktemp("dash"), {"11-grpo.md": LESSON, "12-variants.md": VARIANT_LESSON})
    shutil.copytree(lab / ".rlcore_cache" / "warm_start", root / ".rlcore_cache" / "warm_start")
    from rlcore.lessons import parse, planned_runs

    for f, overrides in planned_runs(parse(root / "lessons" / "12-variants.md")):
        run(load_experiment(root / "experiments" / f, overrides), root=root)
    # Tagged with lesson 12 but of a config its plan no longer has: not one of its runs.
    run(load_experiment(root / "experiments" / "rl.yaml", ["trainer.steps=3", "logging.eval_every=3",
                                                         "logging.num_samples=0", "algorithm.kl_coef=0.5",
                                                         "logging.tags.lesson='12'", "logging.tags.variant='old'"]),
        root=root)
    base = ["trainer.steps=4", "logging.eval_every=2", "logging.samples_every=2"]
    for seed in (0, 1):
        run(load_experiment(root / "rl.yaml", [*base, f"seed={seed}", "logging.run_name=grpo"]), root=root)
    run(load_experiment(root / "rl.yaml", [*base, "algorithm.name=rloo", "algorithm.advantage=rloo",
                                          "logging.run_name=rloo"]), root=root)
    # Long generations and a cheap update: the rollout phase dominates the step.
    run(load_experiment(root / "rl.yaml", ["trainer.steps=3", "rollout.max_new_tokens=24", "algorithm.kl_coef=0",
                                          "rollout.temperature=5.0", "algorithm.name=bound",
                                          "rollout.samples_per_prompt=16", "trainer.micro_batch_size=128", "logging.run_name=rollout-bound",
                                          "logging.experiment=bound", "logging.num_samples=0"]), root=root)
    return root


def app(dash: Path, monkeypatch: pytest.MonkeyPatch, page: str | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(dash)
    at = AppTest.from_file(APP, default_timeout=60).run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def frame(at, has: str) -> pd.DataFrame:
    """The shown dataframe that has `has` as a column or index label (AppTest keeps no dataframe keys)."""
    for d in at.dataframe:
        v = d.value
        if has in v.columns or has in v.index:
            return v
    raise AssertionError(f"no dataframe with {has!r}: {[list(d.value.columns) for d in at.dataframe]}")


def test_bulk_reader_matches_the_official_client(dash: Path) -> None:
    from dashboard.data import Store

    store = Store.for_project(dash)
    runs = store.runs()
    client = MlflowClient(tracking_settings(dash)["tracking_uri"])
    ids = list(runs["run_id"])
    assert len(ids) >= 3
    h = store.history(ids[:2], ["reward/mean", "eval/sampled_reward"], max_points=10_000)
    for rid in ids[:2]:
        for key in ("reward/mean", "eval/sampled_reward"):
            official = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
            ours = sorted(h[(h.run_id == rid) & (h.key == key)][["step", "value"]].itertuples(index=False, name=None))
            assert ours == official
    for r in runs.itertuples():
        assert r.status == client.get_run(r.run_id).info.status


def test_downsampling_keeps_last_value_and_band() -> None:
    from dashboard.data import downsample

    raw = pd.DataFrame({"run_id": "a", "key": "m", "step": range(1000), "value": [float(i % 7) for i in range(1000)],
                        "timestamp": range(1000)})
    d = downsample(raw, 50)
    assert len(d) <= 50 and d["step"].max() == 999 and d.iloc[-1]["value"] == 999 % 7
    assert (d["vmin"] <= d["value"]).all() and (d["value"] <= d["vmax"]).all() and d["vmax"].max() == 6


def test_runs_page_shows_charts_and_config_diff(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(dash, monkeypatch)
    assert at.title[0].value == "Runs"
    assert len(at.get("vega_lite_chart")) >= 2  # one chart per default metric that exists
    diff = frame(at, "logging.run_name")  # the two newest runs differ at least in their names
    assert "trainer.lr" not in diff.index  # identical in every run: not listed


def test_algorithms_page_groups_seeds_of_one_config_and_compares_at_a_common_step(
        dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default groups are configs that differ only by seed (n shown); values are taken at the step every run
    reached (the 3-step lesson runs and the 4-step runs meet at step 3), checked against the official client."""
    at = app(dash, monkeypatch, "algorithms")
    table = frame(at, "group").set_index("group")
    c = MlflowClient(tracking_settings(dash)["tracking_uri"])
    finished = [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])
                if r.info.status == "FINISHED" and r.data.tags.get("rlcore.kind") == "rl"]
    seeds = [r for r in finished if r.info.run_name == "grpo"]
    assert len(seeds) == 2 and len({r.data.tags["rlcore.group"] for r in seeds}) == 1
    label = f"grpo · {seeds[0].data.tags['rlcore.group']}"
    assert table.loc[label, "n"] == 2
    assert sum(table["n"]) == len(finished)
    assert any("Common step per metric: eval/sampled_reward 3, eval/greedy_accuracy 3, reward/mean 3" in x.value
               for x in at.caption)
    at3 = [next(m.value for m in c.get_metric_history(r.info.run_id, "reward/mean") if m.step == 3) for r in seeds]
    mean, std = pd.Series(at3).mean(), pd.Series(at3).std()
    assert table.loc[label, "reward/mean"] == f"{mean:.3f} ± {std:.3f}"
    assert not at.warning  # every default group is one config
    assert len(at.get("vega_lite_chart")) >= 3
    # grouping by one key mixes configs: the page says which keys differ
    at.selectbox[0].set_value("algorithm.name").run()
    assert any("Group **name=grpo** mixes configs" in w.value and "`algorithm.kl_coef`" in w.value for w in at.warning)


def test_compare_groups_modes() -> None:
    """At the common step (the shorter run's last), best over the whole run, and the area under the curve / steps."""
    from dashboard.data import common_steps, group_table, per_run_values

    def compare_groups(h: pd.DataFrame, groups: pd.Series, metrics: list[str], mode: str):  # as the page does it
        common = common_steps(h.groupby(["run_id", "key"], as_index=False)["step"].max())
        return group_table(per_run_values(h, metrics, mode, common), groups, metrics), common

    h = pd.concat([pd.DataFrame({"run_id": "a", "key": "m", "step": range(11), "value": [float(i) for i in range(11)]}),
                   pd.DataFrame({"run_id": "b", "key": "m", "step": range(6), "value": [2.0] * 6})])
    h["vmin"] = h["vmax"] = h["value"]
    groups = pd.Series({"a": "A", "b": "B"})
    at, common = compare_groups(h, groups, ["m"], "at")
    assert common == {"m": 5} and list(at["_m"]) == [5.0, 2.0]  # not a's last value (10) at a later step
    best, _ = compare_groups(h, groups, ["m"], "best")
    assert list(best["_m"]) == [10.0, 2.0]
    auc, _ = compare_groups(h, groups, ["m"], "auc")
    assert list(auc["_m"]) == [2.5, 2.0]  # mean of 0..5 under the trapezoid rule


def test_merge_ticks_keeps_runs_a_filter_hides() -> None:
    from dashboard.data import merge_ticks

    assert merge_ticks(["a", "b"], ["b", "c"], {"c"}) == ["a", "c"]  # a hidden: kept; b unticked; c ticked
    assert merge_ticks([], ["b", "c"], {"c", "b"}) == ["b", "c"]


def test_tokens_axis_counts_every_raw_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """x = tokens is the cumulative count over every logged step (it was computed after downsampling to 400 points,
    which undercounted a 1,000-step run by ~60 %, and dropped step 0)."""
    from mlflow.entities import Metric

    from dashboard.data import Store

    write_lab(tmp_path)
    c = MlflowClient(tracking_settings(tmp_path)["tracking_uri"])
    run = c.create_run(c.create_experiment("long"), tags={"rlcore.kind": "rl"}, run_name="long").info.run_id
    ms = [Metric(k, v, 1000 + s, s) for s in range(1, 1001)
          for k, v in (("perf/tokens_per_s", 100.0 + s % 7), ("timing/step", 0.5), ("reward/mean", s / 1000))]
    ms.append(Metric("reward/mean", 0.0, 1000, 0))
    for i in range(0, len(ms), 1000):
        c.log_batch(run, metrics=ms[i : i + 1000])
    c.set_terminated(run)
    want = sum(round((100.0 + s % 7) * 0.5) for s in range(1, 1001))
    tok = Store.for_project(tmp_path).tokens([run])
    assert tok.iloc[0].tolist() == [run, 0, 0.0] and tok["tokens"].iloc[-1] == want
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"runs": run, "m": "reward/mean", "x": "tokens"})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    (chart,) = at.get("vega_lite_chart")
    data = chart_data(chart)
    cum = dict(zip(tok["step"], tok["tokens"], strict=True))
    assert data["tokens"].max() == want  # the old way (after downsampling) gave about 40 % of this
    assert all(t == cum[s] for s, t in zip(data["step"], data["tokens"], strict=True))  # every point at its own count


def test_bottlenecks_page_shows_phases_and_findings(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard.data import Store

    runs = Store.for_project(dash).runs()
    bound = runs[runs["name"] == "rollout-bound"]["run_id"].iloc[0]
    monkeypatch.chdir(dash)
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["selected_runs"] = [bound]
    at.run()
    at.switch_page("views/bottlenecks.py").run()
    assert not at.exception
    assert len(at.get("vega_lite_chart")) >= 1
    summary = frame(at, "rollout %")
    assert summary["rollout %"].iloc[0] >= 50 and summary["s/step"].gt(0).all()
    assert any("rollout_bound" in w.value and "lesson 28 (not written yet)" in w.value for w in at.warning)
    assert not any("](/lessons?lesson=28)" in w.value for w in at.warning)  # no link to a lesson that is not there
    # the wall-clock split: parts measured by the run itself, adding up to its logged total
    wall = frame(at, "share of wall-clock")
    c = MlflowClient(tracking_settings(dash)["tracking_uri"])
    total = c.get_run(bound).data.metrics["timing/total"]
    assert wall.loc["total", "seconds"] == pytest.approx(total, abs=0.06)
    evals = [m.value for m in c.get_metric_history(bound, "timing/eval")]
    assert len(evals) >= 2 and wall.loc["eval", "seconds"] == pytest.approx(sum(evals), abs=0.06)  # step 0 and later
    startup = c.get_run(bound).data.metrics["timing/startup"]
    assert startup > 0 and wall.loc["startup", "seconds"] == pytest.approx(startup, abs=0.06)
    steps = sum(m.value for m in c.get_metric_history(bound, "timing/step"))
    assert wall.loc["steps", "seconds"] == pytest.approx(steps, abs=0.06)
    parts = wall.loc[["startup", "steps", "eval", "checkpoint", "other"], "seconds"].sum()
    assert parts == pytest.approx(total, abs=0.3)


def test_findings_rules_fire_on_built_cases() -> None:
    from dashboard.findings import diagnose, wall_clock

    steps = pd.DataFrame({"timing/step": [1.0] * 8, "timing/rollout": [0.7] * 8, "timing/update": [0.2] * 8,
                          "reward/zero_var_group_frac": [0.6] * 8, "kl/mean": [1e-5] * 8,
                          "actor/entropy": [1.0, 0.9, 0.5, 0.3, 0.1, 0.1, 0.1, 0.1]})
    rules = {f.rule: f for f in diagnose({"algorithm.kl_coef": "0.04"}, steps)}
    assert {"rollout_bound", "zero_variance_groups", "reference_removable", "entropy_collapse"} <= set(rules)
    assert rules["rollout_bound"].lesson == "28" and "70%" in rules["rollout_bound"].message
    assert "group_filter=nonzero_std" in rules["zero_variance_groups"].message
    assert "clip_eps_high=0.28" in rules["entropy_collapse"].message
    # advice reads the config: nothing already on is suggested again
    on = {f.rule: f for f in diagnose({"algorithm.kl_coef": "0.04", "algorithm.group_filter": "nonzero_std",
                                        "algorithm.clip_eps_high": "0.28", "trainer.lr": "1e-4"}, steps)}
    assert "already on" in on["zero_variance_groups"].message
    assert "group_filter=nonzero_std" not in on["zero_variance_groups"].message
    assert "clip_eps_high=0.28" not in on["entropy_collapse"].message and "1e-4" in on["entropy_collapse"].message
    healthy = pd.DataFrame({"timing/step": [1.0] * 4, "timing/update": [0.45] * 4, "timing/rollout": [0.45] * 4,
                            "kl/mean": [0.01] * 4})
    assert diagnose({"algorithm.kl_coef": "0.04"}, healthy) == []
    update = healthy.assign(**{"timing/update": [0.8] * 4, "timing/rollout": [0.15] * 4})
    f = {f.rule: f for f in diagnose({"algorithm.ppo_epochs": "4", "trainer.micro_batch_size": "32"}, update)}
    assert "update_bound" in f and "ppo_epochs = 4" in f["update_bound"].message and "is 32" in f["update_bound"].message
    ref = healthy.assign(**{"timing/reference": [0.3] * 4, "timing/rollout": [0.2] * 4, "timing/update": [0.45] * 4})
    assert [x.rule for x in diagnose({"algorithm.kl_coef": "0.04"}, ref)] == ["reference_bound"]
    # wall-clock rules: a run whose evaluation took 40 % of its time
    wall = wall_clock({"timing/startup": 2.0, "timing/step": 4.0, "timing/eval": 4.0, "timing/total": 10.0})
    assert wall["other"] == 0 and wall["total"] == 10
    f = {x.rule: x for x in diagnose({"logging.eval_every": "5", "task.eval_samples": "4"}, healthy, wall)}
    assert set(f) == {"eval_bound"} and "40%" in f["eval_bound"].message and "eval_every is 5" in f["eval_bound"].message


def test_findings_for_an_engine_of_its_own() -> None:
    """An async run whose engine idles (training-bound), one whose trainer waits (generation-bound, after the queue
    fills), a separate run that would overlap, and a stale sampler left uncorrected, each named with its lesson."""
    from dashboard.findings import diagnose

    base = {"timing/step": [1.0] * 6, "timing/update": [0.45] * 6, "timing/rollout": [0.45] * 6}
    async_ = {"rollout.mode": "async", "rollout.max_staleness": "2", "rollout.max_new_tokens": "8"}
    idle_engine = pd.DataFrame({**base, "idle/engine": [0.6] * 6, "idle/trainer": [0.01] * 6})
    f = {x.rule: x for x in diagnose(async_, idle_engine)}
    assert set(f) == {"engine_waits_for_trainer"} and "60%" in f["engine_waits_for_trainer"].message
    assert "max_staleness is 2" in f["engine_waits_for_trainer"].message and f["engine_waits_for_trainer"].lesson == "19"
    waits = pd.DataFrame({**base, "idle/engine": [0.0] * 6, "idle/trainer": [0.9, 0.9, 0.3, 0.3, 0.3, 0.3]})
    f = {x.rule: x for x in diagnose(async_, waits)}
    assert set(f) == {"trainer_waits_for_engine"} and "30%" in f["trainer_waits_for_engine"].message  # steps 3-6
    assert f["trainer_waits_for_engine"].lesson == "22c"
    f = {x.rule: x for x in diagnose({"rollout.mode": "separate"}, waits)}
    assert "rollout.mode=async" in f["trainer_waits_for_engine"].message
    stale = pd.DataFrame({**base, "mismatch/kl_k3": [0.02] * 6})
    assert [x.rule for x in diagnose({"algorithm.behaviour_correction": "none"}, stale)] == ["sampler_disagrees"]
    assert diagnose({"algorithm.behaviour_correction": "tis_token"}, stale) == []
    assert diagnose({"algorithm.ratio_anchor": "behaviour"}, stale) == []


def test_samples_page_shows_completions(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from dashboard.data import Store

    runs = Store.for_project(dash).runs()
    monkeypatch.chdir(dash)
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["selected_runs"] = [runs[runs["name"] == "grpo"]["run_id"].iloc[0]]
    at.run()
    at.switch_page("views/samples.py").run()
    assert not at.exception
    t = frame(at, "completion")
    assert {"prompt", "completion", "reward"} <= set(t.columns) and len(t) > 0
    # every logged step, sorted by reward, then only the rewarded ones
    at.multiselect[0].set_value([]).run()
    at.selectbox[1].set_value("reward, low first").run()
    t = frame(at, "completion")
    assert t["reward"].is_monotonic_increasing and set(t["step"]) == {1, 2, 4}
    if t["reward"].max() > t["reward"].min():
        at.slider[0].set_value((0.5, float(t["reward"].max()))).run()
        assert frame(at, "completion")["reward"].min() >= 0.5


def test_samples_compare_two_runs_on_the_prompts_they_share(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPO seed 0 and RLOO (seed 0) draw the same training prompts: at step 4 their completions line up prompt by
    prompt; two steps of one run share none, and the page says why."""
    from streamlit.testing.v1 import AppTest

    from dashboard.data import Store

    store = Store.for_project(dash)
    runs = store.runs()
    grpo = runs[(runs["name"] == "grpo") & (runs["seed"] == "0")]["run_id"].iloc[0]
    rloo = runs[runs["name"] == "rloo"]["run_id"].iloc[0]
    monkeypatch.chdir(dash)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = grpo
    at.switch_page("views/samples.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("share no prompt" in i.value for i in at.info)  # step 4 vs step 1 of one run
    at.radio[0].set_value("another run at the same step").run()
    at.selectbox(key="cmp_run").set_value(rloo).run()
    both = frame(at, "reward (other)")
    mine, other = store.samples(grpo)[4], store.samples(rloo)[4]
    assert set(both["prompt"]) == set(mine["prompt"]) & set(other["prompt"]) and len(both) > 0
    first = both.iloc[0]
    assert first["Δ reward"] == pytest.approx(first["reward (other)"] - first["reward"])


def test_run_page_manages_a_run_through_mlflow(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rename, note, tag, delete and restore from the Run page: MLflow's own client sees each change."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard.data import Store

    runs = Store.for_project(dash).runs()
    rid = runs[runs["name"] == "rloo"]["run_id"].iloc[0]
    c = MlflowClient(tracking_settings(dash)["tracking_uri"])
    monkeypatch.chdir(dash)
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = rid
    at.switch_page("views/run.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("rl" in c_.value and rid in c_.value for c_ in at.caption)
    cfg = next(x.value for x in at.code if x.language == "yaml")
    assert "advantage: rloo" in cfg  # the run's resolved config, from its artifact
    try:
        at.text_input[0].set_value("rloo-renamed")
        at.text_area[0].set_value("baseline for the **RLOO** comparison")
        at.text_input[1].set_value("reviewed=yes")
        at.button[0].click().run()  # the form's Save
        assert not at.exception, [e.message for e in at.exception]
        r = c.get_run(rid)
        assert r.info.run_name == "rloo-renamed" and r.data.tags["reviewed"] == "yes"
        assert r.data.tags["mlflow.note.content"] == "baseline for the **RLOO** comparison"
        assert frame(at, "tag").set_index("tag").loc["reviewed", "value"] == "yes"  # the page re-read the store
        next(t for t in at.text_input if t.label.startswith("To delete this run")).input("rloo-renamed").run()
        next(b for b in at.button if b.label == "Delete run").click().run()
        assert c.get_run(rid).info.lifecycle_stage == "deleted"
        assert rid not in set(Store.for_project(dash).runs()["run_id"])
        assert any("Deleted run **rloo-renamed**" in s.value for s in at.success)  # says what went
        next(b for b in at.button if b.label == "Undo: restore rloo-renamed").click().run()
        assert c.get_run(rid).info.lifecycle_stage == "active"
    finally:
        c.restore_run(rid) if c.get_run(rid).info.lifecycle_stage == "deleted" else None
        c.update_run(rid, name="rloo")
        c.delete_tag(rid, "reviewed") if "reviewed" in c.get_run(rid).data.tags else None
        c.set_tag(rid, "mlflow.note.content", "")
        st.cache_data.clear()


def test_lessons_page_renders_text_control_and_runs(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(dash, monkeypatch, "lessons")
    assert any("11 · GRPO" in h.value for h in at.header)
    assert any("group mean replaces the critic" in m.value for m in at.markdown)
    before = frame(at, "advantage")
    at.slider(key="c11_right").set_value(2).run()
    after = frame(at, "advantage")
    assert not before.equals(after)  # the control recomputes with rlcore's GRPO estimator
    assert len(at.get("vega_lite_chart")) >= 1  # the paired experiment's runs


def chart_data(chart) -> pd.DataFrame:
    import pyarrow as pa

    raw = chart.proto.datasets[0].data.data if chart.proto.datasets else chart.proto.data.data
    return pa.ipc.open_stream(raw).read_all().to_pandas()


def test_lessons_page_prefers_the_lessons_runs_labels_variants_and_bands_seeds(dash: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The lesson's own runs (found by the config of its plan) are charted first, one line per variant labelled by
    what differs, the mean over its seeds with a band; other runs of the experiment are a separate, labelled group;
    a run of an older plan is neither; the metric table, the source and the folded answer are shown; the button
    starts the lesson's plan."""
    from dashboard import launcher

    at = app(dash, monkeypatch, "lessons")
    at.button(key="goto-12").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("12 · Variants of beta" in h.value for h in at.header)
    caption = next(c.value for c in at.caption if c.value.startswith("This lesson's runs"))
    assert "This lesson's runs: 4, 2 line(s): kl_coef=0 (2 seeds); kl_coef=0.2 (2 seeds)" in caption
    assert any("Other runs of the same experiments" in e.label for e in at.expander)
    charts = [c for c in at.get("vega_lite_chart") if '"variant"' in c.proto.spec]
    assert len(charts) == 2  # one per metric of the front matter
    data = chart_data(charts[0])
    assert set(data["variant"]) == {"kl_coef=0", "kl_coef=0.2"}
    assert (data["hi"] > data["lo"]).any()  # two seeds of one variant: a band of nonzero width
    spec = json.loads(charts[0].proto.spec)
    assert any(layer.get("mark", {}).get("type") == "area" for layer in spec.get("layer", []))
    assert spec["title"]["subtitle"][0].startswith("reward · mean of sequence rewards")  # the catalogue's formula
    table = frame(at, "red flag")
    assert list(table["metric"]) == ["reward/mean", "adv/abs_mean"] and table["healthy"].str.len().min() > 10
    body = " ".join(m.value for m in at.markdown)
    assert "def adv_grpo(batch: RolloutBatch" in body  # read from the code, not copied into the page
    assert "<details><summary>What does beta = 0 remove?</summary>" in body
    at.button(key="run-lesson-12").click().run()
    launch = launcher.all_launches(dash)[0]
    try:
        assert launch.command[-3:] == ["rlcore.cli", "lesson", "12"]
        deadline = time.time() + 120
        while "distinct runs" not in launch.log(dash).read_text() and time.time() < deadline:
            time.sleep(0.5)
        plan = launch.log(dash).read_text()
        assert "4 distinct runs:" in plan and plan.count("algorithm.kl_coef=0.2") == 2, plan[-2000:]
    finally:
        launcher.stop(launch, dash)


def test_lesson_runs_from_an_older_warm_start_are_not_mixed_in(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamlit as st

    c = MlflowClient(tracking_settings(dash)["tracking_uri"])
    exp = c.get_experiment_by_name(load_experiment(dash / "experiments" / "rl.yaml").logging.experiment)
    own = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("lesson") == "12"
           and r.data.tags.get("variant") != "old"]
    oldest = min(own, key=lambda r: r.info.start_time)
    real = oldest.data.tags["warm_start.sha256"]
    c.set_tag(oldest.info.run_id, "warm_start.sha256", "0123456789abcdef")
    try:
        st.cache_data.clear()
        at = app(dash, monkeypatch, "lessons")
        at.button(key="goto-12").click().run()
        assert any("1 older runs started from another warm start" in c.value for c in at.caption)
        assert any(c.value.startswith("This lesson's runs: 3,") for c in at.caption)
    finally:
        c.set_tag(oldest.info.run_id, "warm_start.sha256", real)
        st.cache_data.clear()


def test_sweeps_page_without_a_study_says_so(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(dash, monkeypatch, "sweeps")
    assert any("No sweep has run yet" in i.value for i in at.info)


def test_sweeps_page_draws_a_study(dash: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    from rlcore.sweep import storage_from_spec

    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="lr-beta", storage=storage_from_spec(str(journal), tmp_path),
                                direction="maximize")
    space = {"trainer.lr": FloatDistribution(1e-5, 1e-2, log=True), "algorithm.advantage": CategoricalDistribution(["grpo", "rloo"])}
    for lr, adv, value in [(1e-4, "grpo", 0.40), (3e-4, "rloo", 0.47), (1e-3, "grpo", 0.42)]:
        study.add_trial(optuna.trial.create_trial(params={"trainer.lr": lr, "algorithm.advantage": adv},
                                                  distributions=space, value=value,
                                                  intermediate_values={10: value - 0.1, 20: value - 0.05}))
    study.add_trial(optuna.trial.create_trial(params={"trainer.lr": 5e-3, "algorithm.advantage": "rloo"},
                                              distributions=space, state=TrialState.PRUNED))
    at = app(dash, monkeypatch, "sweeps")
    at.text_input[0].set_value(str(journal)).run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("4 trials" in c.value and "pruned 1" in c.value for c in at.caption)
    trials = frame(at, "param:trainer.lr")
    assert len(trials) == 4 and trials["value"].max() == pytest.approx(0.47)
    # history, intermediate values, importance, parallel coordinates and one slice per parameter
    specs = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    charts = {(t.get("text", "") if isinstance(t := sp.get("title", ""), dict) else t): sp for sp in specs}
    assert len(at.get("vega_lite_chart")) >= 6
    inter = next(v for k, v in charts.items() if k.startswith("Intermediate values"))
    assert inter["encoding"]["color"]["field"] == "state"
    lr = charts["Slice: trainer.lr"]
    assert lr["encoding"]["x"]["scale"]["type"] == "log"  # sampled on a log scale: drawn on one
    assert "scale" not in charts["Slice: algorithm.advantage"]["encoding"]["x"]
    best = next(m for m in at.metric if m.label.startswith("Best trial"))
    assert best.label == "Best trial: #1" and best.value == "0.47"
    assert list(trials["run page"].dropna()) == []  # these trials have no MLflow runs: no links


def test_launch_page_validates_and_refuses_paths_outside_experiments(dash: Path, monkeypatch) -> None:
    from dashboard import launcher

    at = app(dash, monkeypatch, "launch")
    at.text_area(key="overrides").set_value("trainer.steps=-1").run()
    assert any("trainer.steps: must be > 0" in e.value for e in at.error)
    with pytest.raises(ConfigError, match="only YAML files under experiments/"):
        launcher.resolve(dash, "../rl.yaml")
    with pytest.raises(ConfigError, match="only YAML files under experiments/"):
        launcher.resolve(dash, "/etc/passwd")


def test_launch_page_links_a_launch_to_its_run_with_its_step(dash: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started from the Launch page carries `rlcore.launch`; the page finds it by that tag and shows its
    name, a link to its Run page and its step out of trainer.steps."""
    import streamlit as st

    from dashboard import launcher
    from dashboard.data import Store

    runs = Store.for_project(dash).runs()
    rid = runs[runs["name"] == "rloo"]["run_id"].iloc[0]
    record = launcher.Launch("20261130-000000-rl-linked", "rl.yaml", [], 999999, time.time(), ["python", "-m", "x"])
    path = launcher.launches_dir(dash) / f"{record.id}.json"
    path.write_text(json.dumps(record.__dict__))
    (launcher.launches_dir(dash) / f"{record.id}.rc").write_text("0")
    c = MlflowClient(tracking_settings(dash)["tracking_uri"])
    c.set_tag(rid, "rlcore.launch", record.id)
    try:
        st.cache_data.clear()
        at = app(dash, monkeypatch, "launch")
        text = " ".join(m.value for m in at.markdown)
        assert f"[rloo ({rid[:8]})](/run?run={rid}) · FINISHED · step 4/4" in text
        assert any(e.label == f"{record.id} · rl.yaml · finished" for e in at.expander)
    finally:
        c.delete_tag(rid, "rlcore.launch")
        path.unlink()
        st.cache_data.clear()


def test_empty_and_missing_store_give_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_lab(tmp_path)
    for page in (None, "algorithms", "bottlenecks", "samples"):
        at = app(tmp_path, monkeypatch, page)
        assert any("no MLflow store" in i.value or "no runs" in i.value.lower() for i in at.info)


def test_palette_reads_on_the_light_and_the_dark_theme() -> None:
    """Every series colour has >= 3:1 contrast (WCAG 2.1, non-text) on Streamlit's light and dark backgrounds, and
    no two are near-duplicates (the old tableau20 put a blue and a pale blue on runs 1 and 2)."""
    from itertools import combinations

    from dashboard.common import PALETTE

    def rgb(h: str) -> list[float]:
        return [int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)]

    def luminance(h: str) -> float:
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in rgb(h)]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    def contrast(a: str, b: str) -> float:
        hi, lo = sorted([luminance(a), luminance(b)], reverse=True)
        return (hi + 0.05) / (lo + 0.05)

    assert len(PALETTE) >= 10
    for c in PALETTE:
        assert contrast(c, "#ffffff") >= 3 and contrast(c, "#0e1117") >= 3, c
    closest = min(sum((x - y) ** 2 for x, y in zip(rgb(a), rgb(b), strict=True)) ** 0.5
                  for a, b in combinations(PALETTE, 2))
    assert closest > 0.15


def test_lesson_page_charts_dpo_and_reward_model_runs_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Part III pairs DPO and reward-model runs with RL runs: the lesson page finds them by their plan's config like
    RL runs (it charted only `rlcore.kind: rl` before), while a preference data set's run, which logs no curve, is not
    one of its lines."""
    from rlcore.lessons import parse, plan_groups

    root = write_course(tmp_path, {"16-kinds.md": (
        '---\nid: "16"\ntitle: Kinds\npart: III\nforce: signal\nquestion: q?\nexperiments: [rl.yaml]\n'
        "variants: [[algorithm.kl_coef=0], [algorithm.kl_coef=0.2]]\nmetrics: [reward/mean]\n---\nbody\n")})
    groups = list(plan_groups(parse(root / "lessons" / "16-kinds.md"), root))
    c = MlflowClient(tracking_settings(root)["tracking_uri"])
    exp = c.create_experiment("kinds")
    for kind, group in (("dpo", groups[0]), ("reward_model", groups[1]), ("preferences", groups[1])):
        r = c.create_run(exp, tags={"rlcore.kind": kind, "rlcore.group": group, "seed": "0"}, run_name=kind)
        for step in (1, 2, 3):
            c.log_metric(r.info.run_id, "reward/mean", 0.1 * step, step=step)
        c.set_terminated(r.info.run_id, "FINISHED")
    at = app(root, monkeypatch, "lessons")
    caption = next(x.value for x in at.caption if x.value.startswith("This lesson's runs"))
    assert "This lesson's runs: 2, 2 line(s)" in caption
    charts = [x for x in at.get("vega_lite_chart") if '"variant"' in x.proto.spec]
    assert set(chart_data(charts[0])["variant"]) == {"kl_coef=0", "kl_coef=0.2"}


def test_numeric_params_become_numbers_and_other_params_stay_text() -> None:
    """MLflow keeps params as text; the Runs table turns numeric ones into numbers (so they sort as numbers also
    where no column type says so) and leaves the rest alone."""
    from dashboard.data import numeric_columns

    text = pd.DataFrame({"trainer.lr": ["0.0003", "3e-05", "0.001", None], "mode": ["a", "b", "c", "d"]})
    num = numeric_columns(text, ["trainer.lr", "mode"])
    assert list(num.sort_values("trainer.lr")["trainer.lr"].dropna()) == [3e-05, 0.0003, 0.001]  # text: 0.0003 first
    assert num["mode"].tolist() == ["a", "b", "c", "d"]
