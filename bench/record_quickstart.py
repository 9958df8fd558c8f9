"""Write the newest `rlcore quickstart` run's per-step metrics (float hex) with the machine it ran on: the format of
tests/golden/quickstart.json and ../shared/cross_cpu/quickstart_xeon.json, which the golden test's cross-machine
tolerance is sized on. Run the quickstart on one thread first:

    RLCORE_THREADS=1 rlcore quickstart && python bench/record_quickstart.py tests/golden/quickstart.json
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from mlflow.tracking import MlflowClient

from rlcore.sft import _cpu_name
from rlcore.tracking import project_root, tracking_settings

KEYS = ["actor/entropy", "actor/grad_norm", "actor/loss", "eval/greedy_accuracy", "eval/sampled_reward", "kl/mean",
        "response/length_mean", "reward/mean", "reward/zero_var_group_frac"]


def main(out: Path) -> None:
    c = MlflowClient(tracking_settings(project_root())["tracking_uri"])
    exp = c.get_experiment_by_name("quickstart")
    run = c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])[0]
    metrics = {k: [[m.step, float(m.value).hex()] for m in sorted(c.get_metric_history(run.info.run_id, k),
                                                                    key=lambda m: m.step)] for k in KEYS}
    out.write_text(json.dumps({
        "what": "rlcore quickstart (experiments/quickstart.yaml, shipped warm start), one torch thread",
        "machine": {"cpu": _cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version(),
                    "torch_threads": run.data.tags.get("torch_threads")},
        "warm_start.sha256": run.data.tags.get("warm_start.sha256"), "metrics": metrics}, indent=1) + "\n")
    print(f"wrote {out} from run {run.info.run_id}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
