"""The fleet simulator over real sockets on 127.0.0.1, against a minimal device-side server written here."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from core.simulate import Fleet, SimClock, SimConfig, add_arguments, main

SECRET = "test-fleet-secret"
WAIT = 10.0  # upper bound for every awaited condition


@dataclass
class MiniCore:
    """Just enough of the device side of PROTOCOL.md: HMAC login, status, ack, command pushes."""

    secret: str = SECRET
    secrets: dict[str, str] = field(default_factory=dict)
    window_s: float = 300.0
    logins: Counter[str] = field(default_factory=Counter)
    login_failures: int = 0
    reports: Counter[str] = field(default_factory=Counter)
    acks: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    client_closes: list[int | None] = field(default_factory=list)
    bad_envelopes: int = 0
    seen: set[tuple[str, int]] = field(default_factory=set)
    live: dict[str, ServerConnection] = field(default_factory=dict)
    origin_headers: int = 0
    status_code: int = 0  # the reply code for status reports; -1 = never reply
    # Scenario hooks, all optional: run after a device's n-th report / after an ack.
    on_report: Callable[[MiniCore, ServerConnection, str, int], Awaitable[None]] | None = None
    on_ack: Callable[[MiniCore, ServerConnection, str, dict[str, Any]], Awaitable[None]] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    push_seq: int = 0

    def poke(self) -> None:
        """Wake the waiters."""
        self.changed.set()

    async def wait(self, predicate: Callable[[], bool], limit_s: float = WAIT) -> None:
        """Wait until ``predicate()`` holds, bounded by ``limit_s`` seconds."""
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def push(self, ws: ServerConnection, service: str, values: dict[str, Any]) -> None:
        """Send a push frame."""
        self.push_seq += 1
        await ws.send(json.dumps({"op": "galbot_push", "service": service, "code": 0, "msg": "",
                                  "values": values, "result": True, "request_id": f"p-{self.push_seq}"}))

    async def handler(self, ws: ServerConnection) -> None:
        """One device connection."""
        if ws.request is not None and "Origin" in ws.request.headers:
            self.origin_headers += 1
        sn: str | None = None
        try:
            async for raw in ws:
                msg = json.loads(raw)
                if not isinstance(msg, dict) or msg.get("op", "galbot_request") != "galbot_request":
                    self.bad_envelopes += 1
                    continue
                service, rid, values = msg.get("service"), msg.get("request_id"), msg.get("values") or {}
                if service == "/api/user/login":
                    sn = self._login(values)
                    if sn is None:
                        self.login_failures += 1
                        await self._reply(ws, service, rid, 401, "login failed", None)
                        continue
                    old = self.live.get(sn)
                    self.live[sn] = ws
                    if old is not None and old is not ws:
                        await old.close(4409, "replaced")
                    self.logins[sn] += 1
                    await self._reply(ws, service, rid, 0, "", {"sn": sn, "type": values["type"],
                                                                "session_id": f"s-{sn}-{self.logins[sn]}",
                                                                "heartbeat_interval_s": 20,
                                                                "server_time": time.time()})
                elif sn is None:
                    await self._reply(ws, service, rid, 401, "not authenticated", None)
                elif service == "/api/device/status":
                    self._check_status(values)
                    self.reports[sn] += 1
                    if self.status_code == 0:
                        accepted = {"accepted": True, "ts": "2026-01-01T00:00:00Z"}
                        await self._reply(ws, service, rid, 0, "", accepted)
                    elif self.status_code > 0:
                        await self._reply(ws, service, rid, self.status_code, "rate limited", None)
                    if self.on_report is not None:
                        await self.on_report(self, ws, sn, self.reports[sn])
                elif service == "/api/command/ack":
                    cid = values["command_id"]
                    first = not self.acks[cid]
                    self.acks[cid].append(values)
                    if first:
                        state = "acked" if values["ok"] else "failed"
                        await self._reply(ws, service, rid, 0, "", {"command_id": cid, "state": state})
                    else:
                        await self._reply(ws, service, rid, 409, "command is already final", None)
                    if self.on_ack is not None:
                        await self.on_ack(self, ws, sn, values)
                else:
                    await self._reply(ws, service, rid, 404, "unknown service", None)
                self.poke()
        except ConnectionClosed:
            pass
        finally:
            if sn is not None and self.live.get(sn) is ws:
                del self.live[sn]
            self.client_closes.append(ws.close_code)
            self.poke()

    def _login(self, values: dict[str, Any]) -> str | None:
        """Verify the HMAC token, the time window and replays; the serial number when accepted."""
        sn, ts, token = values.get("sn"), values.get("timestamp"), values.get("token")
        if not isinstance(sn, str) or not isinstance(ts, int) or not isinstance(token, str):
            return None
        assert values.get("type") in ("retail", "dance_robot", "dance_dog", "rubbish")
        assert isinstance(values.get("firmware"), str)
        key = self.secrets.get(sn, self.secret)
        expected = hmac.new(key.encode(), f"{sn}:{ts}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, token) or abs(time.time() - ts) > self.window_s:
            return None
        if (sn, ts) in self.seen:
            return None
        self.seen.add((sn, ts))
        return sn

    def _check_status(self, values: dict[str, Any]) -> None:
        """The report keeps PROTOCOL §3's field limits."""
        assert 0 <= values["battery"] <= 100
        for name in ("location", "inspection", "rubbish", "electricity"):
            assert isinstance(values[f"{name}_code"], int)
            assert len(values[f"{name}_msg"]) <= 256
        assert len(json.dumps(values["extra"]).encode()) <= 4096

    async def _reply(self, ws: ServerConnection, service: Any, rid: Any, code: int, msg: str,
                     values: dict[str, Any] | None) -> None:
        """Send the one reply to a request."""
        await ws.send(json.dumps({"op": "galbot_response", "service": service, "code": code, "msg": msg,
                                  "values": values, "result": code == 0, "request_id": rid}))


@pytest.fixture
async def core() -> AsyncIterator[tuple[MiniCore, str]]:
    """A running MiniCore on an ephemeral 127.0.0.1 port and its URL."""
    mini = MiniCore()
    server: Server = await serve(mini.handler, "127.0.0.1", 0, ping_interval=None)
    port = next(iter(server.sockets)).getsockname()[1]
    try:
        yield mini, f"ws://127.0.0.1:{port}/ws"
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


def config(url: str, **kw: Any) -> SimConfig:
    """A fast, deterministic simulator configuration for tests."""
    base: dict[str, Any] = dict(url=url, devices=4, interval_s=0.05, secret=SECRET, seed=7,
                                ack_failure_rate=0.0, slow_ack_rate=0.0, max_backoff_s=0.2,
                                base_backoff_s=0.02, connect_rate_per_s=1000.0)
    base.update(kw)
    return SimConfig(**base)


async def test_login_report_dedup_ack_and_reconnect(core: tuple[MiniCore, str]) -> None:
    """Every device logs in and reports; a command pushed twice is acked once; a dropped link comes back."""
    mini, url = core
    target: dict[str, str] = {}

    async def on_report(m: MiniCore, ws: ServerConnection, sn: str, n: int) -> None:
        if n == 2 and not target:
            target["sn"] = sn
            command = {"command_id": "c-1", "command": "dock", "args": {},
                       "issued_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:05:00Z"}
            await m.push(ws, "device_command", command)
            await m.push(ws, "device_command", command)  # at-least-once: the device must de-duplicate

    mini.on_report = on_report
    fleet = Fleet(config(url))
    await fleet.start()
    try:
        assert await fleet.wait_connected(4, WAIT)
        await mini.wait(lambda: len(mini.reports) == 4 and min(mini.reports.values()) >= 3)
        assert await fleet.wait_until(lambda s: s.acks_confirmed == 1 and s.commands_received == 2, WAIT)
        sn = target["sn"]
        mini.live[sn].transport.abort()  # drop the link once, without a close frame
        await mini.wait(lambda: mini.logins[sn] >= 2 and sn in mini.live)
        # After the reconnect the command arrives yet again (as after a core restart): still no second ack.
        await mini.push(mini.live[sn], "device_command", {"command_id": "c-1", "command": "dock", "args": {}})
        assert await fleet.wait_until(lambda s: s.commands_received == 3, WAIT)
        before = mini.reports[sn]
        await mini.wait(lambda: mini.reports[sn] >= before + 2)
    finally:
        await fleet.stop()
    stats = fleet.stats()
    assert [a["ok"] for a in mini.acks["c-1"]] == [True]
    assert stats.commands_duplicate == 2
    assert stats.acks_sent == 1
    assert stats.reconnects >= 1 and stats.closes[1006] >= 1
    assert stats.logins == sum(mini.logins.values()) >= 5
    assert stats.reports_acked > 0 and stats.reports_sent >= stats.reports_acked
    assert mini.login_failures == 0 and mini.bad_envelopes == 0 and mini.origin_headers == 0
    docked = next(d for d in fleet.devices if d.sn == sn)
    assert docked.model.mode in ("returning", "charging")


async def test_stop_closes_every_socket_with_1000(core: tuple[MiniCore, str]) -> None:
    """Fleet.stop() closes each connection cleanly with 1000."""
    mini, url = core
    fleet = Fleet(config(url, devices=8))
    await fleet.start()
    assert await fleet.wait_connected(8, WAIT)
    await fleet.stop()
    await mini.wait(lambda: len(mini.client_closes) == 8)
    assert mini.client_closes == [1000] * 8
    assert fleet.stats().connected == 0


async def test_bad_secret_backs_off_and_counts_401(core: tuple[MiniCore, str]) -> None:
    """A refused login is counted by code and retried with backoff; a per-device secret fixes one device."""
    mini, url = core
    fleet = Fleet(config(url, devices=2, secret="wrong", types=["rubbish"]))
    good_sn = fleet.devices[1].sn
    mini.secrets[good_sn] = "per-device"
    fleet.config.secrets = {good_sn: "per-device"}
    await fleet.start()
    try:
        assert await fleet.wait_until(lambda s: s.login_failures >= 3 and s.reconnects >= 3 and s.connected == 1, WAIT)
    finally:
        await fleet.stop()
    stats = fleet.stats()
    assert stats.errors[401] == stats.login_failures
    assert mini.login_failures - 1 <= stats.login_failures <= mini.login_failures  # one may be in flight
    assert stats.reconnects >= 3
    assert set(mini.logins) == {good_sn}


async def test_slow_ack_and_cancel(core: tuple[MiniCore, str]) -> None:
    """A slow ack waits for its delay; command_canceled drops it; the other slow ack goes out later."""
    mini, url = core
    gate = asyncio.Event()
    parked = asyncio.Event()
    slow_s = 123.0

    async def sleep_fn(seconds: float) -> None:
        if seconds == slow_s:  # the slow-ack delay waits for the test, not the wall clock
            parked.set()
            await gate.wait()
        else:
            await asyncio.sleep(seconds)

    pushed: list[str] = []

    async def on_report(m: MiniCore, ws: ServerConnection, sn: str, n: int) -> None:
        if n == 1 and not pushed:
            pushed.append(sn)
            await m.push(ws, "device_command", {"command_id": "slow-1", "command": "stop", "args": {}})
            await m.push(ws, "device_command", {"command_id": "slow-2", "command": "teleport", "args": {}})
            await m.push(ws, "command_canceled", {"command_id": "slow-1"})

    mini.on_report = on_report
    fleet = Fleet(config(url, devices=1, slow_ack_rate=1.0, slow_ack_s=slow_s,
                         clock=SimClock(sleep_fn=sleep_fn)))
    await fleet.start()
    try:
        assert await fleet.wait_until(lambda s: s.commands_canceled == 1 and s.acks_slow == 2, WAIT)
        await asyncio.wait_for(parked.wait(), WAIT)
        assert not mini.acks
        gate.set()
        await mini.wait(lambda: "slow-2" in mini.acks)
        assert await fleet.wait_until(lambda s: s.acks_confirmed == 1, WAIT)
    finally:
        await fleet.stop()
    assert "slow-1" not in mini.acks
    (ack,) = mini.acks["slow-2"]
    assert ack["ok"] is False and "unknown command" in ack["msg"]
    assert fleet.devices[0].model.mode != "stopped"


async def test_replaced_connection_backs_off_and_gives_up(core: tuple[MiniCore, str]) -> None:
    """Two simulators with the same serial numbers evict each other (4409) until one gives up."""
    _, url = core
    a = Fleet(config(url, devices=1, max_backoff_s=0.1, max_replaced=2, seed=1))
    b = Fleet(config(url, devices=1, max_backoff_s=0.1, max_replaced=2, seed=2))
    await a.start()
    assert await a.wait_connected(1, WAIT)
    await b.start()
    try:
        assert await a.wait_until(lambda s: s.gave_up + b.stats().gave_up >= 1, WAIT)
        survivor = b if a.stats().gave_up else a
        assert await survivor.wait_connected(1, WAIT)
    finally:
        await a.stop()
        await b.stop()
    assert a.stats().closes[4409] + b.stats().closes[4409] >= 2
    assert a.stats().gave_up + b.stats().gave_up == 1


async def test_error_replies_are_counted_and_silence_reconnects(core: tuple[MiniCore, str]) -> None:
    """Non-zero reply codes are counted without dropping the link; unanswered requests end the session."""
    mini, url = core
    mini.status_code = 429
    fleet = Fleet(config(url, devices=2, request_timeout_s=0.3))
    await fleet.start()
    try:
        assert await fleet.wait_until(lambda s: s.errors[429] >= 6, WAIT)
        assert fleet.stats().reconnects == 0 and fleet.stats().reports_acked == 0
        mini.status_code = -1  # the server goes quiet: replies stop, the link looks alive
        assert await fleet.wait_until(lambda s: s.reply_timeouts >= 2 and s.reconnects >= 2, WAIT)
        mini.status_code = 0
        assert await fleet.wait_until(lambda s: s.connected == 2 and s.reports_acked >= 4, WAIT)
    finally:
        await fleet.stop()
    assert fleet.stats().closes[1000] >= 2


async def test_a_slow_server_gets_at_most_two_reports_in_flight(core: tuple[MiniCore, str]) -> None:
    """While status replies are outstanding, a device skips beats instead of piling up requests."""
    mini, url = core
    mini.status_code = -1
    fleet = Fleet(config(url, devices=1, request_timeout_s=WAIT * 3))
    await fleet.start()
    try:
        assert await fleet.wait_until(lambda s: s.reports_skipped >= 5, WAIT)
    finally:
        await fleet.stop()
    assert list(mini.reports.values()) == [2]
    assert fleet.stats().reconnects == 0 and fleet.stats().reply_timeouts == 0


async def test_main_runs_for_duration_and_prints_summary(core: tuple[MiniCore, str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI entry point runs a fleet for --duration and prints a final summary without the secret."""
    mini, url = core
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--url", url, "--devices", "3", "--interval", "0.05", "--secret", SECRET,
                              "--seed", "3", "--duration", "0.5", "--types", "dance_dog", "retail"])
    rc = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out
    assert rc == 0
    assert "final connected=" in out
    assert SECRET not in out
    assert len(mini.logins) == 3 and sum(mini.reports.values()) >= 3
    await mini.wait(lambda: len(mini.client_closes) == 3)
    assert mini.client_closes == [1000] * 3
