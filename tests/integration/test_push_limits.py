"""Push modes, rate limits, slow consumers and metrics over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
from conftest import Core, make_settings
from fleetkit import FLEET_SECRET, Client, RawSocket, _fresh_timestamp, removed

from core.auth import device_token


async def fleet(core: Core) -> dict[str, Client]:
    clients = {
        "dog1": await core.device("DOG-1", "dance_dog"),
        "dog2": await core.device("DOG-2", "dance_dog"),
        "ret1": await core.device("RET-1", "retail"),
        "admin": await core.ops(),
    }
    await core.app.deps.auth.create_user("olga", "olga-password", "operator")
    clients["olga1"] = await core.ops("olga", "olga-password")
    clients["olga2"] = await core.ops("olga", "olga-password")
    clients["anon"] = await core.client()
    return clients


async def got(c: Client, service: str) -> Any:
    try:
        return (await c.push(service, timeout=0.3))["values"]
    except TimeoutError:
        return None


async def test_broadcast_targets(core: Core) -> None:
    cl = await fleet(core)
    admin, olga = cl["admin"], cl["olga1"]

    async def bcast(who: Client, body: dict[str, Any]) -> dict[str, Any]:
        return await who.request("/admin/push/broadcast", body)

    r = await bcast(olga, {"service": "dance", "message": {"song": "waltz"}, "target": {"type": "dance_dog"}})
    assert r["code"] == 0 and r["values"] == {"matched": 2, "queued": 2}
    assert await got(cl["dog1"], "dance") == {"song": "waltz"} and await got(cl["dog2"], "dance") == {"song": "waltz"}
    assert await got(cl["ret1"], "dance") is None

    r = await bcast(olga, {"service": "note", "message": "hi", "target": {"sns": ["RET-1", "DOG-2", "NOPE"]}})
    assert r["values"]["matched"] == 2
    assert await got(cl["ret1"], "note") == "hi" and await got(cl["dog2"], "note") == "hi"
    assert await got(cl["dog1"], "note") is None

    r = await bcast(olga, {"service": "note", "message": 1, "target": {"username": "olga"}})
    assert r["code"] == 403  # user and role targets need admin
    r = await bcast(admin, {"service": "memo", "message": [1, 2], "target": {"username": "olga"}})
    assert r["values"]["matched"] == 2
    assert await got(cl["olga1"], "memo") == [1, 2] and await got(cl["olga2"], "memo") == [1, 2]
    assert await got(cl["admin"], "memo") is None

    r = await bcast(admin, {"service": "memo2", "message": None, "target": {"role": "admin"}})
    assert r["values"]["matched"] == 1

    r = await bcast(olga, {"message": {"all": True}})
    assert r["values"]["matched"] == 6  # every authenticated connection, not the anonymous one
    assert await got(cl["anon"], "broadcast") is None
    assert await got(cl["dog1"], "broadcast") == {"all": True}

    r = await bcast(admin, {"service": "device_command", "message": {"command_id": "fake"}})
    assert r["code"] == 400  # firmware must never mistake a broadcast for a command
    ids = set()
    for name in ("dog1", "dog2", "ret1"):
        frames = [f for f in cl[name].frames if f.get("op") == "galbot_push"]
        ids.update(f["request_id"] for f in frames)
        assert all(f["code"] == 0 and f["result"] is True for f in frames)
    assert len(ids) == 3  # dance, note, broadcast: one id per push, shared by its receivers


async def test_http_broadcast_matches_ws(core: Core) -> None:
    cl = await fleet(core)
    token = cl["admin"].frames[0]["values"]["token"]
    async with httpx.AsyncClient(base_url=core.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
        r = await http.post("/api/v1/broadcasts", json={"service": "x", "message": 5, "target": {"type": "retail"}})
    assert r.status_code == 200 and r.json() == {"matched": 1, "queued": 1}
    assert await got(cl["ret1"], "x") == 5


async def test_rate_limit_429_then_4429_and_others_unaffected(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(limits={"rate_per_s": 5, "rate_burst": 10, "rate_abuse_replies": 20}))
    flooder = await core.device("FLOOD-1")
    calm = await core.device("CALM-1")
    for i in range(60):
        await flooder.send_raw(json.dumps({"service": "/api/device/heartbeat", "request_id": i}))
    assert await flooder.close_code() == 4429
    codes = [f["code"] for f in flooder.frames if f.get("op") == "galbot_response"]
    assert codes[0] == 0 and 429 in codes and codes.count(0) <= 12  # the burst, plus what refilled meanwhile
    assert (await calm.request("/api/device/heartbeat"))["code"] == 0


async def test_slow_consumer_cut_4503_fast_clients_get_everything_in_order(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(limits={"outbound_queue": 20, "rate_burst": 100000}))
    fast = [await core.device(f"FAST-{i}") for i in range(3)]
    slow = await RawSocket.connect(core.port, rcvbuf=4096)
    ts = _fresh_timestamp("SLOW-1")
    slow.send_json({"service": "/api/user/login", "request_id": 1, "values": {
        "sn": "SLOW-1", "timestamp": ts, "token": device_token(FLEET_SECRET, "SLOW-1", ts), "type": "retail"}})
    op, _ = await slow.read_frame()
    assert op == 0x1
    # The slow client now stops reading. Broadcast big frames until its queue overflows.
    ops = await core.ops()
    blob = "x" * 30000
    n = 300
    for i in range(n):
        r = await ops.request("/admin/push/broadcast", {"service": "seq", "message": {"i": i, "blob": blob},
                                                         "target": {"type": "retail"}})
        assert r["code"] == 0
    await removed(core.app.deps.hub, lambda c: c.sn == "SLOW-1", timeout=10)
    for c in fast:
        seen = []
        while len(seen) < n:
            seen.append((await c.push("seq", timeout=10))["values"]["i"])
        assert seen == list(range(n))
    metrics = core.app.deps.metrics.render().decode()
    assert "queue_overflows_total 1.0" in metrics
    slow.close()


async def test_metrics_exposition(core: Core) -> None:
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {})
    dev = await core.device("MET-1")
    await dev.request("/api/device/status", {"battery": 50})
    await ops.push("device_status")
    async with httpx.AsyncClient(base_url=core.http_url) as http:
        text = (await http.get("/metrics")).text
    for needle in [
        'push_success_total{service="device_status"}',
        "push_failure_total",
        'push_latency_seconds_bucket{le="0.001",service="device_status"}',
        'connections{kind="device"}',
        "frames_in_total",
        "frames_out_total",
        'handler_latency_seconds_count{service="/api/device/status"}',
        'requests_total{code="0",service="/api/device/status"}',
        "queue_overflows_total",
        "connection_closes_total",
    ]:
        assert needle in text, needle


async def test_a_client_that_pings_without_reading_is_cut_4503(core: Core) -> None:
    # Pongs do not go through the connection's bounded queue; a peer that floods pings and never
    # reads must still not grow the server's buffers without end.
    flood = await RawSocket.connect(core.port, rcvbuf=4096)
    other = await core.device("CALM-1")
    ping = bytes([0x89, 0x80 | 125]) + b"\x00\x00\x00\x00" + b"p" * 125  # masked with a zero key
    sent = 0
    try:
        while sent < 200_000:  # bounded: ~26 MB at most; the server cuts well before
            flood.writer.write(ping * 1000)
            sent += 1000
            await asyncio.wait_for(flood.writer.drain(), 10)
    except (ConnectionError, TimeoutError):
        pass  # cut while we were still sending
    await removed(core.app.deps.hub, lambda c: c.sn is None and c.kind == "anon", timeout=10)
    metrics = core.app.deps.metrics.render().decode()
    assert 'connection_closes_total{code="4503"} 1.0' in metrics
    # Nobody else noticed.
    assert (await other.request("/api/device/heartbeat", {}))["code"] == 0
    flood.close()
