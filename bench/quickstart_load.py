"""`rlcore quickstart` as a newcomer runs it: wall time on idle cores and beside busy processes, side by side.

Each case runs the real command in a fresh copy of the project (experiments/, the shipped warm start, a new MLflow
store), so nothing is cached between cases but the shipped weights, as on a fresh clone. The busy processes are
plain Python loops, one per core by default: the "machine shared with other work" case. `forced 2 threads` is
torch's default before rlcore chose its threads (one per core, whatever the load).

    python bench/quickstart_load.py [--busy 2] [--repeats 1]

Prints, per case: wall seconds, CPU seconds of the quickstart process tree, the thread line the run printed, and
held-out before -> after; then the ratio of each case to the idle one (taken in this one run).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_project(tmp: Path) -> Path:
    root = tmp / "project"
    root.mkdir()
    shutil.copytree(REPO / "experiments", root / "experiments")
    if (REPO / "warm_starts").is_dir():
        shutil.copytree(REPO / "warm_starts", root / "warm_starts")
    (root / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_location: mlruns/artifacts\n")
    return root


def quickstart(env: dict[str, str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = fresh_project(Path(tmp))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "rlcore.cli", "quickstart"], cwd=root, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    threads = re.search(r"torch threads: .*?\)", text)
    evals = re.findall(r"(eval/\w+): ([\d.]+) -> ([\d.]+)", text)
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "threads": threads.group(0) if threads else "?", "evals": evals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes in the loaded cases")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("RLCORE_THREADS", "OMP_NUM_THREADS")}
    base["RLCORE_NO_BAR"] = "1"
    cases = [("idle, rlcore's choice", base, 0), ("idle, forced 1 thread", {**base, "RLCORE_THREADS": "1"}, 0),
             ("idle, forced 2 threads", {**base, "RLCORE_THREADS": "2"}, 0),
             (f"{args.busy} busy, rlcore's choice", base, args.busy),
             (f"{args.busy} busy, forced 2 threads", {**base, "RLCORE_THREADS": "2"}, args.busy)]
    results = []
    deadline = time.time() + 300
    while os.getloadavg()[0] > 0.5 and time.time() < deadline:  # "idle" means the load average says so
        time.sleep(5)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    for name, env, busy in cases:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        if busy:
            time.sleep(61)  # let the 1-minute load average see them, as it would on a machine already busy
        try:
            r = quickstart(env)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        results.append((name, r))
        evals = ", ".join(f"{k} {a} -> {b}" for k, a, b in r["evals"])
        print(f"{name:<28} wall {r['wall']:6.1f} s  cpu {r['cpu']:6.1f} s  {r['threads']}  {evals}", flush=True)
    idle = results[0][1]["wall"]
    print("\nwall time relative to idle (same run):")
    for name, r in results:
        print(f"  {name:<28} {r['wall'] / idle:5.2f}x")


if __name__ == "__main__":
    main()
