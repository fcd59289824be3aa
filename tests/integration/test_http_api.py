"""The internal HTTP API (PROTOCOL §6) over real HTTP: every route, roles, errors, provisioning, audit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import Core, make_settings
from fleetkit import ADMIN_PASSWORD, FLEET_SECRET, Client

from core.clock import ManualClock, iso, utc

Factory = Callable[..., Any]
_last_ts = [0]
VIEWER_KEY = "viewer-key-0123456789abcdef"
OPERATOR_KEY = "operator-key-0123456789abcdef"


def fresh_ts() -> int:
    """A device-token timestamp never used before in this run (the replay cache is per (sn, timestamp))."""
    _last_ts[0] = max(int(time.time()), _last_ts[0] + 1)
    return _last_ts[0]


async def device_login(
    core: Core, sn: str, secret: str = FLEET_SECRET, type_: str = "retail", ts: int | None = None
) -> tuple[Client, dict[str, Any]]:
    """A connection and its device-login reply (not asserted)."""
    c = await core.client()
    return c, await c.login_device(sn, type_, secret=secret, timestamp=fresh_ts() if ts is None else ts)


async def online(core: Core, sn: str, secret: str = FLEET_SECRET, ts: int | None = None) -> Client:
    """A logged-in device."""
    c, reply = await device_login(core, sn, secret, ts=ts)
    assert reply["code"] == 0, reply
    return c


async def client_for(core: Core, token: str | None = None) -> httpx.AsyncClient:
    """An HTTP client with an optional bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=core.http_url, timeout=5, headers=headers, verify=False)


async def token_of(core: Core, username: str, password: str) -> str:
    """A session token from the HTTP login."""
    async with await client_for(core) as c:
        r = await c.post("/api/v1/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["username"] == username and body["expires_at"] and body["token"].startswith("fps_")
        return str(body["token"])


@pytest.fixture
async def roles(core: Core) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """HTTP clients for a viewer, an operator and the admin."""
    auth = core.app.deps.auth
    assert await auth.create_user("vic", "viewer-pass", "viewer")
    assert await auth.create_user("olga", "operator-pass", "operator")
    clients = {
        "viewer": await client_for(core, await token_of(core, "vic", "viewer-pass")),
        "operator": await client_for(core, await token_of(core, "olga", "operator-pass")),
        "admin": await client_for(core, await token_of(core, "admin", ADMIN_PASSWORD)),
    }
    yield clients
    for c in clients.values():
        await c.aclose()


RANK = {"viewer": 1, "operator": 2, "admin": 3}
# method, path, body, role needed, statuses a permitted caller may get
ROUTE_TABLE: list[tuple[str, str, Any, str, set[int]]] = [
    ("GET", "/api/v1/devices", None, "viewer", {200}),
    ("POST", "/api/v1/devices", {"sn": "NEW-{role}", "type": "retail"}, "admin", {201}),
    ("GET", "/api/v1/devices/R-1", None, "viewer", {200}),
    ("GET", "/api/v1/devices/R-1/status", None, "viewer", {200}),
    ("POST", "/api/v1/devices/R-2/secret", None, "admin", {200}),
    ("POST", "/api/v1/devices/R-1/commands", {"command": "dance"}, "operator", {202}),
    ("POST", "/api/v1/commands/c-unknown/cancel", None, "operator", {404}),
    ("GET", "/api/v1/commands", None, "viewer", {200}),
    ("GET", "/api/v1/commands/c-unknown", None, "viewer", {404}),
    ("POST", "/api/v1/broadcasts", {"message": "hello"}, "operator", {200}),
    ("GET", "/api/v1/connections", None, "admin", {200}),
    ("GET", "/api/v1/stats", None, "viewer", {200}),
    ("GET", "/api/v1/audit", None, "admin", {200}),
]


async def test_every_route_checks_bearer_and_role(core: Core, roles: dict[str, httpx.AsyncClient]) -> None:
    await (await online(core, "R-1")).close()
    await (await online(core, "R-2")).close()
    anon = await client_for(core)
    forged = await client_for(core, "fps_not-a-real-token")
    for method, path, body, needed, ok in ROUTE_TABLE:
        for c in (anon, forged):
            r = await c.request(method, path, json=body if body is None else {})
            assert r.status_code == 401 and r.json()["code"] == 401, (method, path)
        for role, c in roles.items():
            payload = None if body is None else {k: str(v).format(role=role) for k, v in body.items()}
            r = await c.request(method, path, json=payload)
            if RANK[role] >= RANK[needed]:
                assert r.status_code in ok, (method, path, role, r.status_code, r.text)
            else:
                assert r.status_code == 403 and r.json()["code"] == 403, (method, path, role, r.text)
    r = await anon.post("/api/v1/devices", headers={"Authorization": "Basic YWRtaW46eA=="}, json={})
    assert r.status_code == 401
    await anon.aclose()
    await forged.aclose()


async def test_login_route(core: Core) -> None:
    async with await client_for(core) as c:
        bad = await c.post("/api/v1/auth/login", json={"username": "admin", "password": "wrong"})
        nobody = await c.post("/api/v1/auth/login", json={"username": "ghost", "password": "wrong"})
        assert bad.status_code == nobody.status_code == 401 and bad.json() == nobody.json()
        invalid = await c.post("/api/v1/auth/login", json={"username": "admin"})
        assert invalid.status_code == 400 and [e["field"] for e in invalid.json()["errors"]] == ["password"]
        ok = await c.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert ok.status_code == 200 and ok.json()["role"] == "admin"


async def test_bad_bodies_and_queries_get_400_with_errors(core: Core, roles: dict[str, httpx.AsyncClient]) -> None:
    admin = roles["admin"]
    r = await admin.post("/api/v1/devices", content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == 400
    r = await admin.post("/api/v1/devices", content=b"[1, 2]")
    assert r.status_code == 400
    r = await admin.post("/api/v1/devices", json={"sn": "bad sn!", "type": "retail", "colour": "red"})
    assert r.status_code == 400 and {e["field"] for e in r.json()["errors"]} == {"sn", "colour"}
    r = await admin.post("/api/v1/devices", json={"sn": "X-1", "type": "toaster"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "type"
    r = await admin.get("/api/v1/commands", params={"state": "lost"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "state"
    r = await admin.get("/api/v1/devices", params={"online": "perhaps"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "online"
    await (await online(core, "R-1")).close()
    r = await admin.get("/api/v1/devices/R-1/status", params={"limit": 0})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "limit"
    r = await admin.get("/api/v1/devices/R-1/status", params={"since": "yesterday"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "since"
    r = await admin.post("/api/v1/devices/R-1/commands", json={"command": ""})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "command"
    r = await admin.post("/api/v1/broadcasts", json={"service": "device_command", "message": {}})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "service"
    r = await admin.delete("/api/v1/devices")
    assert r.status_code == 405 and r.json()["code"] == 405


async def test_unknown_device_and_command_are_404(roles: dict[str, httpx.AsyncClient]) -> None:
    viewer, admin = roles["viewer"], roles["admin"]
    for path in ("/api/v1/devices/NOPE-1", "/api/v1/devices/NOPE-1/status", "/api/v1/commands/c-nope"):
        r = await viewer.get(path)
        assert r.status_code == 404 and r.json()["code"] == 404, path
    assert (await admin.post("/api/v1/devices/NOPE-1/secret")).status_code == 404
    assert (await admin.post("/api/v1/devices/NOPE-1/commands", json={"command": "x"})).status_code == 404
    assert (await viewer.get("/api/v1/devices/bad%20sn")).status_code == 404


async def test_oversized_body_is_413(core_factory: Factory) -> None:
    core = await core_factory(make_settings(api={"max_body_bytes": 2048}))
    async with await client_for(core, await token_of(core, "admin", ADMIN_PASSWORD)) as admin:
        r = await admin.post("/api/v1/broadcasts", json={"message": "x" * 3000})
        assert r.status_code == 413 and r.json()["code"] == 413
        ok = await admin.post("/api/v1/broadcasts", json={"message": "x" * 1000})
        assert ok.status_code == 200


async def test_far_oversized_and_chunked_bodies_are_413_and_the_connection_survives(core_factory: Factory) -> None:
    core = await core_factory(make_settings(api={"max_body_bytes": 2048}))
    async with await client_for(core, await token_of(core, "admin", ADMIN_PASSWORD)) as admin:
        r = await admin.post("/api/v1/broadcasts", json={"message": "x" * 10000})  # past Tornado's own cap
        assert r.status_code == 413 and r.json()["code"] == 413

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"message": "'
            for _ in range(5):
                yield b"y" * 1000
            yield b'"}'

        r = await admin.post("/api/v1/broadcasts", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        small = await admin.post("/api/v1/broadcasts", content=b'{"message": 1}')
        assert small.status_code == 200


async def test_provisioning_secret_login_and_rotation(core: Core, roles: dict[str, httpx.AsyncClient]) -> None:
    admin = roles["admin"]
    r = await admin.post("/api/v1/devices", json={"sn": "DOG-7", "type": "dance_dog", "name": "Rex"})
    assert r.status_code == 201
    body = r.json()
    assert body["sn"] == "DOG-7" and body["type"] == "dance_dog" and len(body["secret"]) >= 32
    secret = body["secret"]
    assert (await admin.post("/api/v1/devices", json={"sn": "DOG-7", "type": "dance_dog"})).status_code == 409
    got = (await admin.get("/api/v1/devices/DOG-7")).json()
    assert got["name"] == "Rex" and got["online"] is False and secret not in str(got)
    assert secret not in (await admin.get("/api/v1/devices")).text
    # Only the issued secret logs this device in: not the fleet secret, not a wrong one.
    for wrong in (FLEET_SECRET, "0" * 64):
        c, reply = await device_login(core, "DOG-7", wrong)
        assert reply["code"] == 401
        await c.close()
    dev = await online(core, "DOG-7", secret)
    assert (await dev.request("/api/device/status", {"battery": 77}))["code"] == 0
    rotated = await admin.post("/api/v1/devices/DOG-7/secret")
    assert rotated.status_code == 200 and rotated.json()["sn"] == "DOG-7"
    new_secret = rotated.json()["secret"]
    assert new_secret != secret
    assert await dev.close_code() == 4401
    c, reply = await device_login(core, "DOG-7", secret)
    assert reply["code"] == 401
    await online(core, "DOG-7", new_secret)


async def test_provisioning_a_fleet_registered_device_issues_its_own_secret(
    core: Core, roles: dict[str, httpx.AsyncClient]
) -> None:
    await (await online(core, "R-9")).close()
    body = {"sn": "R-9", "type": "dance_robot", "name": "Nine"}
    racing = await asyncio.gather(*(roles["admin"].post("/api/v1/devices", json=body) for _ in range(5)))
    assert sorted(r.status_code for r in racing) == [201, 409, 409, 409, 409]
    (winner,) = [r for r in racing if r.status_code == 201]
    got = (await roles["admin"].get("/api/v1/devices/R-9")).json()
    assert got["type"] == "dance_robot" and got["name"] == "Nine"
    _c, reply = await device_login(core, "R-9", FLEET_SECRET)
    assert reply["code"] == 401
    dev = await online(core, "R-9", winner.json()["secret"])
    assert (await dev.request("/api/device/status", {"battery": 1}))["code"] == 0


async def test_api_keys_work_as_bearer_with_their_role(core_factory: Factory) -> None:
    core = await core_factory(make_settings(api={"keys": [
        {"name": "dash", "key": VIEWER_KEY, "role": "viewer"},
        {"name": "ci", "key": OPERATOR_KEY, "role": "operator"},
    ]}))
    await (await online(core, "R-1")).close()
    async with await client_for(core, VIEWER_KEY) as viewer, await client_for(core, OPERATOR_KEY) as operator:
        assert (await viewer.get("/api/v1/devices")).status_code == 200
        assert (await viewer.post("/api/v1/devices/R-1/commands", json={"command": "x"})).status_code == 403
        r = await operator.post("/api/v1/devices/R-1/commands", json={"command": "x"})
        assert r.status_code == 202
        got = (await operator.get(f"/api/v1/commands/{r.json()['command_id']}")).json()
        assert got["issued_by"] == "key:ci"
        assert (await operator.get("/api/v1/audit")).status_code == 403
    async with await client_for(core, VIEWER_KEY[:-1]) as wrong:
        assert (await wrong.get("/api/v1/devices")).status_code == 401


async def test_broadcast_connections_and_stats(core: Core, roles: dict[str, httpx.AsyncClient]) -> None:
    dog = await online(core, "DOG-1")
    ops = await core.ops()
    r = await roles["operator"].post("/api/v1/broadcasts", json={"service": "notice", "message": {"t": "hi"}})
    assert r.status_code == 200 and r.json() == {"matched": 2, "queued": 2}
    assert (await dog.push("notice"))["values"] == {"t": "hi"}
    assert (await ops.push("notice"))["values"] == {"t": "hi"}
    only_dogs = await roles["operator"].post(
        "/api/v1/broadcasts", json={"message": 1, "target": {"sns": ["DOG-1"]}})
    assert only_dogs.json() == {"matched": 1, "queued": 1}
    to_user = {"message": 2, "target": {"username": "admin"}}
    assert (await roles["operator"].post("/api/v1/broadcasts", json=to_user)).status_code == 403
    assert (await roles["admin"].post("/api/v1/broadcasts", json=to_user)).json() == {"matched": 1, "queued": 1}
    conns = (await roles["admin"].get("/api/v1/connections")).json()["connections"]
    kinds = sorted((c["kind"], c.get("sn") or c.get("username")) for c in conns)
    assert kinds == [("device", "DOG-1"), ("ops", "admin")]
    for c in conns:
        assert c["id"] and c["remote"] == "127.0.0.1" and c["connected_at"] and c["queue_depth"] >= 0
    stats = (await roles["viewer"].get("/api/v1/stats")).json()
    assert stats["connections"]["device"] == 1 and stats["connections"]["ops"] == 1
    assert stats["devices"]["online"] == 1 and stats["devices"]["by_type"]["retail"]["online"] == 1
    assert stats["pushes_ok"] >= 4 and stats["messages_in"] >= 2


async def test_health_ready_metrics_and_openapi_need_no_token(core: Core) -> None:
    dev = await online(core, "R-1")
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {})
    await dev.request("/api/device/status", {"battery": 5})
    await ops.push("device_status")
    async with await client_for(core) as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["store"] == "ok"
        m = await c.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        assert 'push_success_total{service="device_status"} 1.0' in m.text
        assert "push_failure_total" in m.text and 'push_latency_seconds_count{service="device_status"}' in m.text
        doc = await c.get("/api/v1/openapi.json")
        assert doc.status_code == 200 and doc.json()["openapi"].startswith("3.1")


async def test_audit_trail_records_who_did_what(core_factory: Factory) -> None:
    clock = ManualClock()
    core = await core_factory(clock=clock)
    auth = core.app.deps.auth
    await auth.create_user("olga", "operator-pass", "operator")
    await auth.create_user("vic", "viewer-pass", "viewer")
    async with await client_for(core) as anon:
        assert (await anon.post("/api/v1/auth/login", json={"username": "olga", "password": "nope"})).status_code == 401
    ws_ops = await core.client()
    assert (await ws_ops.login_ops("vic", "bad"))["code"] == 401
    admin = await client_for(core, await token_of(core, "admin", ADMIN_PASSWORD))
    olga = await client_for(core, await token_of(core, "olga", "operator-pass"))
    secret = (await admin.post("/api/v1/devices", json={"sn": "R-1", "type": "retail"})).json()["secret"]
    dev = await online(core, "R-1", secret, ts=int(clock.time()))
    rotated = (await admin.post("/api/v1/devices/R-1/secret")).json()["secret"]
    assert await dev.close_code() == 4401
    clock.advance(1)
    dev = await online(core, "R-1", rotated, ts=int(clock.time()))
    ids = []
    for name in ("ok", "fail", "cancel"):
        ids.append((await olga.post("/api/v1/devices/R-1/commands", json={"command": name})).json()["command_id"])
        await dev.push("device_command")
    await dev.request("/api/command/ack", {"command_id": ids[0], "ok": True})
    await dev.request("/api/command/ack", {"command_id": ids[1], "ok": False, "msg": "jammed"})
    await olga.post(f"/api/v1/commands/{ids[2]}/cancel")
    await olga.post("/api/v1/broadcasts", json={"message": "lunch"})
    await dev.close()
    cutoff = clock.time() + 1
    clock.advance(2)
    expiring = (await admin.post("/api/v1/devices/R-1/commands", json={"command": "late", "ttl_s": 5})).json()
    clock.advance(6)
    await core.app.deps.commands.sweep()  # an awaited sweep; the app's own sweeper may have got there first
    assert (await admin.get(f"/api/v1/commands/{expiring['command_id']}")).json()["state"] == "expired"
    for _ in range(50):  # bounded: the background sweeper's audit write may still be in flight
        expired = (await admin.get("/api/v1/audit", params={"action": "command.expired"})).json()["events"]
        if expired:
            break
    assert [e["detail"]["command_id"] for e in expired] == [expiring["command_id"]]
    events = (await admin.get("/api/v1/audit")).json()["events"]
    seen = {(e["actor"], e["action"], e["target"], e["outcome"]) for e in events}
    expected = {
        ("olga", "user.login", "olga", "failed"),
        ("vic", "user.login", "vic", "failed"),
        ("admin", "user.login", "admin", "ok"),
        ("olga", "user.login", "olga", "ok"),
        ("admin", "device.provisioned", "R-1", "ok"),
        ("device:R-1", "device.login", "R-1", "ok"),
        ("admin", "device.secret_rotated", "R-1", "ok"),
        ("olga", "command.issued", "R-1", "ok"),
        ("device:R-1", "command.acked", "R-1", "acked"),
        ("device:R-1", "command.failed", "R-1", "failed"),
        ("olga", "command.canceled", "R-1", "ok"),
        ("olga", "broadcast", "broadcast", "ok"),
        ("admin", "command.issued", "R-1", "ok"),
        ("system", "command.expired", "R-1", "expired"),
    }
    assert expected <= seen, expected - seen
    assert all(e["ts"] for e in events) and events == sorted(events, key=lambda e: e["ts"], reverse=True)
    issued = [e for e in events if e["action"] == "command.issued"]
    assert {e["detail"]["command_id"] for e in issued} == {*ids, expiring["command_id"]}
    by_olga = (await admin.get("/api/v1/audit", params={"actor": "olga"})).json()["events"]
    assert by_olga and {e["actor"] for e in by_olga} == {"olga"}
    acks = (await admin.get("/api/v1/audit", params={"action": "command.acked"})).json()["events"]
    assert [e["detail"]["command_id"] for e in acks] == [ids[0]]
    late = (await admin.get("/api/v1/audit", params={"since": iso(utc(cutoff))})).json()["events"]
    assert {e["action"] for e in late} == {"command.issued", "command.expired"}
    assert (await olga.get("/api/v1/audit")).status_code == 403
    async with await client_for(core, await token_of(core, "vic", "viewer-pass")) as vic:
        assert (await vic.get("/api/v1/audit")).status_code == 403
    await admin.aclose()
    await olga.aclose()


async def test_failed_device_login_is_audited(core: Core, roles: dict[str, httpx.AsyncClient]) -> None:
    _c, reply = await device_login(core, "R-1", "wrong-secret")
    assert reply["code"] == 401
    events = (await roles["admin"].get("/api/v1/audit", params={"action": "device.login"})).json()["events"]
    assert [(e["target"], e["outcome"]) for e in events] == [("R-1", "failed")]
