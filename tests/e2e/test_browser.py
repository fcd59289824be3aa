"""The dashboard in a real browser: Playwright driving Debian's Chromium against the live core.

A person logs in, sees the simulated robots in the fleet table, opens a robot and sees its battery
chart drawn, sends it a command and watches it reach ``acked``. Every page is saved as a screenshot
in ``test-artifacts/`` (ignored by git). Under ``CI=true`` the test runs or fails, never skips.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not imported by name
    from livecore import LiveCore, SeededFleet

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 20_000  # the longest any single thing a person waits for may take


def _unavailable(reason: str) -> None:
    """Skip with the reason, except under CI=true, where a missing browser fails the run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def dashboard(live_core: LiveCore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The dashboard as its own process (``dashboard.launch``) against the live core; its URL."""
    from dashboard import launch

    port = free_port()
    env = launch.environment(live_core.http_url)
    env["FLEETPUSH_DASHBOARD_REFRESH_S"] = "1"  # command states move within a second or two
    log_path = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(launch.command(live_core.http_url, port), env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(trust_env=False, timeout=2) as direct:
            while True:
                assert proc.poll() is None, f"the dashboard exited: {log_path.read_text()[-3000:]}"
                try:
                    if direct.get(f"{url}/_stcore/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the dashboard's health endpoint did not answer within 60 s"
                time.sleep(0.2)  # polling another process's HTTP endpoint
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text, log_text[-3000:]


@pytest.fixture(scope="session", autouse=True)
def _browser_available() -> None:
    """Check for the browser before any process is started for nothing (autouse runs first)."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the python package playwright is not installed")


@pytest.fixture
def page() -> Iterator[Any]:
    """A fresh Chromium page (Debian's, never a downloaded one)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 1000})
            context.set_default_timeout(WAIT_MS)
            outside: list[str] = []

            def local_only(request: Any) -> None:
                # the dashboard must never call out to the internet (issue 4): every request stays on 127.0.0.1
                host = urlsplit(request.url).hostname
                if request.url.split(":", 1)[0] in ("http", "https", "ws", "wss") and host != "127.0.0.1":
                    outside.append(request.url)

            context.on("request", local_only)
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            yield tab
            assert not errors, f"JavaScript errors in the page: {errors}"
            assert not outside, f"the dashboard made requests off this machine: {outside}"
        finally:
            browser.close()


def shoot(page: Any, name: str) -> None:
    """Save the whole page: Streamlit scrolls inside its main area, so grow the window to fit it first."""
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight ?? 0")
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(height), 6000))})
    try:
        page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)
    finally:
        page.set_viewport_size(size)


def open_page(page: Any, link: str, heading: str) -> None:
    """Click a page in the sidebar, as a person does (a new URL would start a new, logged-out session)."""
    from playwright.sync_api import expect

    page.get_by_test_id("stSidebarNav").get_by_role("link", name=link).click()
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=WAIT_MS)


def choose(page: Any, label: str, option: str) -> None:
    """Pick an option of a select box or multiselect by typing it, as a person does."""
    page.get_by_role("combobox", name=label, exact=True).click()
    page.keyboard.type(option)
    page.get_by_role("option", name=option, exact=True).click()


def test_log_in_see_the_fleet_open_a_device_and_send_a_command_until_acked(
    page: Any, dashboard: str, live_core: LiveCore, seeded_fleet: SeededFleet
) -> None:
    from playwright.sync_api import expect

    sn = next(s for s in seeded_fleet.sns if "-RTL-" in s)
    page.goto(dashboard)

    # Log in.
    expect(page.get_by_role("textbox", name="Username")).to_be_visible(timeout=WAIT_MS)
    shoot(page, "1-login")
    page.get_by_role("textbox", name="Username").fill(live_core.admin_username)
    page.get_by_role("textbox", name="Password").fill(live_core.admin_password)
    page.get_by_role("button", name="Log in").click()

    # The fleet table lists every simulated robot. The grid is drawn on a canvas; its cells are
    # also in the canvas's accessible table, which is what a screen reader reads out.
    expect(page.get_by_role("heading", name="Fleet", exact=True)).to_be_visible(timeout=WAIT_MS)
    grid = page.get_by_test_id("stDataFrame").first
    expect(grid).to_be_visible(timeout=WAIT_MS)
    for robot in seeded_fleet.sns:
        cell = page.get_by_role("gridcell", name=robot, exact=True, include_hidden=True)
        row = grid.get_by_role("row", include_hidden=True).filter(has=cell)
        expect(row).to_have_count(1, timeout=WAIT_MS)  # one row per robot
        expect(row).to_contain_text("retail" if "-RTL-" in robot else "", timeout=WAIT_MS)
    expect(page.get_by_test_id("stMetric").filter(has_text="Online")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=WAIT_MS)  # online robots by type
    shoot(page, "2-fleet")

    # One robot: its latest state and its battery drawn over time.
    open_page(page, "Device", "Device")
    choose(page, "Robot", sn)
    state = page.get_by_test_id("stMetric").filter(has_text="State")
    expect(state).to_contain_text("online", timeout=WAIT_MS)
    expect(page.get_by_test_id("stCaptionContainer").filter(has_text="name: ")).to_contain_text(sn, timeout=WAIT_MS)
    # (while a page reruns Streamlit keeps the old elements, marked stale, beside the new ones)
    charts = page.locator('[data-stale="false"] .js-plotly-plot')
    battery = charts.filter(has=page.locator(".gtitle", has_text="Battery"))
    expect(battery).to_be_visible(timeout=WAIT_MS)
    # a drawn line: an SVG path through at least two points, and the readings as markers
    expect(battery.locator(".scatterlayer .trace path.js-line").first).to_have_attribute(
        "d", re.compile(r"^M[-\d.]+,[-\d.]+L[-\d.]+,[-\d.]+"), timeout=WAIT_MS)
    assert battery.locator(".scatterlayer .trace .point").count() >= 2
    shoot(page, "3-device")

    # A command to that robot: the simulator acks it, and the page shows it reach acked.
    open_page(page, "Commands", "Commands")
    choose(page, "Robots", sn)
    page.keyboard.press("Escape")
    page.get_by_role("textbox", name="Command", exact=True).fill("move")
    page.get_by_role("textbox", name="Arguments (JSON object)").fill('{"x": 2, "y": 3}')
    page.get_by_role("button", name="Send command").click()
    done = page.get_by_test_id("stAlertContentSuccess")
    expect(done).to_contain_text(f"Sent 'move' to 1 robot(s): {sn}: c-", timeout=WAIT_MS)
    found = re.search(r"(c-[\w-]+) \(", done.inner_text())
    assert found, done.inner_text()
    command_id = found[1]
    sent_here = page.locator('.st-key-sent_from_here [data-stale="false"] [data-testid="stMarkdownContainer"]')
    watched = sent_here.filter(has_text=command_id)
    expect(watched).to_contain_text("acked", timeout=WAIT_MS)
    shoot(page, "4-commands")

    # The other pages a person can open render without errors.
    open_page(page, "Broadcast", "Broadcast")
    expect(page.get_by_role("button", name="Broadcast")).to_be_visible(timeout=WAIT_MS)
    shoot(page, "5-broadcast")
    open_page(page, "Connections & health", "Connections & health")
    expect(page.get_by_text("Core ready")).to_be_visible(timeout=WAIT_MS)
    shoot(page, "6-health")
    expect(page.get_by_test_id("stException")).to_have_count(0)
