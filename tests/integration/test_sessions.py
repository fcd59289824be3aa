"""Envelope errors, device and ops login, replacement, sessions — over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from conftest import Core, make_settings
from fleetkit import ADMIN_PASSWORD, FLEET_SECRET, Client

from core.auth import device_token
from core.clock import ManualClock


async def test_malformed_envelopes_get_400_and_the_connection_lives(core: Core) -> None:
    c = await core.device("RET-0001")
    bad = [
        ("not json at all", None),
        ("[1,2,3]", None),
        ('{"service": 42, "request_id": "a"}', "a"),
        ('{"op": "galbot_push", "service": "/api/device/status", "request_id": 7}', 7),
        ('{"service": "/api/device/status", "request_id": "n", "values": {"battery": NaN}}', None),
        ('{"service": "/api/device/status", "values": {"battery": ' + "1" * 5000 + "}}", None),
        ('{"service": "/api/device/status", "values": ' + "[" * 200 + "]" * 200 + "}", None),
        ('{"service": "/api/device/status", "service": "/x"}', None),
        ('{"service": "/api/device/status", "values": "x", "request_id": 3.5}', 3.5),
    ]
    for text, rid in bad:
        await c.send_raw(text)
        reply = await c.push(timeout=5)
        assert reply["op"] == "galbot_response" and reply["code"] == 400 and reply["result"] is False, text
        assert reply["request_id"] == rid and type(reply["request_id"]) is type(rid), text
        assert reply["msg"]
    r = await c.request("/api/device/status", {"battery": "full"}, request_id=99)
    assert r["code"] == 400 and r["values"]["errors"][0]["field"] == "battery" and r["request_id"] == 99
    r = await c.request("/api/device/status", {})
    assert r["code"] == 400
    r = await c.request("/no/such/service", {})
    assert r["code"] == 404
    assert (await c.request("/api/device/status", {"battery": 40}))["code"] == 0


async def test_device_login_failures_are_uniform(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(auth={"device_secret": ""}))
    c = await core.client()
    now = int(time.time())
    cases = {
        "unknown sn": {"sn": "GHOST-1", "timestamp": now, "token": device_token("x", "GHOST-1", now)},
    }
    await core.app.deps.store.create_device("DOG-1", "dance_dog", "Dog", "per-device-secret", _now())
    good = device_token("per-device-secret", "DOG-1", now)
    cases["bad hmac"] = {"sn": "DOG-1", "timestamp": now, "token": device_token("wrong", "DOG-1", now)}
    cases["truncated"] = {"sn": "DOG-1", "timestamp": now, "token": good[:40]}
    cases["non-hex"] = {"sn": "DOG-1", "timestamp": now, "token": "zz" * 32}
    cases["fleet secret for a provisioned device"] = {
        "sn": "DOG-1", "timestamp": now, "token": device_token(FLEET_SECRET, "DOG-1", now)}
    msgs = set()
    for name, values in cases.items():
        r = await c.request("/api/user/login", {**values, "type": "dance_dog"})
        assert r["code"] == 401, name
        msgs.add(r["msg"])
    assert len(msgs) == 1  # nothing tells an attacker which part was wrong
    r = await c.request("/api/user/login", {"sn": "DOG-1", "timestamp": now, "token": good, "type": "dance_dog"})
    assert r["code"] == 0
    assert set(r["values"]) == {"sn", "type", "session_id", "heartbeat_interval_s", "server_time"}
    assert r["values"]["sn"] == "DOG-1" and r["values"]["type"] == "dance_dog"


def _now() -> Any:
    from core.clock import utc

    return utc(time.time())


async def test_timestamp_window_and_replay(core_factory: Callable[..., Any]) -> None:
    # The server's clock stands still, so "301 s off" is exact however slow the machine is.
    now = int(time.time())
    core = await core_factory(clock=ManualClock(start=float(now)))
    c = await core.client()
    for ts in (now - 301, now + 301):
        r = await c.login_device("RET-1", timestamp=ts)
        assert r["code"] == 401
        assert r["values"]["server_time"] == now  # so the robot can resync its clock
    edge = await core.client()
    assert (await edge.login_device("RET-2", timestamp=now + 300))["code"] == 0  # the window's edge is inside
    assert (await c.login_device("RET-1", timestamp=now - 290))["code"] == 0
    other = await core.client()
    r = await other.login_device("RET-1", timestamp=now - 290)
    assert r["code"] == 401 and "used" in r["msg"]


async def test_racing_replay_exactly_one_wins(core: Core) -> None:
    clients = [await core.client() for _ in range(6)]
    ts = int(time.time())
    replies = await asyncio.gather(*(c.login_device("RACE-1", timestamp=ts) for c in clients))
    assert sorted(r["code"] for r in replies) == [0, 401, 401, 401, 401, 401]


async def test_unknown_device_registers_with_its_type_via_fleet_secret(core: Core) -> None:
    c = await core.device("RUB-7", "rubbish")
    doc = await core.app.deps.store.get_device("RUB-7")
    assert doc is not None and doc["type"] == "rubbish" and doc["online"] is True
    bad = await core.client()
    r = await bad.login_device("NEW-1", "spaceship")
    assert r["code"] == 400 and r["values"]["errors"][0]["field"] == "type"
    assert await core.app.deps.store.get_device("NEW-1") is None
    await c.close()


async def test_newer_login_replaces_older_4409(core: Core) -> None:
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {"sns": ["DOG-1"]})
    first = await core.device("DOG-1", "dance_dog")
    await ops.push("device_online")
    second = await core.device("DOG-1", "dance_dog")
    assert await first.close_code() == 4409
    off = await ops.push("device_offline")
    assert off["values"]["reason"] == "replaced"
    on = await ops.push("device_online")
    assert on["values"]["sn"] == "DOG-1"
    assert (await second.request("/api/device/status", {"battery": 10}))["code"] == 0
    doc = await core.app.deps.store.get_device("DOG-1")
    assert doc is not None and doc["online"] is True
    assert core.app.deps.hub.device("DOG-1") is not None


async def test_ops_login_uniform_401_then_429(core: Core) -> None:
    c = await core.client()
    unknown = await c.login_ops("nobody", "x")
    wrong = await c.login_ops("admin", "wrong")
    assert unknown["code"] == wrong["code"] == 401 and unknown["msg"] == wrong["msg"]
    for _ in range(4):
        assert (await c.login_ops("admin", "wrong"))["code"] == 401
    assert (await c.login_ops("admin", "wrong"))["code"] == 429
    assert (await c.login_ops("admin", ADMIN_PASSWORD))["code"] == 429  # even the right password, for now
    other = await core.client()
    await core.app.deps.auth.create_user("vera", "vera-password", "viewer")
    assert (await other.login_ops("vera", "vera-password"))["code"] == 0


async def test_ops_token_is_an_http_bearer_and_roles_apply(core: Core) -> None:
    await core.app.deps.auth.create_user("vera", "vera-password", "viewer")
    c = await core.client()
    r = await c.login_ops("vera", "vera-password")
    assert r["values"]["role"] == "viewer" and r["values"]["username"] == "vera" and r["values"]["expires_at"]
    token = r["values"]["token"]
    async with httpx.AsyncClient(base_url=core.http_url) as http:
        ok = await http.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        denied = await http.get("/api/v1/connections", headers={"Authorization": f"Bearer {token}"})
        assert denied.status_code == 403 and denied.json()["code"] == 403
    for service, values in [
        ("/admin/device/command", {"sn": "X-1", "command": "dock"}),
        ("/admin/push/broadcast", {"message": "hi"}),
    ]:
        rr = await c.request(service, values)
        assert rr["code"] == 403, service
    assert (await c.request("/admin/device/list", {}))["code"] == 0


async def test_session_expiry_closes_4401(core_factory: Callable[..., Any]) -> None:
    clock = ManualClock(start=time.time())
    settings = make_settings(auth={"session_ttl_s": 60}, heartbeat={"timeout_s": 600, "interval_s": 300})
    core = await core_factory(settings, clock=clock)
    ops = await core.ops()
    token = ops.frames[-1]["values"]["token"]
    clock.advance(61)
    assert await ops.close_code() == 4401
    async with httpx.AsyncClient(base_url=core.http_url) as http:
        r = await http.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


async def test_no_secret_in_any_log(core: Core, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    prov_secret = "provisioned-secret-value-123456"
    await core.app.deps.store.create_device("SEC-1", "retail", "S", prov_secret, _now())
    c = await core.client()
    await c.login_device("SEC-1", secret=prov_secret)
    bad = await core.client()
    await bad.login_device("SEC-1", secret="wrong-secret-value-98765")
    ops = await core.client()
    r = await ops.login_ops("admin", ADMIN_PASSWORD)
    token = r["values"]["token"]
    await ops.login_ops("admin", "typo-password-abc")
    async with httpx.AsyncClient(base_url=core.http_url) as http:
        await http.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        await http.get("/api/v1/devices?token=" + token, headers={"Authorization": f"Bearer {token}"})
        created = await http.post("/api/v1/devices", json={"sn": "SEC-2", "type": "retail"},
                                  headers={"Authorization": f"Bearer {token}"})
        new_secret = created.json()["secret"]
    # The server's loggers only: httpx, the test's own client, logs its request URLs.
    server = [rec for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore", "websockets"))]
    text = "\n".join(
        [rec.getMessage() for rec in server]
        + [json.dumps({k: str(v) for k, v in rec.__dict__.items()}) for rec in server]
    )
    for secret in (prov_secret, "wrong-secret-value-98765", ADMIN_PASSWORD, "typo-password-abc", token,
                   new_secret, FLEET_SECRET):
        assert secret not in text
    assert any("auth/login" in rec.getMessage() for rec in caplog.records)  # the access log did run


async def test_heartbeat_service(core: Core) -> None:
    c = await core.device("RET-1")
    r = await c.request("/api/device/heartbeat")
    assert r["code"] == 0 and abs(r["values"]["server_time"] - time.time()) < 5
    anon = await Client.connect(core.ws_url)
    assert (await anon.request("/api/device/heartbeat"))["code"] == 401
