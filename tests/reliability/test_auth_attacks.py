"""Auth attacks not covered in tests/integration: every ops service with every too-small role, a device
reporting as another, brute force over HTTP and WebSocket together, and a whole scenario's logs
scanned for every credential it used (every logger, at DEBUG)."""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import Core, make_settings
from fleetkit import ADMIN_PASSWORD, FLEET_SECRET, Client
from relkit import LagProbe

from core.auth import device_token, role_allows
from core.clock import ManualClock
from core.logs import JsonFormatter, RedactingFilter, TextFormatter
from core.services import SERVICE_TABLE

ROLES = ("viewer", "operator", "admin")
PASSWORDS = {"viewer": "viewer-password-1", "operator": "operator-password-1", "admin": ADMIN_PASSWORD}

# Values that pass validation for every service, so a denial can only come from the access check.
VALID: dict[str, dict[str, Any]] = {
    "/api/user/login": {"sn": "X-1", "timestamp": 1, "token": "00", "type": "retail"},
    "/api/device/status": {"battery": 50},
    "/api/device/heartbeat": {},
    "/api/command/ack": {"command_id": "c-1", "ok": True},
    "/admin/auth/login": {"username": "u", "password": "p"},
    "/admin/device/list": {},
    "/admin/device/history": {"sn": "VICTIM-1"},
    "/admin/device/subscribe": {},
    "/admin/device/unsubscribe": {},
    "/admin/device/command": {"sn": "VICTIM-1", "command": "self_destruct"},
    "/admin/push/broadcast": {"service": "pwned", "message": "hi"},
}


async def _ops_as(core: Core, role: str) -> Client:
    if role != "admin":
        await core.app.deps.auth.create_user(f"u-{role}", PASSWORDS[role], role)
    return await core.ops("admin" if role == "admin" else f"u-{role}", PASSWORDS[role])


async def test_every_ops_service_refuses_every_smaller_role(core: Core) -> None:
    assert {r.service for r in SERVICE_TABLE} == set(VALID)  # a new service must be added here
    victim = await core.device("VICTIM-1")
    clients = {role: await _ops_as(core, role) for role in ROLES}
    anon = await core.client()
    checked = 0
    for rule in SERVICE_TABLE:
        if rule.access in ("none", "device"):
            continue
        for role in ROLES:
            r = await clients[role].request(rule.service, VALID[rule.service])
            if role_allows(role, rule.access):
                assert r["code"] not in (401, 403), (rule.service, role, r)
            else:
                assert r["code"] == 403 and r["result"] is False, (rule.service, role, r)
                checked += 1
        assert (await anon.request(rule.service, VALID[rule.service]))["code"] == 401, rule.service
        assert (await victim.request(rule.service, VALID[rule.service]))["code"] == 403, rule.service
    assert checked >= 2  # at least the two operator services against a viewer
    # Device services refuse ops connections of every role, and anonymous ones.
    for rule in SERVICE_TABLE:
        if rule.access == "device":
            for role in ROLES:
                assert (await clients[role].request(rule.service, VALID[rule.service]))["code"] == 403
            assert (await anon.request(rule.service, VALID[rule.service]))["code"] == 401
    # The refusals did nothing: connections kept, the only commands are the operator's and the admin's.
    commands = await core.app.deps.store.list_commands("VICTIM-1", None)
    assert sorted(c["issued_by"] for c in commands) == ["admin", "u-operator"]
    for c in (*clients.values(), anon, victim):
        assert not c.closed.done()


async def test_a_viewer_broadcast_reaches_nobody(core: Core) -> None:
    victim = await core.device("VICTIM-2")
    viewer = await _ops_as(core, "viewer")
    r = await viewer.request("/admin/push/broadcast", {"service": "pwned", "message": "hi"})
    assert r["code"] == 403
    # A round trip after the refused broadcast: anything it had pushed would be queued before this reply.
    assert (await victim.request("/api/device/heartbeat"))["code"] == 0
    assert [f for f in victim.frames if f.get("service") == "pwned"] == []


async def test_a_device_cannot_report_or_log_in_as_another(core: Core) -> None:
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {})
    other = await core.device("OTHER-1")
    await ops.push("device_online")
    mallory = await core.device("MAL-1")
    await ops.push("device_online")
    r = await mallory.request("/api/device/status", {"sn": "OTHER-1", "battery": 1})
    assert r["code"] == 403 and r["result"] is False
    assert await core.app.deps.store.history("OTHER-1", None, None, 10) == []
    # Its own sn, given explicitly, is fine; the push names the real sender.
    assert (await mallory.request("/api/device/status", {"sn": "MAL-1", "battery": 2}))["code"] == 0
    push = await ops.push("device_status")
    assert push["values"]["sn"] == "MAL-1" and push["values"]["battery"] == 2
    # A logged-in connection cannot switch identity with a second login, even with a valid token.
    ts = int(time.time()) + 1
    again = await mallory.request("/api/user/login", {"sn": "OTHER-1", "timestamp": ts, "type": "retail",
                                                       "token": device_token(FLEET_SECRET, "OTHER-1", ts)})
    assert again["code"] == 409
    assert core.app.deps.hub.device("OTHER-1") is not None and not other.closed.done()
    # Nor become an ops user on the same connection.
    assert (await mallory.login_ops())["code"] == 409


async def test_brute_force_over_http_and_ws_shares_one_throttle(core_factory: Callable[..., Any]) -> None:
    clock = ManualClock(start=time.time())
    # The anonymous WS connection must outlive the 61 s jump below: no login deadline, no heartbeat cut.
    settings = make_settings(heartbeat={"timeout_s": 10_000, "interval_s": 5_000}, auth={"login_timeout_s": 10_000})
    core = await core_factory(settings, clock=clock)
    ws = await core.client()
    async with httpx.AsyncClient(base_url=core.http_url, timeout=5) as http:
        for i in range(3):
            r = await http.post("/api/v1/auth/login", json={"username": "admin", "password": f"guess-{i}"})
            assert r.status_code == 401
        for i in range(2):
            assert (await ws.login_ops("admin", f"guess-ws-{i}"))["code"] == 401
        # Five failures in the minute, split over both doors: both are shut, even for the right password.
        r = await http.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert r.status_code == 429 and r.json()["code"] == 429
        assert (await ws.login_ops("admin", ADMIN_PASSWORD))["code"] == 429
        # Another user is not locked out by the attack on admin.
        await core.app.deps.auth.create_user("olga", "olga-password-1", "operator")
        assert (await http.post("/api/v1/auth/login", json={"username": "olga",
                                                            "password": "olga-password-1"})).status_code == 200
        clock.advance(61)
        assert (await ws.login_ops("admin", ADMIN_PASSWORD))["code"] == 0
        r = await http.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert r.status_code == 200


async def test_twenty_concurrent_logins_hash_off_the_loop(core_factory: Callable[..., Any]) -> None:
    # Costly hashing (argon2id, 64 MiB, t=3: 0.2-0.5 s per verify here), so one hash on the loop would show;
    # the handler timeout is raised since 20 such hashes queue behind the 2 hashing threads.
    core = await core_factory(make_settings(auth={"argon2_time_cost": 3, "argon2_memory_kib": 65536},
                                            limits={"rate_per_s": 100000, "rate_burst": 100000,
                                                    "handler_timeout_s": 60}))
    for k in range(4):
        await core.app.deps.auth.create_user(f"crowd-{k}", f"crowd-password-{k}", "viewer")
    dev = await core.device("PING-1")
    clients = [await core.client() for _ in range(20)]
    probe = LagProbe()
    probe.start()
    logins = asyncio.gather(*(c.request("/admin/auth/login", {"username": f"crowd-{i % 4}",
                                                                "password": f"crowd-password-{i % 4}"}, timeout=60)
                              for i, c in enumerate(clients)))
    pings = []
    while not logins.done() and len(pings) < 3000:
        start = time.perf_counter()
        assert (await dev.request("/api/device/heartbeat"))["code"] == 0
        pings.append(time.perf_counter() - start)
        await asyncio.sleep(0.02)  # a device's pace, so the pings do not compete with the hashing for CPU
    replies = await logins
    lag = await probe.stop()
    assert [r["code"] for r in replies] == [0] * 20
    assert len(pings) >= 3  # the device was served while the hashes ran
    assert statistics.median(pings) < 0.05, statistics.median(pings)
    assert lag < 0.1, lag


# ------------------------------------------------------------------ logs of a whole scenario


class _Everything(logging.Handler):
    """Keeps every record that reaches it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def every_log() -> Iterator[_Everything]:
    """A DEBUG handler on the root logger and on every logger that does not propagate to it."""
    handler = _Everything()
    root = logging.getLogger()
    saved = {"": root.level}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    extra: list[logging.Logger] = []
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            saved[name] = lg.level
            lg.setLevel(logging.DEBUG)
            if not lg.propagate:
                lg.addHandler(handler)
                extra.append(lg)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for lg in extra:
            lg.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name or None).setLevel(level)


# The test's own client libraries log the URLs and frames the test sends; they are not the server.
_CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client", "hpack", "asyncio")


def _rendered(records: list[logging.LogRecord]) -> str:
    """Each server record raw (message, args, every attribute, traceback) and as the server formats it."""
    out = []
    text_fmt, json_fmt, redact = TextFormatter(), JsonFormatter(), RedactingFilter()
    for rec in records:
        if rec.name.startswith(_CLIENT_LOGGERS):
            continue
        raw = {k: str(v) for k, v in rec.__dict__.items()}
        out.append(rec.getMessage())
        out.append(json.dumps(raw))
        if rec.exc_info:
            out.append(logging.Formatter().formatException(rec.exc_info))
        redact.filter(rec)
        out.append(text_fmt.format(rec))
        out.append(json_fmt.format(rec))
    return "\n".join(out)


async def test_no_credential_in_any_log_of_a_whole_scenario(
    core_factory: Callable[..., Any], every_log: _Everything
) -> None:
    api_key = "scenario-api-key-0123456789abcdef"
    clock = ManualClock(start=time.time())
    settings = make_settings(api={"keys": [{"name": "ci", "key": api_key, "role": "admin"}]},
                             auth={"session_ttl_s": 600}, heartbeat={"timeout_s": 10_000, "interval_s": 5_000})
    core = await core_factory(settings, clock=clock)
    secrets: list[str] = [FLEET_SECRET, ADMIN_PASSWORD, api_key]
    async with httpx.AsyncClient(base_url=core.http_url, timeout=5) as http:
        admin_http = {"Authorization": f"Bearer {api_key}"}
        created = (await http.post("/api/v1/devices", json={"sn": "LOG-1", "type": "retail"}, headers=admin_http))
        prov = created.json()["secret"]
        secrets.append(prov)
        ts = int(clock.time())
        good_token = device_token(prov, "LOG-1", ts)
        bad_token = device_token("not-the-secret-000111", "LOG-1", ts)
        secrets += [good_token, bad_token, "not-the-secret-000111"]
        dev = await core.client()
        assert (await dev.request("/api/user/login", {"sn": "LOG-1", "timestamp": ts, "token": bad_token,
                                                      "type": "retail"}))["code"] == 401
        assert (await dev.request("/api/user/login", {"sn": "LOG-1", "timestamp": ts, "token": good_token,
                                                      "type": "retail"}))["code"] == 0
        replay = await core.client()  # the same token again: a replay, refused
        assert (await replay.request("/api/user/login", {"sn": "LOG-1", "timestamp": ts, "token": good_token,
                                                         "type": "retail"}))["code"] == 401
        fleet = await core.client()
        assert (await fleet.login_device("LOG-FLEET-1", timestamp=ts))["code"] == 0
        secrets.append(device_token(FLEET_SECRET, "LOG-FLEET-1", ts))
        # Ops: a wrong password on both doors, then the right one; tokens used as bearers and in a query.
        await core.app.deps.auth.create_user("olga", "olga-secret-password-1", "operator")
        secrets.append("olga-secret-password-1")
        ops = await core.client()
        assert (await ops.login_ops("olga", "olga-typo-password-9"))["code"] == 401
        assert (await http.post("/api/v1/auth/login", json={"username": "olga",
                                                            "password": "olga-typo-password-8"})).status_code == 401
        secrets += ["olga-typo-password-9", "olga-typo-password-8"]
        ws_token = (await ops.login_ops("olga", "olga-secret-password-1"))["values"]["token"]
        login = await http.post("/api/v1/auth/login", json={"username": "olga", "password": "olga-secret-password-1"})
        http_token = login.json()["token"]
        secrets += [ws_token, http_token]
        bearer = {"Authorization": f"Bearer {http_token}"}
        # A token in a query string (refused: an unknown parameter) must not reach the access log either.
        assert (await http.get(f"/api/v1/devices?token={ws_token}", headers=bearer)).status_code == 400
        assert (await http.get("/api/v1/devices", headers={"Authorization": "Bearer wrong-bearer-7777777"})
                ).status_code == 401
        secrets.append("wrong-bearer-7777777")
        r = await http.post("/api/v1/devices/LOG-1/commands", json={"command": "dock"}, headers=bearer)
        assert r.status_code == 202
        await dev.push("device_command")
        # A request whose values carry a password-looking field, refused by validation.
        await ops.request("/admin/device/list", {"password": "field-password-4242"})
        secrets.append("field-password-4242")
        # Rotation: the device is closed with 4401, the new secret is shown once, to the caller only.
        rotated = (await http.post("/api/v1/devices/LOG-1/secret", headers=admin_http)).json()["secret"]
        secrets.append(rotated)
        assert await dev.close_code() == 4401
        # Session expiry on the WebSocket.
        clock.advance(601)
        core.app.gateway.sweep()
        assert await ops.close_code() == 4401
        assert (await http.get("/api/v1/devices", headers=bearer)).status_code == 401
    text = _rendered(every_log.records)
    assert len(every_log.records) > 20 and "auth/login" in text  # the capture did see the server's logs
    leaked = [s for s in secrets if s in text]
    assert leaked == []
    prefixes = [s[:16] for s in secrets if len(s) >= 32]  # a truncated credential is still a leak
    assert [p for p in prefixes if p in text] == []
