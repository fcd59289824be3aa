"""The Streamlit dashboard end to end with streamlit.testing AppTest, against a live core.

Every test talks to the real ``fleetpush serve`` of ``live_core`` (session-scoped, with admin,
operator and viewer accounts) while the simulated robots of ``seeded_fleet`` report to it. The tests
drive the app as a person would: they log in through the form, open pages through the navigation,
fill forms, and read what is shown (texts, tables, their colours, charts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fleetkit import Client
from streamlit.testing.v1 import AppTest

from core.client import FleetClient
from dashboard.common import BAD_STYLE, OK_STYLE

if TYPE_CHECKING:  # the fixtures' types; conftest modules are not imported by name
    from livecore import LiveCore, SeededFleet

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
TIMEOUT = 30


@pytest.fixture
def app(live_core: LiveCore, seeded_fleet: SeededFleet, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """A fresh dashboard session pointed at the live core, with the simulated fleet online."""
    monkeypatch.setenv("FLEETPUSH_CORE_URL", live_core.http_url)
    monkeypatch.setenv("FLEETPUSH_DASHBOARD_REFRESH_S", "30")
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


@pytest.fixture
def admin(live_core: LiveCore) -> FleetClient:
    """An admin API client, for what the test arranges or checks behind the dashboard's back."""
    return FleetClient.connect(live_core.http_url, live_core.admin_username, live_core.admin_password)


# ---------------------------------------------------------------------------------------- helpers


def texts(at: AppTest, kind: str) -> list[str]:
    return [str(element.value) for element in getattr(at, kind)]


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def log_in(at: AppTest, username: str, password: str) -> AppTest:
    at.run()
    no_exceptions(at)
    at.text_input(key="login_username").input(username)
    at.text_input(key="login_password").input(password)
    at.button[0].click()  # the form's only button: "Log in"
    at.run()
    no_exceptions(at)
    return at


def log_in_admin(at: AppTest, core: LiveCore) -> AppTest:
    return log_in(at, core.admin_username, core.admin_password)


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    no_exceptions(at)
    return at


def button_labels(at: AppTest) -> list[str]:
    return [b.label for b in at.button]


def fleet_table(at: AppTest) -> Any:
    return next(f for f in at.dataframe if "sn" in f.value.columns and "battery" in f.value.columns)


def fleet_sns(at: AppTest) -> set[str]:
    return {sn for frame in at.dataframe if "sn" in frame.value.columns for sn in frame.value["sn"]}


_RULE = re.compile(r"([^{}]+)\{([^}]*)\}")


def cell_styles(element: Any) -> dict[tuple[int, int], str]:
    """The CSS the table shows on each (row, column) cell, from the Styler carried in the element."""
    styles: dict[tuple[int, int], str] = {}
    for selectors, body in _RULE.findall(element.proto.arrow_data.styler.styles):
        for selector in selectors.split(","):
            match = re.search(r"_row(\d+)_col(\d+)", selector)
            if match:
                styles[int(match[1]), int(match[2])] = body.strip()
    return styles


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def report_as_device(core: LiveCore, sn: str, type_: str, status: dict[str, Any]) -> None:
    """Log a robot in over the WebSocket, as firmware does, and report one status."""
    device = await Client.connect(core.ws_url)
    try:
        login = await device.login_device(sn, type_, core.fleet_secret)
        assert login["code"] == 0, login
        reply = await device.request("/api/device/status", status)
        assert reply["code"] == 0, reply
    finally:
        await device.close()


# ------------------------------------------------------------------------------------------ tests


def test_login_form_leads_to_the_fleet_table_with_every_seeded_robot(
    app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet
) -> None:
    app.run()
    assert "fleetpush_user" not in app.session_state
    assert [t.label for t in app.text_input] == ["Username", "Password"]
    log_in_admin(app, live_core)

    assert "Fleet" in texts(app, "title")
    assert set(seeded_fleet.sns) <= fleet_sns(app)
    assert "Log out" in button_labels(app)
    assert not app.error
    online = {m.label: m.value for m in app.metric}
    assert int(online["Online"]) >= len(seeded_fleet.sns)


def test_wrong_password_is_refused_in_words(app: AppTest, live_core: LiveCore) -> None:
    log_in(app, live_core.viewer_username, live_core.viewer_password + "-wrong")
    assert any("wrong username or password" in e for e in texts(app, "error"))
    assert [t.label for t in app.text_input] == ["Username", "Password"]  # still on the login form


def test_logout_returns_to_the_login_form(app: AppTest, live_core: LiveCore) -> None:
    log_in_admin(app, live_core)
    next(b for b in app.button if b.label == "Log out").click()
    app.run()
    assert [t.label for t in app.text_input] == ["Username", "Password"]
    assert any("logged out" in i for i in texts(app, "info"))


def test_fleet_filters_by_type_state_and_text(
    app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet, admin: FleetClient
) -> None:
    parked = admin.provision_device(f"E2E-PARK-{time.monotonic_ns() % 10**8}", "retail").sn  # never connects
    log_in_admin(app, live_core)
    target = seeded_fleet.sns[0]
    app.text_input(key="fleet_search").input(target.lower())
    app.run()
    assert fleet_sns(app) == {target}

    app.text_input(key="fleet_search").input("")
    app.multiselect(key="fleet_types").set_value(["dance_dog"])
    app.run()
    frame = fleet_table(app).value
    assert set(frame["type"]) == {"dance_dog"}
    assert {sn for sn in seeded_fleet.sns if "-DOG-" in sn} <= set(frame["sn"])

    app.multiselect(key="fleet_types").set_value([])
    app.selectbox(key="fleet_online").select("Offline")
    app.run()
    assert not fleet_table(app).value["online"].astype(bool).any()
    assert parked in fleet_sns(app)
    assert not set(seeded_fleet.sns) & fleet_sns(app)


def test_fleet_table_colours_codes_and_low_battery_by_severity(app: AppTest, live_core: LiveCore) -> None:
    sn = f"E2E-HOT-{time.monotonic_ns() % 10**8}"
    asyncio.run(report_as_device(live_core, sn, "rubbish", {
        "location_code": 3, "location_msg": "lost", "inspection_code": 0, "battery": 12,
    }))
    log_in_admin(app, live_core)
    app.text_input(key="fleet_search").input(sn)
    app.run()
    table = fleet_table(app)
    frame = table.value
    assert list(frame["sn"]) == [sn]
    row = frame.iloc[0]
    assert row["location_code"] == 3 and row["inspection_code"] == 0 and row["battery"] == 12
    columns = list(frame.columns)
    styles = cell_styles(table)
    assert styles[0, columns.index("location_code")] == BAD_STYLE  # a fault code: red
    assert styles[0, columns.index("battery")] == BAD_STYLE  # 12 % is below the low mark: red
    assert styles[0, columns.index("inspection_code")] == OK_STYLE  # 0 is ok: green
    assert (0, columns.index("rubbish_code")) not in styles  # never reported: no colour


def test_viewer_sees_no_command_or_broadcast_controls(
    app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet
) -> None:
    log_in(app, live_core.viewer_username, live_core.viewer_password)
    assert set(seeded_fleet.sns) <= fleet_sns(app)
    for page in ("commands", "broadcast"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            app.switch_page(f"views/{page}.py")
    open_page(app, "device")
    assert not any("command" in label.lower() for label in button_labels(app))
    open_page(app, "health")
    assert any("admins only" in i for i in texts(app, "info"))


def test_device_page_shows_latest_status_history_charts_and_commands(
    app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet, admin: FleetClient
) -> None:
    log_in_admin(app, live_core)
    sn = seeded_fleet.sns[0]
    receipt = admin.send_command(sn, "wave", args={"times": 1})
    open_page(app, "device")
    app.selectbox(key="device_sn").select(sn)
    app.run()
    no_exceptions(app)
    assert not app.error
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["State"] == "online" and metrics["Battery"].endswith("%")
    assert {"Last seen", "Type"} <= set(metrics)
    charts = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    battery = [t for chart in charts for t in chart["data"] if t.get("name") == "battery"]
    assert battery and len(battery[0]["y"]) >= 1  # the battery line has the robot's readings
    command_ids = {cid for f in app.dataframe if "command_id" in f.value.columns for cid in f.value["command_id"]}
    assert receipt.command_id in command_ids


def test_send_command_validates_json_and_reports_the_ids(
    app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet, admin: FleetClient
) -> None:
    log_in_admin(app, live_core)
    open_page(app, "commands")
    targets = seeded_fleet.sns[:2]
    app.multiselect(key="cmd_targets").set_value(targets)
    app.text_input(key="cmd_name").input("dance")
    app.text_area(key="cmd_args").input('{"style": waltz}')
    next(b for b in app.button if b.label == "Send command").click()
    app.run()
    assert any("not valid JSON" in e for e in texts(app, "error"))
    assert not app.success

    app.text_area(key="cmd_args").input('{"style": "waltz"}')
    app.number_input(key="cmd_ttl").set_value(120)
    next(b for b in app.button if b.label == "Send command").click()
    app.run()
    no_exceptions(app)
    (done,) = texts(app, "success")
    assert f"to {len(targets)} robot(s)" in done and all(sn in done for sn in targets)
    sent = [c for c in admin.commands() if c.command == "dance" and c.args == {"style": "waltz"}]
    assert {c.sn for c in sent} >= set(targets)
    # the page keeps watching what it sent: one line per command with its robot and state
    assert "Sent from here" in texts(app, "subheader")
    mine = [c for c in sent if c.command_id in done]
    lines = texts(app, "markdown")
    for c in mine:
        assert any(c.command_id in line and c.sn in line and "-badge[" in line for line in lines), lines
    assert len(mine) == len(targets)


def test_cancel_of_a_command_that_became_final_shows_the_conflict_in_words(
    app: AppTest, live_core: LiveCore, admin: FleetClient
) -> None:
    # a robot that never connects, so nothing but the test moves the command on
    offline = admin.provision_device(f"E2E-OFF-{time.monotonic_ns() % 10**8}", "retail")
    receipt = admin.send_command(offline.sn, "sit", ttl_s=600)
    log_in_admin(app, live_core)
    open_page(app, "commands")
    app.selectbox(key="cmd_cancel_id").select(receipt.command_id)
    admin.cancel_command(receipt.command_id)  # someone else was faster: now final
    next(b for b in app.button if b.label == "Cancel command").click()
    app.run()
    no_exceptions(app)
    errors = texts(app, "error")
    assert any(e.startswith(f"Could not cancel {receipt.command_id}:") for e in errors), errors
    assert not any("Traceback" in e for e in errors)


def test_an_expired_token_is_shown_in_words_and_logs_out(app: AppTest, live_core: LiveCore) -> None:
    log_in_admin(app, live_core)
    user = app.session_state["fleetpush_user"]
    app.session_state["fleetpush_user"] = dataclasses.replace(user, token="revoked-token")
    app.run()
    no_exceptions(app)
    assert any("session ended" in e for e in texts(app, "error"))
    app.run()
    assert [t.label for t in app.text_input] == ["Username", "Password"]


def test_a_session_past_its_expiry_goes_back_to_the_login_form(app: AppTest, live_core: LiveCore) -> None:
    log_in_admin(app, live_core)
    user = app.session_state["fleetpush_user"]
    app.session_state["fleetpush_user"] = dataclasses.replace(user, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    app.run()
    no_exceptions(app)
    assert [t.label for t in app.text_input] == ["Username", "Password"]
    assert any("session expired" in i for i in texts(app, "info"))


def test_a_core_that_is_down_is_shown_in_words(app: AppTest, live_core: LiveCore) -> None:
    log_in_admin(app, live_core)
    app.session_state["fleetpush_core_url"] = f"http://127.0.0.1:{free_port()}"
    app.run()
    no_exceptions(app)
    assert any("cannot reach the core" in e for e in texts(app, "error"))


def test_broadcast_reports_matched_and_queued(app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet) -> None:
    log_in_admin(app, live_core)
    open_page(app, "broadcast")
    app.radio(key="bc_kind").set_value("List of sns")
    app.run()
    app.text_area(key="bc_sns").input(", ".join(seeded_fleet.sns))
    app.radio(key="bc_format").set_value("JSON")
    app.text_area(key="bc_message").input('{"notice": "maintenance at 18:00"}')
    next(b for b in app.button if b.label == "Broadcast").click()
    app.run()
    no_exceptions(app)
    assert not app.error, texts(app, "error")
    (done,) = texts(app, "success")
    assert done.startswith(f"Matched {len(seeded_fleet.sns)} connection(s)") and "queued" in done
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Matched"] == str(len(seeded_fleet.sns))

    app.text_area(key="bc_message").input("{not json")
    next(b for b in app.button if b.label == "Broadcast").click()
    app.run()
    assert any("not valid JSON" in e for e in texts(app, "error"))


def test_health_page_shows_readiness_pushes_and_connections_to_an_admin(
    app: AppTest, live_core: LiveCore, seeded_fleet: SeededFleet
) -> None:
    log_in_admin(app, live_core)
    open_page(app, "health")
    assert not app.error, texts(app, "error")
    assert any("Core ready" in s for s in texts(app, "success"))
    assert {m.label for m in app.metric} >= {"Pushes delivered", "Pushes failed"}
    connections = next(f.value for f in app.dataframe if "queue_depth" in f.value.columns)
    assert set(seeded_fleet.sns) <= set(connections["sn"].dropna())


def test_launch_command_serves_the_dashboard_headless_on_the_given_port(live_core: LiveCore, tmp_path: Path) -> None:
    from dashboard import launch

    port = free_port()
    argv = launch.command(live_core.http_url, port)
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    env = launch.environment(live_core.http_url, base={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert env["FLEETPUSH_CORE_URL"] == live_core.http_url
    log_path = tmp_path / "dashboard.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(trust_env=False, timeout=2) as direct:  # never via a proxy
            while True:
                assert proc.poll() is None, f"the dashboard exited: {log_path.read_text()[-2000:]}"
                try:
                    if direct.get(f"http://127.0.0.1:{port}/_stcore/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the dashboard's health endpoint did not answer within 60 s"
                time.sleep(0.2)  # polling another process's HTTP endpoint
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=10) == 0, log_path.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
