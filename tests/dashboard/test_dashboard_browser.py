"""The dashboard in a real browser: `forkwatch dashboard` serves synthetic runs, headless Chromium (Debian's
`chromium` package, driven by Playwright) opens each page, waits until the charts and the token view have been drawn,
saves a screenshot per page to test-artifacts/, and checks the drawn elements. Ctrl-C stops a server cleanly.

Skipped, with the reason, when /usr/bin/chromium or the playwright package is missing (`apt-get install chromium`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from synthetic import write_sample_runs

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.timeout(240),
]
playwright_sync = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
expect = playwright_sync.expect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the dashboard did not answer at {url} within {timeout} s")


def _start(log_dir: Path) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    env = os.environ | {"STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forkwatch.cli", "dashboard", str(log_dir), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc)
    return url, proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: forkwatch stops its Streamlit child too (SIGKILL would orphan it)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("browser_runs")
    write_sample_runs(d, n_steps=40, token_steps=4)
    return d


@pytest.fixture(scope="module")
def server(log_dir):
    url, proc = _start(log_dir)
    try:
        yield url, proc
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # Streamlit scrolls inside its own container, so a full-page shot is only as tall as the viewport.
        pg = browser.new_page(viewport={"width": 1400, "height": 2400})
        pg.set_default_timeout(45_000)
        yield pg
        browser.close()


def _open(page, url: str, title: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=title).first.wait_for()
    assert page.get_by_text("Page not found").count() == 0
    # Streamlit shows a "running" status widget while the script runs: wait until it is gone.
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")


def _shot(page, name: str) -> Path:
    path = ARTIFACTS / f"dashboard_{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_runs_page_draws_the_table(server, page):
    url, _ = server
    _open(page, f"{url}/?run=collapse&run=explosion", "Runs")  # the root forwards to /runs
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    expect(page.locator('[data-testid="stExpander"]')).to_have_count(2)  # retries until drawn, then asserts
    # the flag as the expander writes it (the table's own cells hold the badge too, but drawn on a canvas: hidden)
    page.locator('[data-testid="stExpander"]').get_by_text("collapse.mean", exact=False).first.wait_for()
    _shot(page, "runs")


def test_entropy_page_draws_the_chart_with_flags(server, page):
    url, _ = server
    _open(page, f"{url}/entropy?run=collapse&run=healthy&run=explosion", "Entropy")
    chart = page.locator('[data-testid="stPlotlyChart"] .main-svg').first
    chart.wait_for()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= 15")
    page.locator(".js-plotly-plot .shapelayer path").nth(1).wait_for(state="attached")  # >= 2 flag markers
    _shot(page, "entropy")


def test_forks_page_draws_the_token_view(server, page):
    url, _ = server
    _open(page, f"{url}/forks?run=collapse&step=2", "Forks")
    page.locator(".fw-token").first.wait_for()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3")
    tokens = page.locator(".fw-token")
    expect(tokens).to_have_count(24)  # synthetic completions are 24 tokens long
    page.locator(".fw-fork").first.wait_for()
    page.locator(".fw-grad").first.wait_for()
    title = page.locator(".fw-fork").first.get_attribute("title")
    assert "entropy" in title and "alternatives (top-k):" in title
    _shot(page, "forks")


def test_law_page_draws_the_fit(server, page):
    url, _ = server
    _open(page, f"{url}/law?run=collapse&run=healthy", "Entropy–reward law")
    page.locator('[data-testid="stMetric"]').first.wait_for()
    page.locator('[data-testid="stPlotlyChart"] .main-svg').first.wait_for()
    expect(page.get_by_text("No fit shown", exact=False)).to_have_count(1)
    _shot(page, "law")


def test_sql_page_runs_an_example(server, page):
    url, _ = server
    _open(page, f"{url}/sql", "SQL")
    page.get_by_role("button", name="Entropy per step").click()
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    page.get_by_text("row(s)", exact=False).first.wait_for()
    # Streamlit may draw it a moment after the table: expect() retries, and fails when it never comes
    expect(page.get_by_role("button", name="Download CSV")).to_have_count(1)
    _shot(page, "sql")


@pytest.mark.parametrize(("path", "title"), [
    ("runs", "Runs"), ("entropy", "Entropy"), ("forks", "Forks"), ("law", "Entropy–reward law"), ("sql", "SQL"),
])
def test_every_page_answers_at_its_own_url(server, page, path, title):
    url, _ = server
    _open(page, f"{url}/{path}?run=collapse", title)


def test_the_root_url_forwards_to_runs_keeping_the_query(server, page):
    url, _ = server
    _open(page, f"{url}/?run=healthy", "Runs")
    page.wait_for_url("**/runs?run=healthy")


def test_runs_page_draws_a_picture_per_run_with_alarms(server, page):
    url, _ = server
    _open(page, f"{url}/runs?run=collapse", "Runs")
    page.get_by_role("heading", name="Each run at a glance").wait_for()
    # 3 runs x (entropy, reward) curves, plus the x markers of the runs whose health rules fired
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= 7")
    _shot(page, "runs_pictures")


def test_entropy_page_draws_the_spectrum_and_the_effective_rank(server, page):
    url, _ = server
    _open(page, f"{url}/entropy?run=collapse", "Entropy")
    page.get_by_role("heading", name="Entropy spectrum").wait_for()
    page.get_by_role("heading", name="Effective rank of hidden states").wait_for()
    page.locator(".js-plotly-plot .heatmaplayer image").first.wait_for(state="attached")  # the step x bin map
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3")
    _shot(page, "entropy_lenses")


def test_forks_page_draws_fork_roles_and_probes(server, page):
    url, _ = server
    _open(page, f"{url}/forks?run=collapse&step=2", "Forks")
    page.get_by_role("heading", name="Roles of forking tokens").wait_for()
    page.get_by_role("heading", name="Probes: the same tokens across training").wait_for()
    page.locator(".js-plotly-plot .heatmaplayer image").first.wait_for(state="attached")  # token x step
    page.get_by_text("shared with their first scoring", exact=False).first.wait_for()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 6")
    _shot(page, "forks_lenses")


def test_ctrl_c_stops_the_dashboard_cleanly(log_dir):
    """On a server of its own: the pages' tests keep theirs, whatever order the tests run in."""
    url, proc = _start(log_dir)
    try:
        proc.send_signal(signal.SIGINT)
        # communicate, not wait: the server's output goes to a pipe, which must be drained while it shuts down.
        # The timeout is a hang guard, not a speed bound.
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM takes forkwatch's own stop path, which stops Streamlit (the pipe's other end)
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                output = ""
            pytest.fail(f"the dashboard did not stop on SIGINT; its output:\n{output[-4000:]}")
        assert proc.returncode == 0, output[-4000:]
    finally:
        _stop(proc)
