"""The pages in a real browser (Debian's chromium driven by Playwright) against a real Daphne
and worker with DEBUG off and static files served by WhiteNoise: create, watch live, stop,
results, chart, bundle; Stop by keyboard alone; the monitor with JavaScript off.

Screenshots of the three pages at 1280 px go to each test's temporary folder."""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# A fast result to see land, then fine-tunes long enough to watch their loss and stop.
TECHNIQUES = ["ptq_int8", "qat", "hybrid"]


PASSWORD = "a browser-test password"


@pytest.fixture
def browser_stack(demo_storage, tmp_path, settings, transactional_db, auth_headers, owner):
    """A real stack as a team would run it: DEBUG off, collected static files. The owner
    gets a password to log in with."""
    from tests.live import running_stack

    static_root = tmp_path / "static"
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"], check=True,
                   cwd=Path(__file__).resolve().parent.parent, env={**_environ(), "STATIC_ROOT": str(static_root)})
    settings.EDGEOPT_STORAGE_ROOT = demo_storage
    env = {"DEBUG": "false", "SECRET_KEY": "browser-test-" + "k" * 50, "ALLOWED_HOSTS": "127.0.0.1,localhost",
           "STATIC_ROOT": str(static_root)}
    owner.set_password(PASSWORD)
    owner.save()
    with running_stack(demo_storage, tmp_path / "logs", auth_headers, **env) as running:
        try:
            yield running
        finally:
            print(running.logs())


def _environ() -> dict:
    import os

    return dict(os.environ)


@pytest.fixture
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def new_page(browser, stack, **context_options):
    """A browser session logged in as the owner, through the login page."""
    context = browser.new_context(base_url=stack.base, viewport=WIDE, accept_downloads=True, **context_options)
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.goto("/accounts/login/")
    page.fill("#id_username", "owner")
    page.fill("#id_password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
    return page


def start_experiment(stack, name: str) -> int:
    status, experiment, _ = stack.request("POST", "/api/experiments/create", {
        "name": name, "framework": "pytorch", "target_device": "rpi4", "dataset": "digits",
        "techniques": TECHNIQUES, "pretrained_model": "digits_cnn"})
    assert status == 201, experiment
    assert stack.request("POST", f"/api/experiments/{experiment['id']}/start")[0] == 202
    return experiment["id"]


def wait_for_status(page, *statuses: str, timeout: float = 300_000) -> None:
    pattern = "|".join(statuses)
    page.wait_for_function(
        f"() => /^({pattern})$/.test(document.querySelector('#progress-panel')?.dataset.status || '')",
        timeout=timeout)


def wait_for_loss_points(page, stack, count: int) -> None:
    """Until the live loss chart holds `count` points; a run that ended first (it can never get
    them then) or ten silent minutes fail with what the API and the worker logs say."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"""() => (Chart.getChart('live-loss-chart').data.datasets[0]?.data.length || 0) >= {count}
                      || /^(completed|failed|stopped)$/.test(document.querySelector('#progress-panel').dataset.status)""",
            timeout=600_000)
    except PlaywrightTimeout:
        pass
    points = page.evaluate("() => Chart.getChart('live-loss-chart').data.datasets.map(d => d.data.length)")
    if not points or points[0] < count:
        experiment_id = re.search(r"/experiments/(\d+)/", page.url).group(1)
        _, experiment, _ = stack.request("GET", f"/api/experiments/{experiment_id}")
        pytest.fail(f"the run ended with loss points {points}: {experiment}\n{stack.logs()}")


def stop_with_the_keyboard(page) -> None:
    """Tab to Stop, keep the focus there across a live update of the panel, press Enter."""
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "stop-button":
            break
    else:
        pytest.fail("Tab never reached the Stop button")
    seq = page.evaluate("() => document.querySelector('#progress-panel').dataset.seq")
    page.wait_for_function(f"() => document.querySelector('#progress-panel').dataset.seq !== '{seq}'")
    assert page.evaluate("() => document.activeElement.id") == "stop-button", "a live update took the focus"
    page.keyboard.press("Enter")


def test_create_watch_stop_by_keyboard_results_chart_and_bundle(browser_stack, browser, tmp_path):
    page = new_page(browser, browser_stack)
    page.goto("/")
    page.screenshot(path=str(tmp_path / "setup-1280.png"), full_page=True)
    page.fill("#id_name", "from the browser")
    page.select_option("#id_framework", "pytorch")
    page.select_option("#id_pretrained_model", "digits_cnn")
    for box in page.locator("input[name=techniques]").all():
        box.set_checked(box.get_attribute("value") in TECHNIQUES)
    page.select_option("#id_plan", "all")  # run each one: the planner may skip what cannot win
    page.click("form.setup button[type=submit]")

    page.wait_for_url(re.compile(r"/experiments/\d+/$"))
    # live: the socket brings the first finished technique without a reload
    page.wait_for_selector("#technique-ptq_int8.status-completed", timeout=300_000)
    assert page.locator("#bar-overall").get_attribute("value") not in (None, "0")
    page.wait_for_function("() => Chart.getChart('live-results-chart')?.data.datasets.length >= 2")
    wait_for_loss_points(page, browser_stack, 3)
    page.screenshot(path=str(tmp_path / "monitor-1280.png"), full_page=True)
    stop_with_the_keyboard(page)
    wait_for_status(page, "stopped")
    assert page.locator("#announcer").inner_text().strip() == "Experiment stopped"

    page.click("text=See the results")
    page.wait_for_selector("#results-chart")
    page.wait_for_function("() => window.Chart && Chart.getChart('results-chart')")
    axes = page.evaluate("""() => {
        const chart = Chart.getChart('results-chart');
        return ['x', 'y'].map(id => ({title: chart.options.scales[id].title.text, ticks: chart.scales[id].ticks.length}));
    }""")
    assert axes[0]["title"] == "Download size (KB)" and axes[1]["title"] == "Top-1 accuracy (%)"
    assert all(axis["ticks"] >= 3 for axis in axes)
    page.select_option("#chart-axis", "device_latency")
    assert page.evaluate("() => Chart.getChart('results-chart').options.scales.x.title.text") == \
        "Device latency, estimated (ms)"
    page.screenshot(path=str(tmp_path / "results-1280.png"), full_page=True)
    assert "pending" not in page.inner_text("table.results")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= WIDE["width"], "tables scroll in their box"
    page.set_viewport_size(PHONE)
    page.reload()
    page.screenshot(path=str(tmp_path / "results-390.png"), full_page=True)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"], "no sideways page at 390 px"
    page.set_viewport_size(WIDE)

    with page.expect_download() as download_info:
        page.locator("#result-ptq_int8 a.bundle-link").click()
    archive = zipfile.ZipFile(io.BytesIO(Path(download_info.value.path()).read_bytes()))
    assert {name.split("/", 1)[1] for name in archive.namelist()} >= {
        "model.onnx", "run.py", "preprocessing.json", "labels.json", "report.json"}
    for name in ("setup", "monitor", "results"):
        assert (tmp_path / f"{name}-1280.png").stat().st_size > 10_000


def test_the_monitor_works_without_javascript(browser_stack, browser):
    experiment_id = start_experiment(browser_stack, "no javascript")
    page = new_page(browser, browser_stack, java_script_enabled=False)
    page.goto(f"/experiments/{experiment_id}/")

    assert "reloads itself every 5 seconds" in page.inner_text("main")
    page.click("#stop-button")  # a plain form post, answered with a redirect to the monitor

    page.wait_for_url(f"**/experiments/{experiment_id}/")
    for _ in range(60):  # the page reloads itself (meta refresh) until the worker has stopped
        if page.locator("#progress-panel").get_attribute("data-status") == "stopped":
            break
        page.wait_for_timeout(2000)
    assert page.locator("#progress-panel").get_attribute("data-status") == "stopped"
    assert page.locator("text=See the results").is_visible()
