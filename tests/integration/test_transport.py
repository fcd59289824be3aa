"""PROTOCOL §1 over real sockets: origins, frame limits, deadlines, heartbeats, bad frames."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from conftest import Core, make_settings
from fleetkit import FLEET_SECRET, Client, RawSocket, removed

from core.auth import device_token
from core.clock import ManualClock


async def handshake_status(core: Core, origin: str) -> int:
    try:
        ws = await websockets.connect(core.ws_url, origin=origin, open_timeout=5)  # type: ignore[arg-type]
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def test_origin_allowlist(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(server={"allowed_origins": ["https://ops.example.com"]}))
    port = core.port
    assert await handshake_status(core, "https://ops.example.com") == 101
    assert await handshake_status(core, f"http://127.0.0.1:{port}") == 101  # the server's own host
    for bad in ["https://evil.example", "null", "https://ops.example.com.evil.com", "https://ops.example.com:8443",
                f"http://127.0.0.1:{port + 1}", "http://ops.example.com", "file://"]:
        assert await handshake_status(core, bad) == 403, bad
    assert len(core.app.deps.hub) == 0  # no handler state was created for refused handshakes


async def test_device_without_origin_must_log_in_first(core: Core) -> None:
    c = await core.client()
    for service in ("/api/device/status", "/admin/device/list", "/api/command/ack"):
        r = await c.request(service, {"battery": 5})
        assert r["code"] == 401, service
    assert core.app.deps.store.status is not None
    assert await core.app.deps.store.history("ANY", None, None, 10) == []
    assert (await c.login_device("RET-0001"))["code"] == 0  # the connection lived on
    assert (await c.request("/api/device/status", {"battery": 50}))["code"] == 0


async def test_message_size_limit_1009_single_and_fragmented(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(limits={"max_message_bytes": 1024}))
    c = await core.device("RET-0001")
    ok = await c.request("/api/device/status", {"extra": {"p": "x" * 800}})
    assert ok["code"] == 0
    await c.send_raw(json.dumps({"service": "/api/device/status", "values": {"extra": {"p": "x" * 2000}}}))
    assert await c.close_code() == 1009
    raw = await RawSocket.connect(core.port)
    raw.send_frame(0x1, b'{"service": "/x", "values": {"p": "' + b"x" * 600, fin=False)
    raw.send_frame(0x0, b"y" * 600 + b'"}}', fin=True)
    assert await raw.close_code() == 1009
    raw.close()


async def test_binary_frame_1003(core: Core) -> None:
    c = await core.device("RET-0001")
    await c.send_raw(b"\x00\x01binary")
    assert await c.close_code() == 1003


async def test_invalid_utf8_1007_and_bad_close_code_1002(core: Core) -> None:
    raw = await RawSocket.connect(core.port)
    raw.send_frame(0x1, b'{"service": "\xff\xfe"}')
    assert await raw.close_code() == 1007
    raw.close()
    raw = await RawSocket.connect(core.port)
    raw.send_frame(0x8, struct.pack("!H", 999))
    assert await raw.close_code() == 1002
    raw.close()
    raw = await RawSocket.connect(core.port)
    raw.send_frame(0x8, struct.pack("!H", 1000) + b"bye")
    assert await raw.close_code() == 1000
    raw.close()
    # The server is still healthy afterwards.
    c = await core.device("RET-0002")
    assert (await c.request("/api/device/heartbeat"))["code"] == 0


async def test_login_deadline_4401(core_factory: Callable[..., Any]) -> None:
    clock = ManualClock()
    core = await core_factory(clock=clock)
    idle = await core.client()
    logged = await core.client()
    assert (await logged.login_device("RET-0001", timestamp=int(clock.time())))["code"] == 0
    clock.advance(9)
    core.app.gateway.sweep()  # a sweep before the deadline closes nothing
    assert not any(c.closed for c in core.app.deps.hub)
    clock.advance(2)
    assert await idle.close_code() == 4401
    assert not logged.closed.done()


async def test_server_pings_and_heartbeat_timeout_4408(core_factory: Callable[..., Any]) -> None:
    clock = ManualClock()
    core = await core_factory(clock=clock)
    silent = await RawSocket.connect(core.port)
    lively = await RawSocket.connect(core.port)
    for r in (silent, lively):
        ts = int(clock.time())
        sn = "SIL-1" if r is silent else "LIV-1"
        r.send_json({"service": "/api/user/login", "request_id": 1,
                     "values": {"sn": sn, "timestamp": ts, "token": device_token(FLEET_SECRET, sn, ts),
                                "type": "retail"}})
        op, payload = await r.read_frame()
        assert op == 0x1 and json.loads(payload)["code"] == 0
    for _ in range(4):  # 4 x 21 s: well past the 60 s timeout for a peer that never answers
        clock.advance(21)
        op, payload = await lively.read_frame()
        assert op == 0x9  # the server's ping
        lively.send_frame(0xA, payload)
        # Frames are handled in order: once this reply is back, the pong was seen too.
        lively.send_json({"service": "/api/device/heartbeat", "request_id": 2})
        op, payload = await lively.read_frame()
        assert op == 0x1 and json.loads(payload)["code"] == 0
    assert await silent.close_code() == 4408
    await removed(core.app.deps.hub, lambda c: c.sn == "SIL-1", timeout=1)  # dropped at once, not after 5 s
    assert core.app.deps.hub.device("LIV-1") is not None
    doc = await core.app.deps.store.get_device("SIL-1")
    assert doc is not None and doc["offline_reason"] == "heartbeat_timeout"
    silent.close()
    lively.close()


async def test_connection_cap_refuses_handshake(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(limits={"max_connections": 2}))
    a, b = await core.client(), await core.client()
    with pytest.raises(websockets.InvalidStatus) as info:
        await Client.connect(core.ws_url)
    assert info.value.response.status_code == 503
    a_id = next(iter(core.app.deps.hub)).id
    await a.close()
    await removed(core.app.deps.hub, lambda c: c.id == a_id)
    c = await core.client()
    assert (await c.login_device("RET-9"))["code"] == 0
    await b.close()


async def test_stop_closes_every_client_with_1001(core_factory: Callable[..., Any]) -> None:
    core = await core_factory()
    dev = await core.device("RET-0001")
    ops = await core.ops()
    anon = await core.client()
    await core.app.stop()
    assert [await x.close_code() for x in (dev, ops, anon)] == [1001, 1001, 1001]
    doc = await core.app.deps.store.get_device("RET-0001")
    assert doc is not None and doc["online"] is False and doc["offline_reason"] == "shutdown"
