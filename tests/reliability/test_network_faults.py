"""Network faults through a loopback fault proxy: TCP reset mid-frame, a black-holed peer, slowloris
handshakes, and file descriptors / hub entries back to baseline after churn."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import Core, make_settings
from faultproxy import FaultProxy
from fleetkit import FLEET_SECRET, RawSocket, _fresh_timestamp, client_frame, removed

from core.auth import device_token
from core.clock import ManualClock


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[[int], Any]]:
    proxies: list[FaultProxy] = []

    async def make(port: int) -> FaultProxy:
        p = await FaultProxy(port).start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        await p.close()


async def login_raw(raw: RawSocket, sn: str, ts: int | None = None) -> None:
    ts = _fresh_timestamp(sn) if ts is None else ts
    raw.send_json({"service": "/api/user/login", "request_id": 1, "values": {
        "sn": sn, "timestamp": ts, "token": device_token(FLEET_SECRET, sn, ts), "type": "retail"}})
    op, payload = await raw.read_frame()
    assert op == 0x1 and json.loads(payload)["code"] == 0


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server ends the connection (FIN or RST) without sending anything."""
    try:
        return await reader.read(1) == b""
    except ConnectionResetError:
        return True


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_tcp_reset_mid_frame_cleans_the_hub_without_an_error_storm(
    core: Core, proxy_factory: Callable[[int], Any], caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await proxy_factory(core.port)
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {})
    n = 20
    raws = []
    for i in range(n):
        raw = await RawSocket.connect(proxy.port)
        await login_raw(raw, f"RST-{i}")
        raws.append(raw)
    for _ in range(n):
        await ops.push("device_online")
    before = sum(link.up_bytes for link in proxy.links)
    # Each device starts a 200-byte status frame and gets 40 bytes of its payload out: then the RST.
    payload = json.dumps({"service": "/api/device/status", "values": {"location_msg": "x" * 150}}).encode()
    assert len(payload) > 126
    for raw in raws:
        raw.writer.write(client_frame(0x1, payload)[: 4 + 4 + 40])  # header, mask, 40 payload bytes
    await proxy.forwarded_up(before + n * (4 + 4 + 40))
    caplog.clear()
    proxy.reset()
    for i in range(n):
        await removed(core.app.deps.hub, lambda c, sn=f"RST-{i}": c.sn == sn, timeout=5)
    offline = [await ops.push("device_offline") for _ in range(n)]
    assert sorted(p["values"]["sn"] for p in offline) == sorted(f"RST-{i}" for i in range(n))
    assert {p["values"]["reason"] for p in offline} == {"closed"}
    assert core.app.deps.hub.counts() == {"device": 0, "ops": 1, "anon": 0}
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]  # a peer vanishing is routine, not an error
    for i in range(n):
        doc = await core.app.deps.store.get_device(f"RST-{i}")
        assert doc is not None and doc["online"] is False
    for raw in raws:
        raw.close()


async def test_black_holed_peer_is_closed_by_heartbeat_timeout_once(
    core_factory: Callable[..., Any], proxy_factory: Callable[[int], Any]
) -> None:
    clock = ManualClock()
    core = await core_factory(clock=clock)
    proxy = await proxy_factory(core.port)
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {})
    raw = await RawSocket.connect(proxy.port)
    await login_raw(raw, "HOLE-1", ts=int(clock.time()))
    await ops.push("device_online")
    proxy.blackhole()  # the device's pongs and frames never arrive; the server's writes still succeed
    for _ in range(3):  # 3 x 21 s: past heartbeat.timeout_s (60) for the device; the operator keeps talking
        clock.advance(21)
        assert (await ops.request("/admin/device/list", {}))["code"] == 0
    await removed(core.app.deps.hub, lambda c: c.sn == "HOLE-1", timeout=2)  # at once, not after a close wait
    off = await ops.push("device_offline")
    assert off["values"] == {**off["values"], "sn": "HOLE-1", "reason": "heartbeat_timeout"}
    # Exactly once: a round trip later, no second offline push is queued.
    assert (await ops.request("/admin/device/list", {}))["code"] == 0
    assert [p for p in list(ops.pushes._queue) if p.get("service") == "device_offline"] == []  # type: ignore[attr-defined]
    doc = await core.app.deps.store.get_device("HOLE-1")
    assert doc is not None and doc["online"] is False and doc["offline_reason"] == "heartbeat_timeout"
    assert core.app.deps.metrics.render().decode().count('connection_closes_total{code="4408"} 1.0') == 1
    raw.close()


async def test_slowloris_handshakes_are_closed_while_a_real_client_connects(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(server={"idle_timeout_s": 1.0}))
    request = (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{core.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               "X-Padding: " + "p" * 200 + "\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    closed_after: list[float] = []

    async def drip() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", core.port)
        start = loop.time()
        eof = asyncio.create_task(_closed_by_server(reader))
        try:
            for i in range(len(request)):  # ~350 bytes at 20 ms each: 7 s if never cut
                if eof.done():
                    break
                writer.write(request[i : i + 1])
                await asyncio.sleep(0.02)  # the attack's own pacing
            assert await asyncio.wait_for(eof, 5)  # closed by the server, never answered
            closed_after.append(loop.time() - start)
        finally:
            eof.cancel()
            writer.close()

    async def silent() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", core.port)
        start = loop.time()
        try:
            assert await asyncio.wait_for(_closed_by_server(reader), 5)
            closed_after.append(loop.time() - start)
        finally:
            writer.close()

    attack = [asyncio.create_task(drip()) for _ in range(40)] + [asyncio.create_task(silent()) for _ in range(10)]
    # Meanwhile a real device connects, logs in and reports, several times.
    for i in range(5):
        dev = await core.device(f"REAL-{i}")
        assert (await dev.request("/api/device/status", {"battery": 50}))["code"] == 0
        await dev.close()
    await asyncio.wait_for(asyncio.gather(*attack), 15)
    assert len(closed_after) == 50
    assert max(closed_after) < 4.0  # idle_timeout_s 1 plus scheduling slack; the drip alone would take 7 s
    assert "connections_opened_total 5.0" in core.app.deps.metrics.render().decode()  # only the real ones upgraded


async def test_fds_and_hub_entries_return_to_baseline_after_churn(
    core: Core, proxy_factory: Callable[[int], Any]
) -> None:
    proxy = await proxy_factory(core.port)
    warm = await core.device("WARM-0")  # first-use allocations (store, caches) before the baseline
    await warm.close()
    await asyncio.wait_for(core.app.gateway.empty.wait(), 5)
    fds, hub = _fd_count(), len(core.app.deps.hub)
    for round_ in range(6):
        clients = [await core.device(f"CH-{round_}-{i}") for i in range(10)]
        clients += [await core.ops() for _ in range(3)]
        clients += [await core.client() for _ in range(5)]
        raws = [await RawSocket.connect(core.port) for _ in range(5)]
        via_proxy = [await RawSocket.connect(proxy.port) for _ in range(5)]
        for k, raw in enumerate(via_proxy):
            await login_raw(raw, f"PX-{round_}-{k}")
        for c in clients:
            await c.close()
        for raw in raws:
            raw.writer.transport.abort()  # the client side vanishes without a close frame
        proxy.reset()  # RST both ways for the proxied ones
        for raw in via_proxy:
            raw.close()
        await asyncio.wait_for(core.app.gateway.empty.wait(), 10)
    assert len(core.app.deps.hub) == hub == 0
    assert core.app.deps.hub.counts() == {"device": 0, "ops": 0, "anon": 0}
    assert _fd_count() <= fds + 2, (fds, _fd_count())


async def test_a_high_latency_link_still_works_end_to_end(core: Core, proxy_factory: Callable[[int], Any]) -> None:
    proxy = await proxy_factory(core.port)
    proxy.delay_s = 0.1  # 100 ms each way per chunk: a poor cellular link
    raw = await RawSocket.connect(proxy.port)
    await login_raw(raw, "SLOWLINK-1")
    cid = (await core.app.deps.commands.create("SLOWLINK-1", "dance", {}, None, None, "admin"))["command_id"]
    op, payload = await raw.read_frame()
    push = json.loads(payload)
    assert op == 0x1 and push["service"] == "device_command" and push["values"]["command_id"] == cid
    raw.send_json({"service": "/api/command/ack", "request_id": 2, "values": {"command_id": cid, "ok": True}})
    op, payload = await raw.read_frame()
    assert json.loads(payload)["values"]["state"] == "acked"
    raw.send_frame(0x8, struct.pack("!H", 1000))
    assert await raw.close_code() == 1000
    await removed(core.app.deps.hub, lambda c: c.sn == "SLOWLINK-1")
    raw.close()
