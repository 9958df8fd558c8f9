"""The real dashboard server in headless Chromium (Debian's package, driven by Playwright): every page renders with
no exception box; screenshots are saved for a person to look at."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_dashboard import dash  # noqa: F401 - the store filled by real runs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGES = ["", "algorithms", "sweeps", "bottlenecks", "samples", "lessons", "launch"]
SHOTS = Path(os.environ.get("RLCORE_SCREENSHOTS", Path(__file__).resolve().parent.parent / "outputs" / "screenshots"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(dash: Path):  # noqa: F811
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.Popen([sys.executable, "-m", "rlcore.cli", "dashboard", "--port", str(port)], cwd=dash,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"dashboard did not start: {proc.stdout.read()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def charts_drawn(page, want: int) -> int:
    """How many Vega charts the page shows, waiting up to 30 s for `want` of them: they arrive one by one, and a
    loaded machine draws the later ones seconds after the first."""
    page.wait_for_selector('[data-testid="stVegaLiteChart"]', timeout=30_000)
    charts = page.locator('[data-testid="stVegaLiteChart"]')
    deadline = time.time() + 30
    while charts.count() < want and time.time() < deadline:
        page.wait_for_timeout(500)
    return charts.count()


@pytest.fixture
def page():
    """A headless Debian Chromium page (1400 x 1000); CI fails without Chromium, elsewhere the test is skipped."""
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("Debian chromium not installed")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def test_every_page_renders_without_an_exception(server: str, page) -> None:
    for name in PAGES:
        page.goto(f"{server}/{name}")
        page.wait_for_selector("h1", timeout=30_000)  # every page has a title
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(1500)  # charts render after the data arrives
        assert page.locator('[data-testid="stException"]').count() == 0, name
        title = page.locator("h1").first.inner_text()
        assert title.lower().startswith((name or "runs")[:5]), (name, title)
        page.screenshot(path=str(SHOTS / f"{name or 'runs'}.png"), full_page=True)
    # the Runs page really drew charts in the browser (vega canvases or SVGs)
    page.goto(server)
    assert charts_drawn(page, 2) >= 2


def test_lessons_page_in_the_browser(server: str, page) -> None:
    """Lesson 12 of the test lab (2 variants x 2 seeds): its lines are named by variant, one chart per metric, the
    registry function's code is on the page, and the answer stays folded until the reader opens it."""
    page.goto(f"{server}/lessons")
    page.get_by_role("button", name="12 · Variants of beta").click()
    page.wait_for_selector("text=Variants of beta", timeout=30_000)
    page.wait_for_selector("text=kl_coef=0.2 (2 seeds)", timeout=30_000)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)
    assert page.locator('[data-testid="stException"]').count() == 0
    assert charts_drawn(page, 2) >= 2  # reward/mean and adv/abs_mean of the lesson's own runs
    assert page.locator("code", has_text="def adv_grpo").count() >= 1
    answer = page.get_by_text("The reference model and its forward pass.")
    assert not answer.is_visible()
    page.get_by_text("What does beta = 0 remove?").click()
    assert answer.is_visible()
    page.screenshot(path=str(SHOTS / "lesson-12.png"), full_page=True)
