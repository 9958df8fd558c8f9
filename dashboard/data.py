"""The dashboard's data layer: MLflow (and Optuna) in, tidy pandas frames out. Pages only draw.

Reading is bulk, never per run x metric: with the embedded SQLite store one SQL query per table (read-only
connection); with a tracking server, one `search_runs` and the server's bulk-interval history route per metric.
Histories are downsampled per run here, keeping each bucket's last value and its min/max band, so a chart never
receives more than `max_points` points per series however long the run was.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rlcore.tracking import project_root, tracking_settings

# Tags the pages filter and group by; read for every run.
RUN_TAGS = ("algorithm", "rlcore.kind", "rlcore.group", "seed", "rlcore.study", "rlcore.trial", "rlcore.trial_state",
            "mlflow.parentRunId", "lesson", "variant", "task", "model", "world_size", "warm_start.sha256",
            "rlcore.launch", "mlflow.note.content", "rlcore.failure")
# Tags rlcore itself writes that are not worth a column; every other tag is the user's and shows in `tags`.
QUIET_TAGS = ("git_commit", "torch_threads", "rlcore.config", "rlcore.config_hash", "rlcore.owner",
              "rlcore.stopped_at_step")
RUN_COLUMNS = ["run_id", "name", "experiment", "status", "start", "end", "duration_s", *RUN_TAGS, "tags"]


# Raw points (summed over the asked runs and keys) above which `history` reads a grid of steps (see there).
GRID_ABOVE = 300_000


class StoreError(RuntimeError):
    """The store cannot be read (missing file, server down); pages show the message instead of a traceback."""


@dataclass
class Store:
    uri: str

    @classmethod
    def for_project(cls, root: Path | None = None) -> Store:
        return cls(tracking_settings(root or project_root())["tracking_uri"])

    # ---------------------------------------------------------------------------------------- sqlite path

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None

    def _sql(self, query: str, params: tuple = ()) -> pd.DataFrame:
        path = self.sqlite_path
        if path is None or not path.is_file():
            raise StoreError(f"no MLflow store at {path} yet: run an experiment first (e.g. `rlcore quickstart`)")
        # Read-only: the dashboard never writes to the store, and cannot lock out a training run.
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            return pd.read_sql_query(query, con, params=params)

    # ---------------------------------------------------------------------------------------- runs

    def runs(self) -> pd.DataFrame:
        """One row per (not deleted) run: id, name, experiment, status, times, and the RUN_TAGS as columns."""
        if self.sqlite_path is None:
            return self._runs_server()
        runs = self._sql(
            "SELECT r.run_uuid AS run_id, r.name, e.name AS experiment, r.status, r.start_time, r.end_time "
            "FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE r.lifecycle_stage = 'active' AND e.lifecycle_stage = 'active'")
        tags = self._sql("SELECT run_uuid AS run_id, key, value FROM tags WHERE key NOT LIKE 'mlflow.%' "
                         "OR key IN ('mlflow.parentRunId', 'mlflow.note.content')")
        return _finish_runs(runs, tags)

    def _runs_server(self) -> pd.DataFrame:
        client = self._client()
        try:
            exps = client.search_experiments()
            found = client.search_runs([e.experiment_id for e in exps], max_results=50000) if exps else []
        except Exception as e:  # noqa: BLE001 - any client/network failure becomes one message on the page
            raise StoreError(f"cannot reach the MLflow server at {self.uri}: {e}") from None
        names = {e.experiment_id: e.name for e in exps}
        runs = pd.DataFrame([{"run_id": r.info.run_id, "name": r.info.run_name, "experiment": names.get(r.info.experiment_id),
                              "status": r.info.status, "start_time": r.info.start_time, "end_time": r.info.end_time}
                             for r in found])
        tags = pd.DataFrame([{"run_id": r.info.run_id, "key": k, "value": v}
                             for r in found for k, v in r.data.tags.items()
                             if k in RUN_TAGS or not k.startswith("mlflow.")],
                            columns=["run_id", "key", "value"])
        return _finish_runs(runs, tags)

    def params(self, run_ids: list[str]) -> pd.DataFrame:
        """Wide frame: one row per run, one column per flattened config key."""
        if not run_ids:
            return pd.DataFrame()
        if self.sqlite_path is None:
            client = self._client()
            rows = [{"run_id": r, **client.get_run(r).data.params} for r in run_ids]
            return pd.DataFrame(rows).set_index("run_id")
        marks = ",".join("?" * len(run_ids))
        long = self._sql(f"SELECT run_uuid AS run_id, key, value FROM params WHERE run_uuid IN ({marks})", tuple(run_ids))
        return long.pivot(index="run_id", columns="key", values="value").reindex(run_ids)

    def metric_keys(self, run_ids: list[str]) -> list[str]:
        if not run_ids:
            return []
        if self.sqlite_path is None:
            client = self._client()
            return sorted({k for r in run_ids for k in client.get_run(r).data.metrics})
        marks = ",".join("?" * len(run_ids))
        return sorted(self._sql(f"SELECT DISTINCT key FROM latest_metrics WHERE run_uuid IN ({marks})",
                                tuple(run_ids))["key"])

    def summary(self, run_ids: list[str], last: list[str], best: list[str], param_keys: list[str]) -> pd.DataFrame:
        """One row per run: the last step seen, each `last` metric's value at its last step (`last:<key>`), each
        `best` metric's maximum (`best:<key>`), and the `param_keys` config values: the run table's columns,
        read in a few bulk queries (no history is loaded)."""
        out = pd.DataFrame(index=pd.Index(run_ids, name="run_id"))
        if not run_ids:
            return out
        if self.sqlite_path is None:
            client = self._client()
            for r in run_ids:
                run = client.get_run(r)
                for k in last:
                    out.loc[r, f"last:{k}"] = run.data.metrics.get(k)
                for k in best:
                    hist = client.get_metric_history(r, k)
                    out.loc[r, f"best:{k}"] = max((m.value for m in hist), default=None)
                for k in param_keys:
                    out.loc[r, k] = run.data.params.get(k)
            return out
        rm = ",".join("?" * len(run_ids))
        lm = self._sql(f"SELECT run_uuid AS run_id, key, value, step FROM latest_metrics WHERE run_uuid IN ({rm})",
                       tuple(run_ids))
        out["steps"] = lm.groupby("run_id")["step"].max()
        for k in last:
            out[f"last:{k}"] = lm[lm["key"] == k].set_index("run_id")["value"]
        for k in best:  # the metrics table's primary key starts with `key`: one index range per metric
            b = self._sql(f"SELECT run_uuid AS run_id, MAX(value) AS v FROM metrics WHERE key = ? "
                          f"AND run_uuid IN ({rm}) GROUP BY run_uuid", (k, *run_ids))
            out[f"best:{k}"] = b.set_index("run_id")["v"]
        if param_keys:
            pk = ",".join("?" * len(param_keys))
            p = self._sql(f"SELECT run_uuid AS run_id, key, value FROM params WHERE key IN ({pk}) AND run_uuid IN ({rm})",
                          (*param_keys, *run_ids))
            for k in param_keys:
                out[k] = p[p["key"] == k].set_index("run_id")["value"]
        return out

    def last_steps(self, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
        """run_id, key, step: the last logged step of each run and key (MLflow's `latest_metrics`: no scan)."""
        if not run_ids or not keys:
            return pd.DataFrame(columns=["run_id", "key", "step"])
        if self.sqlite_path is None:
            h = self._history_server(run_ids, keys)
            return h.groupby(["run_id", "key"], as_index=False)["step"].max()
        rm, km = ",".join("?" * len(run_ids)), ",".join("?" * len(keys))
        return self._sql(f"SELECT run_uuid AS run_id, key, step FROM latest_metrics WHERE key IN ({km}) "
                         f"AND run_uuid IN ({rm})", (*keys, *run_ids))

    def values_at(self, run_ids: list[str], steps: dict[str, int]) -> dict[str, pd.Series]:
        """Per key: run_id -> the run's value at its last logged step at or before `steps[key]`, read exactly
        (through the (run, key, step) index: a few rows per run, however long the runs)."""
        if self.sqlite_path is None:
            h = self._history_server(run_ids, list(steps))
            return per_run_values(h.assign(vmin=h["value"], vmax=h["value"]), list(steps), "at", steps)
        ids = ",".join("(?)" for _ in run_ids)
        out = {}
        for key, step in steps.items():
            # one index seek per run: its last point at or before the step
            at = self._sql(f"WITH ids(run_uuid) AS (VALUES {ids}) SELECT run_uuid AS run_id, (SELECT value FROM metrics "
                           f"{self._run_key_step_index()} WHERE metrics.run_uuid = ids.run_uuid AND key = ? AND step <= ? "
                           "ORDER BY step DESC, timestamp DESC LIMIT 1) AS value FROM ids", (*run_ids, key, step))
            out[key] = at.dropna().set_index("run_id")["value"]
        return out

    def _run_key_step_index(self) -> str:
        """`INDEXED BY` MLflow's (run_uuid, key, step) index where the store has it (SQLite's planner otherwise
        picks the primary key, which starts with `key`, and scans every run's points of that key)."""
        if not hasattr(self, "_rks"):
            names = set(self._sql("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'metrics'")["name"])
            self._rks = "INDEXED BY index_metrics_run_uuid_key_step" if "index_metrics_run_uuid_key_step" in names else ""
        return self._rks

    def extremes(self, run_ids: list[str], keys: list[str]) -> dict[str, pd.Series]:
        """Per key: run_id -> the run's best value over every logged point (max; min for LOWER_IS_BETTER)."""
        if self.sqlite_path is None:
            h = self._history_server(run_ids, keys)
            return per_run_values(h.assign(vmin=h["value"], vmax=h["value"]), keys, "best")
        rm = ",".join("?" * len(run_ids))
        out = {}
        for key in keys:
            agg = "MIN" if key in LOWER_IS_BETTER else "MAX"
            v = self._sql(f"SELECT run_uuid AS run_id, {agg}(value) AS v FROM metrics WHERE key = ? AND run_uuid IN "
                          f"({rm}) GROUP BY run_uuid", (key, *run_ids))
            out[key] = v.set_index("run_id")["v"]
        return out

    def sums(self, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
        """Per (run, key) over every raw logged point (no downsampling): `sum`, `max` and `n`. Wall-clock parts are
        sums over all steps, which a downsampled history would undercount."""
        cols = ["run_id", "key", "sum", "max", "n"]
        if not run_ids or not keys:
            return pd.DataFrame(columns=cols)
        if self.sqlite_path is None:
            raw = self._history_server(run_ids, keys)
            raw = raw.drop_duplicates(["run_id", "key", "step"], keep="last")
            g = raw.groupby(["run_id", "key"])["value"]
            return pd.DataFrame({"sum": g.sum(), "max": g.max(), "n": g.count()}).reset_index()[cols]
        rm, km = ",".join("?" * len(run_ids)), ",".join("?" * len(keys))
        return self._sql(f"SELECT run_uuid AS run_id, key, SUM(value) AS sum, MAX(value) AS max, COUNT(*) AS n "
                         f"FROM metrics WHERE key IN ({km}) AND run_uuid IN ({rm}) GROUP BY run_uuid, key",
                         (*keys, *run_ids))[cols]

    def tokens(self, run_ids: list[str]) -> pd.DataFrame:
        """Cumulative generated tokens per (run, step), from the raw rows (tokens/s x s/step of every step, before
        any downsampling), with step 0 at 0 tokens."""
        if not run_ids:
            return pd.DataFrame(columns=["run_id", "step", "tokens"])
        keys = ["perf/tokens_per_s", "timing/step"]
        if self.sqlite_path is None:
            raw = self._history_server(run_ids, keys)
        else:
            rm = ",".join("?" * len(run_ids))
            raw = self._sql(f"SELECT run_uuid AS run_id, key, step, value, timestamp FROM metrics WHERE key IN (?, ?) "
                            f"AND run_uuid IN ({rm})", (*keys, *run_ids))
        if raw.empty:
            return pd.DataFrame(columns=["run_id", "step", "tokens"])
        raw = raw.sort_values("timestamp").drop_duplicates(["run_id", "key", "step"], keep="last")
        w = raw.pivot_table(index=["run_id", "step"], columns="key", values="value").dropna()
        per_step = (w["perf/tokens_per_s"] * w["timing/step"]).round()  # the step's generated tokens, exact up to rounding
        tok = per_step.groupby(level="run_id").cumsum().rename("tokens").reset_index()
        zero = pd.DataFrame({"run_id": tok["run_id"].unique(), "step": 0, "tokens": 0.0})
        return pd.concat([zero, tok], ignore_index=True).sort_values(["run_id", "step"]).reset_index(drop=True)

    def history(self, run_ids: list[str], keys: list[str], max_points: int = 400,
                grid_above: int | None = None) -> pd.DataFrame:
        """Long frame run_id, key, step, value, vmin, vmax, time_s (seconds since the run's first point), at most
        ~`max_points` points per (run, key).

        Up to `grid_above` (default GRID_ABOVE) raw points in all, every point is read and bucketed (`downsample`: each bucket's last value
        and its min/max band). Above that (many runs of long runs: the cost is turning millions of rows into Python
        objects, not SQLite's scan), a key logged at every step is read on a grid of every k-th step, plus each run's
        last point (from `latest_metrics`), with no band (vmin = vmax = value). A key logged sparsely (held-out
        eval) stays whole."""
        cols = ["run_id", "key", "step", "value", "vmin", "vmax", "time_s"]
        if not run_ids or not keys:
            return pd.DataFrame(columns=cols)
        if self.sqlite_path is None:
            raw = self._history_server(run_ids, keys)
            return downsample(raw, max_points)[cols] if not raw.empty else pd.DataFrame(columns=cols)
        rm, km = ",".join("?" * len(run_ids)), ",".join("?" * len(keys))
        latest = self._sql(f"SELECT run_uuid AS run_id, key, step, value, timestamp FROM latest_metrics "
                           f"WHERE key IN ({km}) AND run_uuid IN ({rm})", (*keys, *run_ids))
        if latest.empty:
            return pd.DataFrame(columns=cols)
        above = GRID_ABOVE if grid_above is None else grid_above
        strides = self._strides(latest, max_points) if (latest["step"] + 1).sum() > above else {}
        full = [k for k in keys if strides.get(k, 1) == 1]
        parts = []
        if full:
            fm = ",".join("?" * len(full))
            raw = self._sql(f"SELECT run_uuid AS run_id, key, step, value, timestamp FROM metrics "
                            f"WHERE key IN ({fm}) AND run_uuid IN ({rm})", (*full, *run_ids))
            if not raw.empty:
                parts.append(downsample(raw, max_points))
        for stride in sorted({v for v in strides.values() if v > 1}):
            ks = [k for k, v in strides.items() if v == stride]
            gm = ",".join("?" * len(ks))
            grid = self._sql(f"SELECT run_uuid AS run_id, key, step, value, timestamp FROM metrics WHERE key IN ({gm}) "
                             f"AND run_uuid IN ({rm}) AND step % {stride} = 0", (*ks, *run_ids))
            grid = pd.concat([grid, latest[latest["key"].isin(ks)]], ignore_index=True)
            grid = grid.sort_values(["run_id", "key", "step", "timestamp"]).drop_duplicates(
                ["run_id", "key", "step"], keep="last")
            parts.append(grid.assign(vmin=grid["value"], vmax=grid["value"]))
        if not parts:
            return pd.DataFrame(columns=cols)
        out = pd.concat(parts, ignore_index=True)
        if "time_s" not in out or out["time_s"].isna().any():  # the grid's rows: seconds since the run's first point
            t0 = out.groupby("run_id")["timestamp"].transform("min")
            fresh = (out["timestamp"] - t0) / 1000.0
            out["time_s"] = out["time_s"].fillna(fresh) if "time_s" in out else fresh
        return out[cols]

    def _strides(self, latest: pd.DataFrame, max_points: int) -> dict[str, int]:
        """Per key, the step stride that leaves about `max_points` points per run: 1 for a key logged sparsely.
        How densely a key is logged is counted on one run (the longest), through the (run, key, step) index."""
        out = {}
        for key, part in latest.groupby("key"):
            longest = part.loc[part["step"].idxmax()]
            n = int(self._sql("SELECT COUNT(*) AS n FROM metrics WHERE run_uuid = ? AND key = ?",
                              (longest["run_id"], key))["n"].iloc[0])
            steps_per_point = (longest["step"] + 1) / max(n, 1)
            out[key] = 1 if n <= max_points else max(1, round(n / max_points * steps_per_point))
        return out

    def _history_server(self, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
        """The server's bulk route: one request per metric for all runs (MLflow's UI uses the same endpoint)."""
        import requests

        rows = []
        base = self.uri.rstrip("/")
        for key in keys:
            for i in range(0, len(run_ids), 100):  # the route takes up to 100 runs per call
                r = requests.get(f"{base}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
                                 params=[("run_ids", x) for x in run_ids[i : i + 100]]
                                 + [("metric_key", key), ("max_results", 2500)], timeout=30)
                if r.status_code != 200:
                    raise StoreError(f"MLflow server {base}: {r.status_code} {r.text[:200]}")
                rows += [{"run_id": m["run_id"], "key": m["key"], "step": int(m.get("step", 0)),
                          "value": float(m["value"]), "timestamp": int(m["timestamp"])}
                         for m in r.json().get("metrics", [])]
        return pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])

    def samples(self, run_id: str) -> dict[int, pd.DataFrame]:
        """The logged completion tables of a run: step -> frame (prompt, completion, answer, reward)."""
        client = self._client()
        try:
            files = client.list_artifacts(run_id, "samples")
        except Exception:  # noqa: BLE001 - a run without artifacts or a missing artifact dir: no samples
            return {}
        out: dict[int, pd.DataFrame] = {}
        for f in files:
            name = Path(f.path).name
            if not (name.startswith("step_") and name.endswith(".json")):
                continue
            local = client.download_artifacts(run_id, f.path)
            table = json.loads(Path(local).read_text())
            out[int(name[5:-5])] = pd.DataFrame(table["data"], columns=table["columns"])
        return dict(sorted(out.items()))

    def artifact_text(self, run_id: str, path: str) -> str:
        return Path(self._client().download_artifacts(run_id, path)).read_text()

    def artifacts(self, run_id: str) -> pd.DataFrame:
        """The run's artifact files (two levels deep), with sizes in KB."""
        client = self._client()
        rows = []
        try:
            for f in client.list_artifacts(run_id):
                for g in client.list_artifacts(run_id, f.path) if f.is_dir else [f]:
                    rows.append({"path": g.path, "KB": round((g.file_size or 0) / 1024, 1) if not g.is_dir else None})
        except Exception:  # noqa: BLE001 - no artifact store for this run
            pass
        return pd.DataFrame(rows, columns=["path", "KB"])

    def deleted_runs(self) -> pd.DataFrame:
        """Soft-deleted runs (MLflow's lifecycle_stage 'deleted'), which Restore brings back."""
        if self.sqlite_path is None:
            from mlflow.entities import ViewType

            client = self._client()
            exps = {e.experiment_id: e.name for e in client.search_experiments()}
            found = client.search_runs(list(exps), run_view_type=ViewType.DELETED_ONLY) if exps else []
            return pd.DataFrame([{"run_id": r.info.run_id, "name": r.info.run_name,
                                  "experiment": exps[r.info.experiment_id]} for r in found],
                                columns=["run_id", "name", "experiment"])
        return self._sql("SELECT r.run_uuid AS run_id, r.name, e.name AS experiment FROM runs r JOIN experiments e "
                         "ON r.experiment_id = e.experiment_id WHERE r.lifecycle_stage = 'deleted'")

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


def numeric_columns(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`columns` of `frame` as numbers where every value there is one (MLflow stores params as text, which sorts
    "0.0003" after "3e-05" and shows a float's 20 digits); a column with any other text is left as it is."""
    out = frame.copy()
    for col in columns:
        if col in out:
            num = pd.to_numeric(out[col], errors="coerce")
            if num.notna().sum() == out[col].notna().sum():
                out[col] = num
    return out


def _finish_runs(runs: pd.DataFrame, tags: pd.DataFrame) -> pd.DataFrame:
    if runs.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    own = tags[tags["key"].isin(RUN_TAGS)]
    wide = own.pivot(index="run_id", columns="key", values="value") if not own.empty else pd.DataFrame()
    runs = runs.merge(wide, left_on="run_id", right_index=True, how="left")
    user = tags[~tags["key"].isin(RUN_TAGS) & ~tags["key"].isin(QUIET_TAGS) & ~tags["key"].str.startswith("mlflow.")]
    user = user.sort_values("key")
    joined = (user["key"] + "=" + user["value"].astype(str)).groupby(user["run_id"]).agg(", ".join)
    runs["tags"] = runs["run_id"].map(joined).fillna("")
    for t in RUN_TAGS:
        if t not in runs:
            runs[t] = None
    # A sweep trial the pruner stopped ends FINISHED in MLflow (it closed cleanly): say PRUNED, as Optuna does
    runs.loc[(runs["status"] == "FINISHED") & (runs["rlcore.trial_state"] == "PRUNED"), "status"] = "PRUNED"
    runs["start"] = pd.to_datetime(runs["start_time"], unit="ms")
    runs["end"] = pd.to_datetime(runs["end_time"], unit="ms")
    now = pd.Timestamp.now()
    runs["duration_s"] = ((runs["end"].fillna(now) - runs["start"]).dt.total_seconds()).round(1)
    return runs.sort_values("start", ascending=False)[RUN_COLUMNS].reset_index(drop=True)


def search(runs: pd.DataFrame, text: str) -> pd.DataFrame:
    """Runs whose id, name, experiment, status or any tag contains `text` (case-insensitive). A run without a
    tag has None/NaN there: read as "" (under pandas 3 `astype(str)` keeps the missing value, and joining it
    raised a TypeError)."""
    if not text:
        return runs
    cols = [c for c in runs.columns if c not in ("start", "end", "duration_s")]
    hay = runs[cols].astype(object).where(runs[cols].notna(), "").astype(str).agg(" ".join, axis=1)
    return runs[hay.str.contains(text, case=False, regex=False)]


def merge_ticks(selected: list[str], shown: list[str], ticked: set[str]) -> list[str]:
    """The selection after the run table's ticks: a selected run the filters hide stays selected; a shown run is
    selected iff ticked. Order: the earlier selection first, newly ticked runs after it in table order."""
    chosen = [r for r in selected if r not in shown or r in ticked]
    return chosen + [r for r in shown if r in ticked and r not in chosen]


def lesson_runs(runs: pd.DataFrame, groups: dict[str, str],
                statuses: tuple[str, ...] = ("FINISHED", "RUNNING")) -> pd.DataFrame:
    """A lesson's own runs: those whose config (the hash of their `rlcore.group`) is in its plan
    (`rlcore.lessons.plan_groups`: group -> line label) with one of `statuses`, in any experiment, the newest run per (group, seed) (the same config and seed give the same numbers:
    a rerun replaces its older copy, it is not another seed), oldest first, with the line label as column `line`."""
    # By the config's hash alone (`rlcore.group` is experiment-HASH, and the hash leaves out logging.*): an identical
    # config logged under another experiment name is the same run, and counts.
    def config_of(g):
        return g.str.rsplit("-", n=1).str[-1]

    by_hash = {k.rsplit("-", 1)[-1]: v for k, v in groups.items()}
    h = config_of(runs["rlcore.group"].fillna(""))
    own = runs.assign(_config=h)[h.isin(by_hash) & runs["status"].isin(statuses)]
    own = own.sort_values("start").drop_duplicates(["_config", "seed"], keep="last")
    return own.assign(line=own["_config"].map(by_hash)).drop(columns="_config")


def downsample(raw: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """Per (run, key): at most max_points buckets over the step range; each keeps its last value and min/max."""
    raw = raw.sort_values(["run_id", "key", "step", "timestamp"])
    raw = raw.drop_duplicates(["run_id", "key", "step"], keep="last")
    t0 = raw.groupby("run_id")["timestamp"].transform("min")
    raw = raw.assign(time_s=(raw["timestamp"] - t0) / 1000.0)
    smin = raw.groupby(["run_id", "key"])["step"].transform("min")
    smax = raw.groupby(["run_id", "key"])["step"].transform("max")
    span = (smax - smin).clip(lower=1)
    raw = raw.assign(bucket=np.floor((raw["step"] - smin) / span * (max_points - 1)).astype(int))
    g = raw.groupby(["run_id", "key", "bucket"], sort=False)
    out = g.agg(step=("step", "last"), value=("value", "last"), vmin=("value", "min"), vmax=("value", "max"),
                time_s=("time_s", "last")).reset_index()
    return out.drop(columns="bucket")


def smooth(frame: pd.DataFrame, weight: float) -> pd.DataFrame:
    """TensorBoard-style exponential moving average of `value` per (run, key); weight 0 = raw."""
    if weight <= 0 or frame.empty:
        return frame
    out = frame.sort_values(["run_id", "key", "step"]).copy()
    out["value"] = out.groupby(["run_id", "key"])["value"].transform(lambda s: s.ewm(alpha=1 - weight).mean())
    return out


def config_diff(params: pd.DataFrame) -> pd.DataFrame:
    """Only the config keys whose values differ between the runs (rows: keys, columns: runs)."""
    if params.empty or len(params) < 2:
        return pd.DataFrame()
    differing = [c for c in params.columns if params[c].astype(str).nunique(dropna=False) > 1]
    return params[differing].T


LOWER_IS_BETTER = ("kl/mean", "kl/k3_mean")


def group_labels(runs: pd.DataFrame, params: pd.DataFrame, by: str | None = None) -> pd.Series:
    """run_id -> group label. `by` None: runs whose configs differ only by the seed (the `rlcore.group` tag the
    trainer writes: experiment-confighash), labelled 'algorithm · group'; else the value of config key `by`."""
    r = runs.set_index("run_id")
    if by is None:
        g = r["rlcore.group"].fillna(pd.Series(r.index, index=r.index))
        return (r["algorithm"].fillna("?").astype(str) + " · " + g.astype(str)).rename("group")
    return ("" + by.rsplit(".", 1)[-1] + "=" + params.reindex(r.index)[by].astype(str)).rename("group")


def mixed_groups(groups: pd.Series, params: pd.DataFrame) -> dict[str, list[str]]:
    """Groups whose runs' configs differ in more than the seed (logging.* names and tags ignored): group -> the
    differing keys."""
    out = {}
    for g, ids in groups.groupby(groups).groups.items():
        p = params.reindex(list(ids))
        differing = [c for c in p.columns if c != "seed" and not c.startswith("logging.")
                     and p[c].astype(str).nunique(dropna=False) > 1]
        if differing:
            out[g] = differing
    return out


def common_steps(last: pd.DataFrame) -> dict[str, int]:
    """Per key, the last step every run reached: the min over runs of each run's last logged step. `last`:
    run_id, key, step (the last step of each run and key)."""
    return {k: int(v) for k, v in last.groupby("key")["step"].min().items()}


def per_run_values(history: pd.DataFrame, metrics: list[str], mode: str,
                   common: dict[str, int] | None = None) -> dict[str, pd.Series]:
    """One number per run and metric, taken the same way for every run. `mode`: "at" = the run's value at the
    common step (its last point at or before it), "best" = its best value over the run (max; min for
    LOWER_IS_BETTER; the buckets' vmin/vmax, exact whatever the downsampling), "auc" = the area under its curve up
    to the common step divided by the steps (trapezoid rule on the points read; a mean that rewards learning early).
    The common step defaults to the last step every run of `history` reached."""
    out: dict[str, pd.Series] = {}
    for key in metrics:
        part = history[history["key"] == key].sort_values(["run_id", "step"])
        if part.empty:
            continue
        stop = (common or {}).get(key, int(part.groupby("run_id")["step"].max().min()))
        upto = part[part["step"] <= stop]
        if mode == "at":
            out[key] = upto.groupby("run_id")["value"].last()
        elif mode == "best":
            low = key in LOWER_IS_BETTER
            out[key] = part.groupby("run_id")["vmin" if low else "vmax"].agg("min" if low else "max")
        else:
            def area(d: pd.DataFrame) -> float:
                x, y = d["step"].to_numpy(float), d["value"].to_numpy(float)
                if len(x) < 2 or x[-1] <= x[0]:
                    return float(y[-1])
                return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))  # trapezoid rule

            out[key] = upto.groupby("run_id")[["step", "value"]].apply(area)
    return out


def group_table(per_run: dict[str, pd.Series], groups: pd.Series, metrics: list[str]) -> pd.DataFrame:
    """One row per group: n and, per metric, mean ± std over the group's runs (string cells), and `_<metric>`
    numeric means to sort by."""
    rows = []
    for g, ids in groups.groupby(groups).groups.items():
        row: dict[str, object] = {"group": g, "n": len(ids)}
        for key in metrics:
            v = per_run.get(key, pd.Series(dtype=float)).reindex(list(ids)).dropna()
            row[key] = ("-" if v.empty else f"{v.mean():.3f}" if len(v) == 1
                        else f"{v.mean():.3f} ± {v.std():.3f}")
            row[f"_{key}"] = v.mean() if len(v) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def band(history: pd.DataFrame, groups: pd.Series) -> pd.DataFrame:
    """Mean and std across the runs of each group, per (key, step). `groups`: run_id -> group label."""
    if history.empty:
        return pd.DataFrame(columns=["group", "key", "step", "mean", "std", "lo", "hi", "n"])
    h = history.assign(group=history["run_id"].map(groups))
    agg = h.groupby(["group", "key", "step"])["value"].agg(["mean", "std", "count"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    agg = agg.rename(columns={"count": "n"})
    agg["lo"], agg["hi"] = agg["mean"] - agg["std"], agg["mean"] + agg["std"]
    return agg
