"""The real dashboard server in headless Chromium (Debian's package, driven by Playwright): every page renders with
no exception box; screenshots are saved for a person to look at."""

from __future__ import annotations

import os
import re
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


# ------------------------------------------------------------------------------------------------ a day of use (issue 28)

@pytest.fixture(scope="module")
def busy(lab: Path, tmp_path_factory):
    """A lab with 24 runs of one experiment (metrics and a numeric param logged straight to its MLflow store: what
    the charts and the table are tested on), a real run whose reward raised on every sample (FAILED by the lab),
    and its dashboard. Yields (root, url, the 24 run ids)."""
    import math

    from mlflow.entities import Metric

    from rlcore.controller import run
    from rlcore.loading import load_experiment
    from rlcore.tracking import experiment_id
    from tests.conftest import write_course

    root = write_course(tmp_path_factory.mktemp("busy"), {})
    shutil.copytree(lab / ".rlcore_cache" / "warm_start", root / ".rlcore_cache" / "warm_start")
    s = tracking_settings(root)
    c = MlflowClient(s["tracking_uri"])
    eid = experiment_id(c, "many", s["artifact_location"])
    ids = []
    for i in range(24):
        group = f"many-g{i:02d}" if i < 20 else f"many-pair{'AB'[(i - 20) // 2]}"  # 20 single runs, two 2-seed groups
        r = c.create_run(eid, run_name=f"grpo-lr{i}", tags={"rlcore.kind": "rl", "algorithm": "grpo", "seed": str(i),
                                                            "rlcore.group": group})
        now = int(time.time() * 1000)
        c.log_batch(r.info.run_id, metrics=[Metric(k, f(t), now + t, t) for t in range(1, 41) for k, f in (
            ("reward/mean", lambda t, i=i: 0.5 + 0.4 * (1 - math.exp(-t / (8 + i)))),
            ("kl/mean", lambda t, i=i: 0.001 * t * (1 + i / 10)))])
        c.log_param(r.info.run_id, "trainer.lr", str([3e-4, 3e-5, 1e-3, 1e-4][i % 4]))
        c.log_metric(r.info.run_id, "perf/cpu_s", 10.0 + i, step=40)  # logged once, at the end, as runs do
        c.set_terminated(r.info.run_id)
        ids.append(r.info.run_id)
    import trust_rewards

    trust_rewards.CALLS["broken"] = 0  # its first call (validation's probe) succeeds, every later one raises
    cfg = load_experiment(root / "rl.yaml", ["trainer.steps=8", "logging.experiment=broken-reward",
                                             "logging.run_name=broken-reward",
                                             "reward.components=[{name: r, fn: 'trust_rewards:broken_after_probe'}]"])
    with pytest.raises(Exception, match="failed on every sample"):
        run(cfg, root=root)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with background(root, env=env) as url:
        yield root, url, ids


def test_twenty_ticked_runs_draw_readable_charts_in_distinct_styles(busy, page) -> None:
    """20 ticked runs: every chart keeps a plot of >= 120 px (it was ~50 px: the legend took it) with 20 lines, one
    shared legend lists them once, and no two of them share colour and line style (colours repeated after 12)."""
    _, url, ids = busy
    page.goto(f"{url}/?runs={','.join(ids[:20])}")
    settled(page)
    assert charts_drawn(page, 2) >= 2
    page.wait_for_timeout(1500)
    shapes = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].map(el => {
        const frame = el.querySelector('.mark-group.role-frame path');
        const lines = [...el.querySelectorAll('.mark-line.role-mark path')];
        return {plot: frame ? frame.getBBox().height : 0,
                styles: lines.map(p => p.getAttribute('stroke') + ' ' + (p.getAttribute('stroke-dasharray') || '-'))};
    })""")
    assert len(shapes) >= 2
    for s in shapes:
        assert s["plot"] >= 120, shapes
        assert len(s["styles"]) == 20 and len(set(s["styles"])) == 20, s["styles"]
    legend = page.locator("text=grpo-lr19 (")
    assert legend.count() >= 1  # the shared legend names every ticked run
    no_exception(page)
    page.screenshot(path=str(SHOTS / "runs-20-ticked.png"), full_page=True)


def column_header_x(page, grid, index: int) -> float:
    """The x of the middle of column `index` (1-based) of a Streamlit table's header. Its header is drawn on a
    canvas, so it is found as a person's mouse finds it: the resize cursor marks the edge between two columns."""
    canvas = grid.locator("canvas").first.bounding_box()
    y, edges, inside = canvas["y"] + 17, [canvas["x"]], False
    x = canvas["x"] + 2
    while len(edges) <= index and x < canvas["x"] + canvas["width"]:
        page.mouse.move(x, y)
        resize = grid.locator("canvas").first.evaluate("c => getComputedStyle(c).cursor") == "col-resize"
        if resize and not inside:
            edges.append(x)
        inside = resize
        x += 3
    assert len(edges) > index, f"found {len(edges) - 1} column edges, wanted {index}"
    return (edges[index - 1] + edges[index]) / 2


def test_numeric_params_show_as_numbers_and_sort_as_numbers(busy, page) -> None:
    """trainer.lr is a number in the table (short, not 20 digits of a float's text) and a click on its header sorts
    it as one: as text "0.0001" < "0.0003" < "0.001" < "3e-05", so 3e-05 came last."""
    root, url, _ = busy
    page.set_viewport_size({"width": 3400, "height": 1000})  # every column of the table drawn (it virtualises)
    page.goto(url)
    settled(page)
    page.wait_for_selector('[data-testid="stDataFrame"] [role="columnheader"]', state="attached", timeout=30_000)
    page.wait_for_timeout(1000)
    grid = page.locator('[data-testid="stDataFrame"]').first
    headers = grid.locator('[role="columnheader"]')
    names = [headers.nth(i).inner_text() for i in range(headers.count())]
    assert "trainer.lr" in names, names
    col = int(headers.nth(names.index("trainer.lr")).get_attribute("aria-colindex"))

    def column() -> list[str]:  # the lr cells top to bottom, as drawn
        got = grid.evaluate("""(g, col) => [...g.querySelectorAll('[role="row"][aria-rowindex]')].map(r => [
            +r.getAttribute('aria-rowindex'), r.querySelector(`[role="gridcell"][aria-colindex="${col}"]`)?.innerText])
            .filter(([, v]) => v)""", col)
        return [v for _, v in sorted(got)]

    shown = column()
    assert shown and all(len(v) <= 8 and float(v) in (3e-4, 3e-5, 1e-3, 1e-4) for v in shown), shown
    page.mouse.click(column_header_x(page, grid, col), grid.locator("canvas").first.bounding_box()["y"] + 17)
    page.wait_for_timeout(1000)
    ascending = [float(v) for v in column()]
    assert len(ascending) >= 8 and ascending == sorted(ascending) and ascending[0] == 3e-5, ascending
    no_exception(page)


def test_deleting_a_run_deletes_exactly_it_says_so_and_undo_brings_it_back(busy, page) -> None:
    """Delete asks for the run's name; afterwards the page names what went and offers Undo, and the next run shown
    has an empty confirmation (a shared tick box stayed ticked, and the next click deleted an unrelated run)."""
    root, url, ids = busy
    c = MlflowClient(tracking_settings(root)["tracking_uri"])
    victim = ids[5]
    name = c.get_run(victim).info.run_name
    active = lambda: {r.info.run_id for e in c.search_experiments() for r in c.search_runs([e.experiment_id])}  # noqa: E731
    before = active()
    page.goto(f"{url}/run?run={victim}")
    settled(page)
    page.get_by_text("Manage: rename, note, tags, delete").click()
    delete = page.get_by_role("button", name="Delete run")
    assert delete.is_disabled()
    box = page.get_by_role("textbox", name=f"To delete this run, type its name: {name}")
    box.fill("grpo-lr1")  # another run's name: not enough
    box.press("Enter")
    settled(page)
    assert page.get_by_role("button", name="Delete run").is_disabled()
    box.fill(name)
    box.press("Enter")
    settled(page)
    page.get_by_role("button", name="Delete run").click()
    page.wait_for_selector(f"text=Deleted run {name}", timeout=30_000)
    settled(page)
    assert active() == before - {victim}  # exactly that run
    page.get_by_text("Manage: rename, note, tags, delete").click()
    assert page.get_by_role("button", name="Delete run").is_disabled()  # the state went with it
    assert page.locator('input[aria-label^="To delete this run"]').first.input_value() == ""
    page.get_by_role("button", name=f"Undo: restore {name}").click()
    settled(page)
    assert active() == before
    no_exception(page)


def broken_reward_run(root: Path):
    """The busy lab's real run whose reward raised on every sample (FAILED by the lab)."""
    c = MlflowClient(tracking_settings(root)["tracking_uri"])
    (failed,) = c.search_runs([c.get_experiment_by_name("broken-reward").experiment_id])
    return failed


def test_the_run_page_shows_no_help_text_and_a_failed_runs_reason_first(busy, page) -> None:
    root, url, _ = busy
    failed = broken_reward_run(root)
    page.goto(f"{url}/run?run={failed.info.run_id}")
    settled(page)
    body = page.locator("body").inner_text()
    assert "DeltaGenerator" not in body and "Help on" not in body and "st.dataframe" not in body  # Streamlit's magic
    assert page.get_by_text("FAILED: RunFailed: reward component 'r'").count() == 1
    no_exception(page)


def test_a_reward_that_always_raised_gets_a_finding_naming_reward_errors(busy, page) -> None:
    """Not advice to turn on dynamic sampling or drop the KL anchor, which read a broken reward as a policy."""
    root, url, _ = busy
    failed = broken_reward_run(root)
    page.goto(f"{url}/bottlenecks?runs={failed.info.run_id}")
    settled(page)
    page.wait_for_selector("text=reward_errors", timeout=30_000)
    body = page.locator("body").inner_text()
    assert "reward/errors: 100% of reward calls failed" in body
    assert "zero_variance_groups —" not in body and "reference_removable —" not in body
    no_exception(page)


def test_a_finished_launch_reads_finished(busy, page) -> None:
    """The Launch page open while a launch runs and ends: it showed `RUNNING · step 4/12` for good."""
    from dashboard import launcher

    root, url, _ = busy
    launch = launcher.start(root, "rl.yaml", ["trainer.steps=6", "logging.experiment=browser-finish"])
    page.goto(f"{url}/launch")
    page.wait_for_selector(f"text={launch.id}", timeout=60_000)
    deadline = time.time() + 180
    while launch.status(root) in ("running", "stopping") and time.time() < deadline:
        time.sleep(0.5)
    assert launch.status(root) == "finished", launcher.tail(launch.log(root))[-800:]
    page.wait_for_selector(f"text={launch.id} · rl.yaml · finished", timeout=60_000)
    page.get_by_text(f"{launch.id} · rl.yaml · finished").click()
    page.wait_for_selector("text=· FINISHED · step 6/6", timeout=30_000)
    assert page.get_by_text("· RUNNING ·").count() == 0
    no_exception(page)


def test_deep_links_fetch_nothing_from_the_internet_and_get_no_404(busy, page) -> None:
    """The lab works offline: a page's material icon as favicon came from fonts.gstatic.com. A deep link asked for
    /<page>/_stcore/host-config and /health first (Streamlit's page finding its server's base path): two 404s in
    every deep link's log, until the served HTML told the page its base (`serve.TellBasePath`)."""
    _, url, ids = busy
    seen: list[tuple] = []
    page.on("response", lambda r: seen.append((r.status, r.url)))
    page.on("requestfailed", lambda r: seen.append(("failed", r.url)))
    for name in PAGES:
        page.goto(f"{url}/{name}?runs={ids[0]}")
        settled(page)
    # (a local request 'failed' is one the next navigation aborted; anything not local is a defect either way)
    bad = [(s, u) for s, u in seen if not u.startswith(url) or (isinstance(s, int) and s >= 400)]
    assert not bad, bad[:6]
    for name in PAGES[1:]:  # and every deep link shows its own page
        page.goto(f"{url}/{name}")
        page.wait_for_selector("h1", timeout=30_000)
        assert page.locator("h1").first.inner_text().lower().startswith(name[:5]), name


def test_a_one_point_metric_draws_its_point_and_filters_live_in_the_url(busy, page) -> None:
    """perf/cpu_s is logged once per run: its chart was empty (a line needs two points). The sidebar filters were
    lost on a reload: now a link carries them."""
    root, url, ids = busy
    page.goto(f"{url}/?runs={ids[0]},{ids[1]}&m=perf/cpu_s")
    settled(page)
    assert charts_drawn(page, 1) >= 1
    page.wait_for_timeout(1500)
    points = page.evaluate("""() => document.querySelectorAll('[data-testid="stVegaLiteChart"] .mark-symbol.role-mark path').length""")
    assert points == 2  # one per run
    page.goto(f"{url}/?exp=broken-reward")
    settled(page)
    c = MlflowClient(tracking_settings(root)["tracking_uri"])
    total = sum(len(c.search_runs([e.experiment_id])) for e in c.search_experiments())
    page.wait_for_selector(f"text=1 of {total} runs shown", timeout=30_000)
    no_exception(page)


def test_the_algorithms_page_draws_the_multi_seed_groups_first(busy, monkeypatch) -> None:
    """22 groups, two of them with 2 seeds: the charts opened on six single-run groups and hid both (AppTest)."""
    from streamlit.testing.v1 import AppTest

    root, _, _ = busy
    monkeypatch.chdir(root)
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
    at.query_params["exp"] = "many"
    at.switch_page("views/algorithms.py").run()
    assert not at.exception, [e.message for e in at.exception]
    drawn = next(m for m in at.multiselect if m.label == "Groups in the charts").value
    assert len(drawn) == 6 and {"grpo · many-pairA", "grpo · many-pairB"} <= set(drawn), drawn


def test_seeds_as_bands_and_the_raw_line_behind_smoothing(busy, page) -> None:
    """Runs had no seed grouping (the band toggle drew nothing under 300 steps) and smoothing hid the raw points."""
    _, url, ids = busy
    page.goto(f"{url}/?runs={','.join(ids[20:24])}&seeds=1&m=reward/mean")
    settled(page)
    assert charts_drawn(page, 1) >= 1
    page.wait_for_timeout(1500)
    body = page.locator("body").inner_text()
    assert "grpo · many-pairA (n=2)" in body and "grpo · many-pairB (n=2)" in body  # one line per 2-seed group
    marks = page.evaluate("""() => { const el = document.querySelector('[data-testid="stVegaLiteChart"]');
        return {lines: el.querySelectorAll('.mark-line.role-mark path').length,
                areas: el.querySelectorAll('.mark-area.role-mark path').length} }""")
    assert marks == {"lines": 2, "areas": 2}, marks  # two groups, each with its mean +- std band
    page.goto(f"{url}/?runs={ids[0]},{ids[1]}&smooth=0.8&m=reward/mean")
    settled(page)
    assert charts_drawn(page, 1) >= 1
    page.wait_for_timeout(1500)
    lines = page.evaluate("""() => document.querySelector('[data-testid="stVegaLiteChart"]')
        .querySelectorAll('.mark-line.role-mark path').length""")
    assert lines == 4  # each run smoothed, and its raw line faint behind it
    no_exception(page)


# ------------------------------------------------------------------------------ lessons 15-24 (issue 29)

QUOTING = ("15", "16", "17", "18", "18a", "19", "22c", "24")


@pytest.fixture(scope="module")
def quoted(tmp_path_factory):
    """The curriculum's own lessons and experiments over a store holding two seeds of every run their plans make
    (the main plan and every study), each logging the metrics its block charts: what a reader who ran
    `rlcore lesson 15-24` sees. Yields (url, lessons)."""
    from mlflow.entities import Metric

    from rlcore.lessons import load_all
    from rlcore.loading import load_experiment
    from rlcore.tracking import experiment_id

    root = tmp_path_factory.mktemp("quoted")
    for d in ("lessons", "experiments", "warm_starts"):
        (root / d).symlink_to(REPO / d)
    (root / "mlflow.yml").write_text("tracking_uri: sqlite:///mlruns/mlflow.db\nartifact_location: mlruns/artifacts\n")
    s = tracking_settings(root)
    c = MlflowClient(s["tracking_uri"])
    lessons = [x for x in load_all(root) if x.meta.id in QUOTING]
    now = int(time.time() * 1000)
    made = set()
    for lesson in lessons:
        for block in lesson.meta.blocks():
            keys = {*block.metrics, *(k.removeprefix("sqrt:") for pair in block.versus for k in pair)}
            for f in block.experiments:
                for variant in block.variants:
                    cfg = load_experiment(root / "experiments" / f, [*block.overrides, *variant])
                    if (cfg.seed_group(), tuple(sorted(keys))) in made:
                        continue
                    made.add((cfg.seed_group(), tuple(sorted(keys))))
                    eid = experiment_id(c, cfg.logging.experiment, s["artifact_location"])
                    for seed in (0, 1):
                        r = c.create_run(eid, run_name=f"{lesson.meta.id}-{seed}", tags={
                            "rlcore.kind": cfg.kind, "rlcore.group": cfg.seed_group(), "seed": str(seed),
                            "warm_start.sha256": "same"})
                        c.log_batch(r.info.run_id, metrics=[Metric(k, 0.1 * t + seed, now + t, t)
                                                            for t in (1, 2, 3) for k in keys])
                        c.set_terminated(r.info.run_id)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with background(root, env=env) as url:
        yield url, lessons


def test_every_figure_lessons_15_to_24_quote_has_its_chart_on_the_page(quoted, page) -> None:
    """Each page of Part III (and 24) draws a chart for every metric its plan and its studies name, from the runs
    those plans make (17's search table, 16's lr/beta sweep, 24's staleness-0/1 and bfloat16 rows were quoted but
    never made), and 15's true reward against sqrt(KL)."""
    url, lessons = quoted
    for lesson in lessons:
        m = lesson.meta
        want = [k for b in m.blocks() for k in b.metrics]
        want += [f"{y} against {'sqrt(' + x[5:] + ')' if x.startswith('sqrt:') else x}"
                 for b in m.blocks() for y, x in b.versus]
        page.goto(f"{url}/lessons?lesson={m.id}")
        page.wait_for_selector(f"h2:has-text('{m.id} · ')", timeout=30_000)
        settled(page)
        charts_drawn(page, len(want))
        page.wait_for_timeout(500)
        titles = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
            .map(el => el.querySelector('.role-title-text')?.textContent || '')""")
        missing = [k for k in want if k not in titles]
        assert not missing, (m.id, missing, titles)
        for b in m.blocks()[1:]:  # each study under its own heading, with its runs counted
            assert page.get_by_text(b.name, exact=True).count() >= 1, (m.id, b.name)
        assert page.get_by_text("have not been made yet").count() == 0, m.id
        no_exception(page)
