"""Screenshots of every dashboard page on a project's store, in headless Debian Chromium (for a person to look at).

    python bench/screenshots.py PROJECT_DIR [--out outputs/screenshots/demo] [--runs 3]

Starts `rlcore dashboard` on PROJECT_DIR (127.0.0.1, a free port), ticks the newest `--runs` finished RL runs through
the URL, and saves one full-page PNG per page (the Runs page also with x = tokens and log y).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "screenshots" / "demo")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from dashboard.data import Store

    runs = Store.for_project(args.project.resolve()).runs()
    rl = runs[(runs["rlcore.kind"] == "rl") & (runs["status"] == "FINISHED") & runs["rlcore.trial"].isna()]
    # one run per algorithm first, so the charts compare algorithms
    picked = ",".join(rl.drop_duplicates("algorithm")["run_id"].head(args.runs))
    from dashboard.serve import SCRIPT_DONE, background

    with background(args.project) as url:
        args.out.mkdir(parents=True, exist_ok=True)
        pages = {"runs": f"/?runs={picked}", "runs-tokens-log": f"/?runs={picked}&x=tokens&log=1",
                 "algorithms": "/algorithms", "sweeps": "/sweeps", "bottlenecks": f"/bottlenecks?runs={picked}",
                 "samples": f"/samples?runs={picked}", "run": f"/run?run={picked.split(',')[0]}",
                 "lessons": "/lessons?lesson=07", "launch": "/launch"}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            # Streamlit scrolls inside its own container, so a full-page shot shows one viewport: make it tall.
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            for name, path in pages.items():
                t = time.perf_counter()
                page.goto(url + path)
                page.wait_for_selector("h1", timeout=60_000)
                page.wait_for_timeout(300)
                page.wait_for_function(SCRIPT_DONE,
                                       timeout=60_000)
                page.wait_for_timeout(1500)  # vega draws after the data arrives
                page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                errors = page.locator('[data-testid="stException"]').count()
                print(f"{name:16s} {time.perf_counter() - t:5.1f} s  exceptions: {errors}  -> {args.out / name}.png")
            dark = browser.new_page(viewport={"width": 1400, "height": 2400}, color_scheme="dark")  # the system theme
            dark.goto(url + pages["runs"])
            dark.wait_for_selector("h1", timeout=60_000)
            dark.wait_for_function(SCRIPT_DONE, timeout=60_000)
            dark.wait_for_timeout(1500)
            dark.screenshot(path=str(args.out / "runs-dark.png"), full_page=True)
            print(f"runs-dark              -> {args.out / 'runs-dark'}.png")
            browser.close()


if __name__ == "__main__":
    main()
