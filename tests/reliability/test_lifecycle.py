"""Lifecycle: SIGTERM to `fleetpush serve` under load, a restart on the same store with nothing lost,
and 500 devices reconnecting at once, each getting its pending command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Core, make_settings
from fleetkit import ADMIN_PASSWORD, FLEET_SECRET, Client, RawSocket
from relkit import FrameReader

from core.auth import device_token
from core.clock import utc

ROOT = Path(__file__).resolve().parents[2]


async def _report_until_closed(c: Client, started: asyncio.Event) -> int:
    """Status reports back to back until the connection closes (at most 100000); how many were accepted."""
    sent = 0
    try:
        for i in range(100_000):
            r = await c.request("/api/device/status", {"battery": i % 100})
            if r["code"] != 0:
                break
            sent += 1
            started.set()
    except Exception:  # the server went away mid-request: that is the point
        pass
    return sent


async def _loaded(clients: list[Client]) -> list[asyncio.Task[int]]:
    """Start a report loop on each client; returns once every one has had a report accepted."""
    events = [asyncio.Event() for _ in clients]
    tasks = [asyncio.create_task(_report_until_closed(c, e)) for c, e in zip(clients, events, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
    return tasks


@pytest.mark.timeout(60)
async def test_sigterm_under_load_closes_clients_1001_and_exits_0_quickly() -> None:
    env = {
        **os.environ,
        "FLEETPUSH_AUTH__DEVICE_SECRET": FLEET_SECRET,
        "FLEETPUSH_AUTH__ADMIN_PASSWORD": ADMIN_PASSWORD,
        "FLEETPUSH_AUTH__ARGON2_TIME_COST": "1",
        "FLEETPUSH_AUTH__ARGON2_MEMORY_KIB": "1024",
        "FLEETPUSH_SERVER__NODE_ID": "sigterm-node",
        "FLEETPUSH_SERVER__LOG_LEVEL": "DEBUG",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core", "serve", "--host", "127.0.0.1", "--port", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        port = int(m.group(1))
        # Drain both pipes all along: a DEBUG-logging server must never block on a full pipe.
        out_task = asyncio.create_task(proc.stdout.read())
        err_task = asyncio.create_task(proc.stderr.read())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for _ in range(100):  # the embedded store comes up in the background; /readyz says when
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)  # another process: nothing to await across it but its answers
            token = (await http.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
                     ).json()["token"]
            bearer = {"Authorization": f"Bearer {token}"}
            url = f"ws://127.0.0.1:{port}/ws"
            devices = []
            for i in range(10):
                c = await Client.connect(url)
                assert (await c.login_device(f"TERM-{i}"))["code"] == 0
                devices.append(c)
            offline = await Client.connect(url)
            assert (await offline.login_device("TERM-OFF"))["code"] == 0
            await offline.close()
            pending = [(await http.post("/api/v1/devices/TERM-OFF/commands", json={"command": f"p{i}"},
                                        headers=bearer)).json() for i in range(3)]
            assert {p["state"] for p in pending} == {"pending"}
            sent = (await http.post("/api/v1/devices/TERM-0/commands", json={"command": "unacked"},
                                    headers=bearer)).json()
            assert sent["state"] == "sent"
        ops = await Client.connect(url)
        assert (await ops.login_ops())["code"] == 0
        anon = await Client.connect(url)
        load = await _loaded(devices)  # under load: every device is reporting when the signal arrives
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
        elapsed = time.monotonic() - start
        codes = [await c.close_code() for c in (*devices, ops, anon)]
        reports = await asyncio.gather(*load)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0
    assert elapsed < 5, elapsed
    assert codes == [1001] * len(codes)
    assert all(n > 0 for n in reports)  # each device was mid-stream when the server went away
    out = (await out_task).decode() + (await err_task).decode()
    assert "shutting down: closing" in out and "stopped" in out
    for secret in (ADMIN_PASSWORD, FLEET_SECRET, token):  # the real process's logs, at DEBUG
        assert secret not in out


@pytest.mark.timeout(60)
async def test_restart_on_the_same_store_delivers_pending_and_keeps_acked(core_factory: Callable[..., Any]) -> None:
    settings = make_settings(server={"node_id": "restart-node"})
    old: Core = await core_factory(settings)
    ops = await old.ops()
    on = await old.device("LIVE-1")
    off = await old.device("SLEEP-1")
    await off.close()
    cmds = old.app.deps.commands
    acked = await cmds.create("LIVE-1", "acked-one", {}, None, None, "admin")
    await on.push("device_command")
    assert (await on.request("/api/command/ack", {"command_id": acked["command_id"], "ok": True}))["code"] == 0
    unacked = await cmds.create("LIVE-1", "unacked-one", {}, None, None, "admin")
    assert (await on.push("device_command"))["values"]["command_id"] == unacked["command_id"]
    pend = [await cmds.create("SLEEP-1", f"queued-{i}", {}, None, None, "admin") for i in range(3)]
    [load] = await _loaded([on])
    await old.app.stop()
    assert await on.close_code() == 1001 and await ops.close_code() == 1001
    assert await load > 0
    new: Core = await core_factory(settings, store=old.app.deps.store.share())
    on2 = await new.device("LIVE-1")
    redelivered = await on2.push("device_command")
    assert redelivered["values"]["command_id"] == unacked["command_id"]  # sent, never acked: again, same id
    off2 = await new.device("SLEEP-1")
    got = [(await off2.push("device_command"))["values"]["command_id"] for _ in pend]
    assert got == [p["command_id"] for p in pend]  # oldest first
    # The acked command was not lost and not sent again.
    assert (await on2.request("/api/device/heartbeat"))["code"] == 0
    assert [p for p in list(on2.pushes._queue) if p.get("service") == "device_command"] == []  # type: ignore[attr-defined]
    doc = await new.app.deps.store.get_command(acked["command_id"])
    assert doc is not None and doc["state"] == "acked"
    for p in pend:
        ack = await off2.request("/api/command/ack", {"command_id": p["command_id"], "ok": True})
        assert ack["values"]["state"] == "acked"


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors this test needs")


@pytest.mark.timeout(90)
async def test_500_devices_reconnecting_at_once_all_get_in_and_get_their_commands(
    core_factory: Callable[..., Any]
) -> None:
    n = 500
    _raise_nofile(4 * n + 256)
    core = await core_factory(make_settings(limits={"rate_per_s": 1000, "rate_burst": 1000}))
    store, cmds = core.app.deps.store, core.app.deps.commands
    secret = "reconnect-storm-secret-0123"
    now = utc(time.time())
    for i in range(n):
        assert await store.create_device(f"STORM-{i}", "retail", f"storm {i}", secret, now)
    ts = int(time.time())

    async def first_login(sn: str) -> RawSocket:
        raw = await RawSocket.connect(core.port)
        raw.send_json({"service": "/api/user/login", "request_id": 1, "values": {
            "sn": sn, "timestamp": ts, "token": device_token(secret, sn, ts), "type": "retail"}})
        op, payload = await raw.read_frame(30)
        assert op == 0x1 and json.loads(payload)["code"] == 0
        return raw

    # The fleet is online, then every connection drops at once (a network outage)...
    first = []
    for batch in range(0, n, 100):
        first += await asyncio.gather(*(first_login(f"STORM-{i}") for i in range(batch, batch + 100)))
    for raw in first:
        raw.writer.transport.abort()
    await asyncio.wait_for(core.app.gateway.empty.wait(), 30)
    # ...commands are issued while it is away...
    ids = {}
    for i in range(n):
        ids[f"STORM-{i}"] = (await cmds.create(f"STORM-{i}", "wake", {"i": i}, None, None, "admin"))["command_id"]
    ts += 1  # a fresh token: the first one is in the replay cache

    # ...and the whole fleet comes back at once.
    async def reconnect(sn: str) -> tuple[RawSocket, float]:
        raw = await RawSocket.connect(core.port)
        raw.send_json({"service": "/api/user/login", "request_id": 1, "values": {
            "sn": sn, "timestamp": ts, "token": device_token(secret, sn, ts), "type": "retail"}})
        fr = FrameReader(raw.reader)
        login = command = None
        while login is None or command is None:
            for _op, payload in await fr.frames(10, 30):
                msg = json.loads(payload)
                if msg["op"] == "galbot_response":
                    login = msg
                elif msg.get("service") == "device_command":
                    command = msg
        assert login["code"] == 0, login
        assert command["values"]["command_id"] == ids[sn]
        return raw, time.monotonic()

    start = time.monotonic()
    tasks = [asyncio.create_task(reconnect(f"STORM-{i}")) for i in range(n)]
    launched = time.monotonic() - start
    done = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert launched < 1.0  # every reconnect was under way within one second
    assert len(done) == n
    assert core.app.deps.hub.counts()["device"] == n
    states = {c["state"] for c in await store.list_commands(None, None, limit=2 * n)}
    assert states == {"sent"}
    for raw, _ in done:
        raw.close()
