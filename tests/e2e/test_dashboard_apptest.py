"""The Streamlit dashboard end to end with streamlit.testing AppTest, over real HTTP.

Every test runs against two cores, as the parameter ``backend`` says:

- ``live``: the real core from the fixtures ``live_core`` (``.http_url``, ``.admin_password``, and
  optionally ``.admin_username`` (default "admin"), ``.viewer_username``/``.viewer_password``,
  ``.operator_username``/``.operator_password``) and ``seeded_fleet`` (a few simulated devices online;
  either an object with ``.sns`` or an iterable of sns), provided by tests/conftest.py. Until those
  fixtures exist the live variant is skipped with "needs live_core fixture".
- ``stub``: a small in-memory HTTP server on 127.0.0.1 written below that answers the PROTOCOL §6
  routes the dashboard uses, so the dashboard's own logic is exercised before the core is ready.

The tests drive the app as a person would: they log in through the form, open pages through the
navigation, fill forms, and read what is shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
TIMEOUT = 30

# ------------------------------------------------------------------------------------ the stub core


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class StubState:
    """The stub core's data: users, devices with history, commands."""

    users: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            "admin": ("admin-pw", "admin"),
            "op": ("op-pw", "operator"),
            "view": ("view-pw", "viewer"),
        }
    )
    tokens: dict[str, str] = field(default_factory=dict)  # token -> username
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seed(self) -> list[str]:
        now = datetime.now(UTC)
        fleet = [
            (
                "DOG-0001",
                "dance_dog",
                "Rex",
                True,
                {"battery": 15.0, "location_code": 0, "electricity_code": 2},
            ),
            (
                "RET-0001",
                "retail",
                "Front desk",
                True,
                {"battery": 90.0, "location_code": 0, "inspection_code": 0},
            ),
            ("RUB-0001", "rubbish", None, False, {"battery": 55.0, "rubbish_code": 0}),
        ]
        for sn, kind, name, online, status in fleet:
            ts = _iso(now - timedelta(seconds=5))
            self.devices[sn] = {
                "sn": sn,
                "type": kind,
                "name": name,
                "online": online,
                "last_seen": ts,
                "connected_at": _iso(now - timedelta(hours=1)) if online else None,
                "status": {**status, "ts": ts},
            }
            self.history[sn] = [
                {
                    "sn": sn,
                    "type": kind,
                    "ts": _iso(now - timedelta(minutes=i)),
                    **status,
                    "battery": 80.0 - i,
                }
                for i in range(5)
            ]
        return [sn for sn, *_ in fleet]


_ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
_FINAL = {"acked", "failed", "expired", "canceled"}


class _Reply(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


def _fail(status: int, msg: str) -> _Reply:
    return _Reply(status, {"code": status, "msg": msg})


class StubHandler(BaseHTTPRequestHandler):
    """Answers the PROTOCOL §6 routes from a StubState."""

    state: StubState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        try:
            if url.path in ("/healthz", "/readyz"):
                raise _Reply(200, {"ok": True})
            if url.path == "/metrics":
                text = (
                    "# TYPE push_success_total counter\n"
                    'push_success_total{service="device_status"} 12.0\n'
                    'push_failure_total{service="broadcast",error_type="queue_full"} 2.0\n'
                )
                self._send(200, text.encode(), "text/plain; version=0.0.4")
                return
            with self.state.lock:
                self._route(method, parts, query, body)
        except _Reply as reply:
            self._send(reply.status, json.dumps(reply.body).encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _role(self, needed: str) -> str:
        header = self.headers.get("Authorization", "")
        username = self.state.tokens.get(header.removeprefix("Bearer "))
        if not header.startswith("Bearer ") or username is None:
            raise _fail(401, "not authenticated: missing or invalid token")
        role = self.state.users[username][1]
        if _ROLE_RANK[role] < _ROLE_RANK[needed]:
            raise _fail(403, f"role {role} may not do this")
        return username

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> None:
        s = self.state
        match method, parts:
            case "POST", ["api", "v1", "auth", "login"]:
                user = s.users.get(body.get("username", ""))
                if user is None or user[0] != body.get("password"):
                    raise _fail(401, "login failed")
                token = f"tok-{next(s.ids)}"
                s.tokens[token] = body["username"]
                expires = _iso(datetime.now(UTC) + timedelta(hours=8))
                raise _Reply(
                    200,
                    {"token": token, "username": body["username"], "role": user[1], "expires_at": expires},
                )
            case "GET", ["api", "v1", "devices"]:
                self._role("viewer")
                found = [
                    d
                    for d in s.devices.values()
                    if query.get("type") in (None, d["type"])
                    and query.get("online") in (None, "true" if d["online"] else "false")
                ]
                raise _Reply(200, {"devices": found})
            case "POST", ["api", "v1", "devices"]:
                self._role("admin")
                sn = body["sn"]
                if sn in s.devices:
                    raise _fail(409, f"device {sn} exists")
                s.devices[sn] = {
                    "sn": sn,
                    "type": body["type"],
                    "name": body.get("name"),
                    "online": False,
                    "status": {},
                }
                raise _Reply(201, {"sn": sn, "type": body["type"], "secret": "s3cret"})
            case "GET", ["api", "v1", "devices", sn]:
                self._role("viewer")
                if sn not in s.devices:
                    raise _fail(404, f"unknown device {sn}")
                raise _Reply(200, s.devices[sn])
            case "GET", ["api", "v1", "devices", sn, "status"]:
                self._role("viewer")
                raise _Reply(200, {"snapshots": s.history.get(sn, [])[: int(query.get("limit", 500))]})
            case "POST", ["api", "v1", "devices", sn, "commands"]:
                who = self._role("operator")
                if sn not in s.devices:
                    raise _fail(404, f"unknown device {sn}")
                now = datetime.now(UTC)
                cid = f"c-{next(s.ids)}"
                s.commands[cid] = {
                    "command_id": cid,
                    "sn": sn,
                    "command": body["command"],
                    "args": body.get("args", {}),
                    "state": "pending",
                    "created_at": _iso(now),
                    "sent_at": None,
                    "acked_at": None,
                    "expires_at": _iso(now + timedelta(seconds=body.get("ttl_s", 300))),
                    "attempts": 0,
                    "result": None,
                    "issued_by": who,
                }
                raise _Reply(202, {"command_id": cid, "state": "pending"})
            case "GET", ["api", "v1", "commands"]:
                self._role("viewer")
                found = [
                    c
                    for c in s.commands.values()
                    if query.get("sn") in (None, c["sn"]) and query.get("state") in (None, c["state"])
                ]
                raise _Reply(200, {"commands": found})
            case "GET", ["api", "v1", "commands", cid]:
                self._role("viewer")
                if cid not in s.commands:
                    raise _fail(404, f"unknown command {cid}")
                raise _Reply(200, s.commands[cid])
            case "POST", ["api", "v1", "commands", cid, "cancel"]:
                self._role("operator")
                command = s.commands.get(cid)
                if command is None:
                    raise _fail(404, f"unknown command {cid}")
                if command["state"] in _FINAL:
                    raise _fail(409, f"command {cid} is already {command['state']}")
                command["state"] = "canceled"
                raise _Reply(200, command)
            case "POST", ["api", "v1", "broadcasts"]:
                self._role("operator")
                target = body.get("target") or {}
                if ("username" in target or "role" in target) and self._role("viewer") not in ("admin",):
                    raise _fail(403, "target.username needs admin")
                matched = [
                    d
                    for d in s.devices.values()
                    if d["online"]
                    and target.get("type") in (None, d["type"])
                    and (not target.get("sns") or d["sn"] in target["sns"])
                ]
                raise _Reply(200, {"matched": len(matched), "queued": len(matched)})
            case "GET", ["api", "v1", "connections"]:
                self._role("admin")
                conns = [
                    {
                        "id": f"k-{d['sn']}",
                        "kind": "device",
                        "sn": d["sn"],
                        "remote": "127.0.0.1:5000",
                        "connected_at": d["connected_at"],
                        "queue_depth": 1,
                    }
                    for d in s.devices.values()
                    if d["online"]
                ]
                raise _Reply(200, {"connections": conns})
            case "GET", ["api", "v1", "stats"]:
                self._role("viewer")
                online: dict[str, int] = {}
                for d in s.devices.values():
                    online[d["type"]] = online.get(d["type"], 0) + int(d["online"])
                raise _Reply(200, {"connections": sum(online.values()), "devices_online": online, "messages_in": 42})
        raise _fail(404, f"no route {method} /{'/'.join(parts)}")


@dataclass
class CoreUnderTest:
    """What the tests need to know about a core: where it is, who may log in, which robots exist."""

    backend: str
    http_url: str
    admin_username: str
    admin_password: str
    sns: list[str]
    viewer: tuple[str, str] | None
    operator: tuple[str, str] | None


@pytest.fixture(scope="module")
def stub_core() -> Iterator[CoreUnderTest]:
    state = StubState()
    sns = state.seed()
    handler = type("BoundStubHandler", (StubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield CoreUnderTest(
            backend="stub",
            http_url=f"http://127.0.0.1:{server.server_address[1]}",
            admin_username="admin",
            admin_password="admin-pw",
            sns=sns,
            viewer=("view", "view-pw"),
            operator=("op", "op-pw"),
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _credentials(live: Any, role: str) -> tuple[str, str] | None:
    username, password = getattr(live, f"{role}_username", None), getattr(live, f"{role}_password", None)
    return (username, password) if username and password else None


@pytest.fixture(params=["stub", "live"])
def core(request: pytest.FixtureRequest) -> CoreUnderTest:
    """The core the dashboard talks to: the in-test stub, or the live core from tests/conftest.py."""
    if request.param == "stub":
        stub: CoreUnderTest = request.getfixturevalue("stub_core")
        return stub
    try:
        live = request.getfixturevalue("live_core")
        fleet = request.getfixturevalue("seeded_fleet")
    except pytest.FixtureLookupError:
        pytest.skip("needs live_core fixture")
    sns = list(getattr(fleet, "sns", fleet))
    assert sns, "seeded_fleet gave no devices"
    return CoreUnderTest(
        backend="live",
        http_url=live.http_url,
        admin_username=getattr(live, "admin_username", "admin"),
        admin_password=live.admin_password,
        sns=[str(sn) for sn in sns],
        viewer=_credentials(live, "viewer"),
        operator=_credentials(live, "operator"),
    )


@pytest.fixture
def app(core: CoreUnderTest, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """A fresh dashboard session pointed at the core."""
    monkeypatch.setenv("FLEETPUSH_CORE_URL", core.http_url)
    monkeypatch.setenv("FLEETPUSH_DASHBOARD_REFRESH_S", "30")
    monkeypatch.setenv("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


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


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    no_exceptions(at)
    return at


def button_labels(at: AppTest) -> list[str]:
    return [b.label for b in at.button]


def fleet_sns(at: AppTest) -> set[str]:
    return {sn for frame in at.dataframe if "sn" in frame.value.columns for sn in frame.value["sn"]}


# ------------------------------------------------------------------------------------------ tests


def test_login_form_leads_to_the_fleet_table_with_every_seeded_robot(app: AppTest, core: CoreUnderTest) -> None:
    app.run()
    assert "fleetpush_user" not in app.session_state
    assert [t.label for t in app.text_input] == ["Username", "Password"]
    log_in(app, core.admin_username, core.admin_password)

    assert "Fleet" in texts(app, "title")
    assert set(core.sns) <= fleet_sns(app)
    assert "Log out" in button_labels(app)
    assert not app.error


def test_wrong_password_is_refused_in_words(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password + "-wrong")
    assert any("wrong username or password" in e for e in texts(app, "error"))
    assert [t.label for t in app.text_input] == ["Username", "Password"]  # still on the login form


def test_logout_returns_to_the_login_form(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    next(b for b in app.button if b.label == "Log out").click()
    app.run()
    assert [t.label for t in app.text_input] == ["Username", "Password"]
    assert any("logged out" in i for i in texts(app, "info"))


def test_fleet_filters_by_type_and_text(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    target = core.sns[0]
    app.text_input(key="fleet_search").input(target.lower())
    app.run()
    assert fleet_sns(app) == {target}

    app.text_input(key="fleet_search").input("")
    app.selectbox(key="fleet_online").select("Offline")
    app.run()
    frame = next(f.value for f in app.dataframe if "sn" in f.value.columns)
    assert not frame["online"].astype(bool).any()


def test_fleet_table_colours_codes_and_low_battery(app: AppTest, core: CoreUnderTest) -> None:
    if core.backend != "stub":
        pytest.skip("colours are checked on the stub's known codes")
    log_in(app, core.admin_username, core.admin_password)
    frame = next(f.value for f in app.dataframe if "sn" in f.value.columns)
    dog = frame[frame["sn"] == "DOG-0001"].iloc[0]
    assert dog["electricity_code"] == 2 and dog["battery"] == 15.0
    # the styler's colours travel in the element's proto as CSS; red for code 2 and battery 15
    styles = str(next(f for f in app.dataframe if "sn" in f.value.columns).proto)
    assert "#f8d7da" in styles and "#d4edda" in styles


def test_viewer_sees_no_command_or_broadcast_controls(app: AppTest, core: CoreUnderTest) -> None:
    if core.viewer is None:
        pytest.skip("live_core has no viewer account (viewer_username/viewer_password)")
    log_in(app, *core.viewer)
    assert set(core.sns) <= fleet_sns(app)
    for page in ("commands", "broadcast"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            app.switch_page(f"views/{page}.py")
    open_page(app, "device")
    assert not any("command" in label.lower() for label in button_labels(app))
    open_page(app, "health")
    assert any("admins only" in i for i in texts(app, "info"))


def test_device_page_shows_latest_status_history_and_commands(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    sn = core.sns[0]
    client = _client(core)
    receipt = client.send_command(sn, "wave", args={"times": 1})
    open_page(app, "device")
    app.selectbox(key="device_sn").select(sn)
    app.run()
    no_exceptions(app)
    assert not app.error
    assert {m.label for m in app.metric} >= {"State", "Battery", "Last seen"}
    if core.backend == "stub":
        assert len(app.get("plotly_chart")) == 2  # battery line + code steps
    command_ids = {cid for f in app.dataframe if "command_id" in f.value.columns for cid in f.value["command_id"]}
    assert receipt.command_id in command_ids


def test_send_command_validates_json_and_reports_the_ids(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    open_page(app, "commands")
    targets = core.sns[:2]
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
    sent = [c for c in _client(core).commands() if c.command == "dance" and c.args == {"style": "waltz"}]
    assert {c.sn for c in sent} >= set(targets)


def test_cancel_of_a_command_that_became_final_shows_the_conflict_in_words(app: AppTest, core: CoreUnderTest) -> None:
    client = _client(core)
    # a robot that never connects, so nothing but the test moves the command on
    offline = client.provision_device(f"E2E-OFF-{time.monotonic_ns()}", "retail")
    receipt = client.send_command(offline.sn, "sit", ttl_s=600)
    log_in(app, core.admin_username, core.admin_password)
    open_page(app, "commands")
    app.selectbox(key="cmd_cancel_id").select(receipt.command_id)
    client.cancel_command(receipt.command_id)  # someone else was faster: now final
    next(b for b in app.button if b.label == "Cancel command").click()
    app.run()
    no_exceptions(app)
    errors = texts(app, "error")
    assert any(e.startswith(f"Could not cancel {receipt.command_id}:") for e in errors), errors
    assert not any("Traceback" in e for e in errors)


def test_an_expired_token_is_shown_in_words_and_logs_out(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    user = app.session_state["fleetpush_user"]
    app.session_state["fleetpush_user"] = dataclasses.replace(user, token="revoked-token")
    app.run()
    no_exceptions(app)
    assert any("session ended" in e for e in texts(app, "error"))
    app.run()
    assert [t.label for t in app.text_input] == ["Username", "Password"]


def test_a_session_past_its_expiry_goes_back_to_the_login_form(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    user = app.session_state["fleetpush_user"]
    app.session_state["fleetpush_user"] = dataclasses.replace(user, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    app.run()
    no_exceptions(app)
    assert [t.label for t in app.text_input] == ["Username", "Password"]
    assert any("session expired" in i for i in texts(app, "info"))


def test_a_core_that_is_down_is_shown_in_words(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    app.session_state["fleetpush_core_url"] = f"http://127.0.0.1:{_free_port()}"
    app.run()
    no_exceptions(app)
    assert any("cannot reach the core" in e for e in texts(app, "error"))


def test_broadcast_reports_matched_and_queued(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    open_page(app, "broadcast")
    app.radio(key="bc_kind").set_value("List of sns")
    app.run()
    app.text_area(key="bc_sns").input(", ".join(core.sns))
    app.radio(key="bc_format").set_value("JSON")
    app.text_area(key="bc_message").input('{"notice": "maintenance at 18:00"}')
    next(b for b in app.button if b.label == "Broadcast").click()
    app.run()
    no_exceptions(app)
    assert not app.error, texts(app, "error")
    (done,) = texts(app, "success")
    assert done.startswith("Matched ") and "queued" in done
    assert {m.label for m in app.metric} >= {"Matched", "Queued"}

    app.text_area(key="bc_message").input("{not json")
    next(b for b in app.button if b.label == "Broadcast").click()
    app.run()
    assert any("not valid JSON" in e for e in texts(app, "error"))


def test_health_page_shows_readiness_pushes_and_connections_to_an_admin(app: AppTest, core: CoreUnderTest) -> None:
    log_in(app, core.admin_username, core.admin_password)
    open_page(app, "health")
    assert not app.error, texts(app, "error")
    assert any("Core ready" in s for s in texts(app, "success"))
    assert {m.label for m in app.metric} >= {"Pushes delivered", "Pushes failed"}
    connection_sns = {sn for f in app.dataframe if "queue_depth" in f.value.columns for sn in f.value["sn"].dropna()}
    if core.backend == "stub":
        assert connection_sns == {"DOG-0001", "RET-0001"}
        assert "12" in {m.value for m in app.metric}


def test_launch_command_serves_the_dashboard_headless_on_the_given_port(core: CoreUnderTest, tmp_path: Path) -> None:
    if core.backend != "stub":
        pytest.skip("the launch command is checked once")
    from dashboard import launch

    port = _free_port()
    argv = launch.command(core.http_url, port)
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    env = launch.environment(core.http_url, base={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert env["FLEETPUSH_CORE_URL"] == core.http_url
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                direct.open(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply,
            ):
                assert reply.status == 200
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "exited"
            assert time.monotonic() < deadline, "dashboard did not come up within 60 s"
            time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------- plumbing


def _client(core: CoreUnderTest) -> Any:
    from core.client import FleetClient

    return FleetClient.connect(core.http_url, core.admin_username, core.admin_password)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
