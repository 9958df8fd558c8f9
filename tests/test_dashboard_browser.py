"""The real dashboard server in headless Chromium (Debian's package, driven by Playwright): every page renders with
no exception box; screenshots are saved for a person to look at."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dashboard.serve import SCRIPT_DONE, background
from rlcore.tracking import tracking_settings
from tests.test_dashboard import dash  # noqa: F401 - the store filled by real runs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGES = ["", "algorithms", "sweeps", "bottlenecks", "samples", "run", "lessons", "launch"]
SHOTS = Path(os.environ.get("RLCORE_SCREENSHOTS", Path(__file__).resolve().parent.parent / "outputs" / "screenshots"))


@pytest.fixture(scope="module")
def server(dash: Path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the lab's own mlflow.yml
    with background(dash, env=env) as url:
        yield url


def settled(page, timeout_ms: int = 60_000) -> None:
    """Wait until the page's script has finished (Streamlit's "running" widget is gone), then a moment for the
    last elements to paint. `networkidle` does not wait for it: the script streams over a websocket."""
    page.wait_for_timeout(300)
    page.wait_for_function(SCRIPT_DONE, timeout=timeout_ms)
    page.wait_for_timeout(300)


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


# ------------------------------------------------------------------------------------------------ breakage found by use


def no_exception(page) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()[:2000]


def test_run_search_works_on_runs_with_and_without_tags(server: str, page) -> None:
    """Typing in "Name or tag contains" filtered with a TypeError under pandas 3 (a run without a tag has a missing
    value there); now it narrows the table, and the count says so."""
    page.goto(server)
    page.wait_for_selector("text=runs shown", timeout=30_000)
    total = int(page.get_by_text("runs shown").first.inner_text().split(" of ")[1].split()[0])
    box = page.get_by_label("Name or tag contains")
    box.fill("rloo")
    box.press("Enter")
    page.wait_for_selector(f"text=1 of {total} runs shown", timeout=30_000)
    no_exception(page)
    box.fill("variant=")  # a tag only the lesson runs carry: the others have no such tag at all
    box.press("Enter")
    page.wait_for_function(f"() => document.body.innerText.match(/(\\d+) of {total} runs shown/) && "
                           f"!document.body.innerText.includes('1 of {total} runs shown')", timeout=30_000)
    no_exception(page)
    assert "?q=variant" in page.url or "q=variant%3D" in page.url  # the search is in the URL


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def repo_server():
    """The dashboard over this repository's own lessons/ (the store may be empty: the text is what is checked)."""
    with background(REPO) as url:
        yield url


def test_every_lesson_renders_its_formulas(repo_server: str, page) -> None:
    """Every lesson page of the curriculum: no KaTeX error anywhere, and every display formula of the source
    (`$$ ... $$`, several lines or one) is drawn as a display formula. Multi-line ones failed in seven lessons, and
    a continuation line starting with '+' turned the rest of the page into raw red text."""
    import re

    from rlcore.lessons import load_all

    lessons = load_all(REPO)
    assert len(lessons) >= 15
    for lesson in lessons:
        m = lesson.meta
        page.goto(f"{repo_server}/lessons?lesson={m.id}")
        page.wait_for_selector(f"h2:has-text('{m.id} · ')", timeout=30_000)
        want = len(re.findall(r"\$\$(.+?)\$\$", lesson.body, re.DOTALL))
        try:  # the text streams in after the header; the page is done when its formulas are
            page.wait_for_function(f"() => document.querySelectorAll('.katex-display').length >= {want} && "
                                   "document.body.innerText.includes('Questions')", timeout=30_000)
        except Exception:  # noqa: BLE001 - the assertions below say what is missing
            pass
        settled(page)
        no_exception(page)
        errors = page.locator(".katex-error")
        assert errors.count() == 0, (m.id, errors.first.get_attribute("title"))
        assert page.locator(".katex-display").count() == want, m.id
        if m.id in ("04", "07", "14"):
            page.screenshot(path=str(SHOTS / f"lesson-{m.id}.png"), full_page=True)


def test_launch_stop_records_the_exit_status_and_shows_it(server: str, page, dash: Path) -> None:  # noqa: F811
    """Start a long run from the Launch page, press Stop at once (during start-up) and see the launch end as
    `stopped (exit 143)`: it stayed `running` before. No MLflow run of it is left RUNNING."""
    from dashboard import launcher

    page.goto(f"{server}/launch")
    page.wait_for_selector("text=valid:", timeout=30_000)
    overrides = page.get_by_label("Overrides, one key.path=value per line")
    overrides.fill("trainer.steps=5000\nlogging.experiment=browser-launch")
    overrides.press("Control+Enter")
    page.wait_for_selector("text=steps=5000", timeout=30_000)
    page.get_by_role("button", name="Start").click()
    page.wait_for_selector("text=started ", timeout=30_000)
    launch = launcher.all_launches(dash)[0]
    try:
        # our button by its key (Streamlit's own header shows a "Stop" button while a script runs)
        # (while a rerun paints, the old copy of the button stays on the page too: wait for the run to end)
        page.wait_for_selector(f".st-key-stop-{launch.id} button", timeout=60_000)
        settled(page)
        page.locator(f".st-key-stop-{launch.id} button >> visible=true").first.click(timeout=60_000)
        try:
            page.wait_for_selector(f"text={launch.id} · rl.yaml · stopped (exit 143)", timeout=120_000)
        except Exception as e:  # noqa: BLE001 - say what the launch did instead
            raise AssertionError(f"status {launch.status(dash)!r}, stop requested: "
                                 f"{(launcher.launches_dir(dash) / (launch.id + '.stopped')).exists()}; log: "
                                 f"{launcher.tail(launch.log(dash))[-600:]}") from e
        no_exception(page)
        page.screenshot(path=str(SHOTS / "launch-stopped.png"), full_page=True)
    finally:
        if launch.status(dash) in ("running", "stopping"):
            launcher.stop(launch, dash, force=True)
    c = MlflowClient(tracking_settings(dash)["tracking_uri"])
    exp = c.get_experiment_by_name("browser-launch")
    left = c.search_runs([exp.experiment_id]) if exp else []
    assert all(r.info.status != "RUNNING" for r in left)


def test_url_state_survives_a_reload(server: str, page, dash: Path) -> None:  # noqa: F811
    """The selection, metrics and x axis come from the URL, so a link or a reload shows the same charts; a lesson
    link opens that lesson."""
    from dashboard.data import Store

    runs = Store.for_project(dash).runs()
    rloo = runs[runs["name"] == "rloo"]["run_id"].iloc[0]
    page.goto(f"{server}/?runs={rloo}&m=kl/mean&x=tokens")
    page.wait_for_selector("text=1 ticked", timeout=30_000)
    assert charts_drawn(page, 1) == 1  # one metric asked for: one chart
    assert page.get_by_text(f"rloo ({rloo[:8]})").count() >= 1
    page.reload()
    page.wait_for_selector("text=1 ticked", timeout=30_000)
    assert charts_drawn(page, 1) == 1 and "x=tokens" in page.url
    page.goto(f"{server}/lessons?lesson=12")
    page.wait_for_selector("h2:has-text('12 · Variants of beta')", timeout=30_000)
    settled(page)
    no_exception(page)
    # a deep link gets the app's own menu (a `pages/` folder used to add Streamlit's file list on first load)
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert "Learn" in nav and "Lessons" in nav and "app" not in nav.split("\n")


def _status(url: str, host: str, path: str = "/", upgrade: bool = False) -> int:
    """The HTTP status the dashboard answers a request for `path` with this Host header (a websocket handshake when
    `upgrade`)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    headers = {"Host": host}
    if upgrade:
        headers |= {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    conn.request("GET", path, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_a_foreign_host_is_refused_on_http_and_websocket(server: str) -> None:
    """DNS rebinding: a page of another site whose name resolves to 127.0.0.1 sends its own name as Host. The
    dashboard answers it 400, for a page and for the websocket handshake; this machine's names still work."""
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        assert _status(server, host) == 400, host
        assert _status(server, host, "/_stcore/stream", upgrade=True) == 400, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _status(server, host) == 200, host
        assert _status(server, host, "/_stcore/health") == 200, host
        assert _status(server, host, "/_stcore/stream", upgrade=True) == 101, host
