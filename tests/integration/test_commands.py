"""The command outbox over real sockets and HTTP (PROTOCOL §5): delivery, acks, retries, expiry, cancel, restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import Core, make_settings
from fleetkit import ADMIN_PASSWORD, Client
from pymongo.errors import AutoReconnect

from core.clock import ManualClock

Factory = Callable[..., Any]


async def bearer(core: Core, username: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.AsyncClient:
    """An HTTP client logged in through the API."""
    c = httpx.AsyncClient(base_url=core.http_url, timeout=5, verify=False)
    r = await c.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    c.headers["Authorization"] = f"Bearer {r.json()['token']}"
    return c


@pytest.fixture
async def api(core: Core) -> AsyncIterator[httpx.AsyncClient]:
    """An admin HTTP client of the default core."""
    c = await bearer(core)
    yield c
    await c.aclose()


async def device_at(core: Core, sn: str, clock: ManualClock, type_: str = "retail") -> Client:
    """A device logged in with a token stamped by the test's manual clock."""
    c = await core.client()
    reply = await c.login_device(sn, type_, timestamp=int(clock.time()))
    assert reply["code"] == 0, reply
    return c


async def no_push(client: Client, service: str) -> None:
    """Assert nothing of `service` was pushed: a request round trip comes after any push already queued."""
    reply = await client.request("/api/device/heartbeat", {})
    assert reply["code"] == 0
    queued = [client.pushes.get_nowait() for _ in range(client.pushes.qsize())]
    assert [p for p in queued if p.get("service") == service] == []


_last_ts = [0]


async def login(core: Core, sn: str, type_: str = "retail") -> Client:
    """A device logged in on the system clock with a timestamp not used before (no replay)."""
    c = await core.client()
    ts = _last_ts[0] = max(int(time.time()), _last_ts[0] + 1)
    reply = await c.login_device(sn, type_, timestamp=ts)
    assert reply["code"] == 0, reply
    return c


async def register(core: Core, sn: str) -> None:
    """Make a device known (first login with the fleet secret), then leave it offline."""
    dev = await login(core, sn)
    await dev.close()


async def test_command_to_online_device_is_pushed_acked_and_visible(core: Core, api: httpx.AsyncClient) -> None:
    ops = await core.ops()
    assert (await ops.request("/admin/device/subscribe", {"sns": ["R-1"]}))["code"] == 0
    dev = await login(core, "R-1")
    r = await api.post("/api/v1/devices/R-1/commands", json={"command": "dance", "args": {"speed": 2}})
    assert r.status_code == 202 and r.json()["state"] == "sent"
    cid = r.json()["command_id"]
    push = await dev.push("device_command")
    v = push["values"]
    assert v["command_id"] == cid and v["command"] == "dance" and v["args"] == {"speed": 2}
    assert v["issued_at"] and v["expires_at"] > v["issued_at"]
    ack = await dev.request("/api/command/ack", {"command_id": cid, "ok": True, "msg": "done", "values": {"x": 1}})
    assert ack["code"] == 0 and ack["values"] == {"command_id": cid, "state": "acked"}
    got = (await api.get(f"/api/v1/commands/{cid}")).json()
    assert got["state"] == "acked" and got["attempts"] == 1 and got["acked_at"] and got["sent_at"]
    assert got["result"] == {"ok": True, "code": 0, "msg": "done", "values": {"x": 1}}
    assert got["issued_by"] == "admin" and got["sn"] == "R-1" and got["args"] == {"speed": 2}
    states = [(await ops.push("command_update"))["values"]["state"] for _ in range(3)]
    assert states == ["pending", "sent", "acked"]
    listed = (await api.get("/api/v1/commands", params={"sn": "R-1", "state": "acked"})).json()["commands"]
    assert [c["command_id"] for c in listed] == [cid]


async def test_failed_ack_then_second_ack_conflicts_and_foreign_ack_is_unknown(
    core: Core, api: httpx.AsyncClient
) -> None:
    dev = await login(core, "R-1")
    other = await login(core, "R-2")
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "jump"})).json()["command_id"]
    await dev.push("device_command")
    foreign = await other.request("/api/command/ack", {"command_id": cid, "ok": True})
    assert foreign["code"] == 404 and foreign["result"] is False
    failed = await dev.request("/api/command/ack", {"command_id": cid, "ok": False, "code": 7, "msg": "stuck"})
    assert failed["code"] == 0 and failed["values"]["state"] == "failed"
    again = await dev.request("/api/command/ack", {"command_id": cid, "ok": True})
    assert again["code"] == 409 and again["values"]["state"] == "failed"
    got = (await api.get(f"/api/v1/commands/{cid}")).json()
    assert got["state"] == "failed" and got["result"]["code"] == 7
    unknown = await dev.request("/api/command/ack", {"command_id": "c-nope", "ok": True})
    assert unknown["code"] == 404


async def test_commands_to_offline_device_wait_and_arrive_oldest_first_on_login(
    core: Core, api: httpx.AsyncClient
) -> None:
    await register(core, "R-1")
    ids = []
    for name in ("first", "second", "third"):
        r = await api.post("/api/v1/devices/R-1/commands", json={"command": name})
        assert r.status_code == 202 and r.json()["state"] == "pending"
        ids.append(r.json()["command_id"])
    dev = await login(core, "R-1")
    got = [(await dev.push("device_command"))["values"] for _ in ids]
    assert [g["command_id"] for g in got] == ids and [g["command"] for g in got] == ["first", "second", "third"]
    for cid in ids:
        assert (await dev.request("/api/command/ack", {"command_id": cid, "ok": True}))["values"]["state"] == "acked"
    states = {c["command_id"]: c["state"] for c in (await api.get("/api/v1/commands")).json()["commands"]}
    assert states == dict.fromkeys(ids, "acked")


async def test_unknown_device_command_is_404(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/devices/NOPE-1/commands", json={"command": "dance"})
    assert r.status_code == 404 and r.json()["code"] == 404


async def test_lost_ack_is_redelivered_with_same_id_and_backoff_doubles(core_factory: Factory) -> None:
    clock = ManualClock()
    core = await core_factory(make_settings(commands={"sweep_interval_s": 0.02, "ack_timeout_s": 10}), clock=clock)
    dev = await device_at(core, "R-1", clock)
    api = await bearer(core)
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "dance"})).json()["command_id"]
    assert (await dev.push("device_command"))["values"]["command_id"] == cid
    clock.advance(9)
    await core.app.deps.commands.sweep()
    await no_push(dev, "device_command")
    clock.advance(1)  # ack_timeout reached: sent again
    assert (await dev.push("device_command"))["values"]["command_id"] == cid
    assert (await api.get(f"/api/v1/commands/{cid}")).json()["attempts"] == 2
    clock.advance(10)  # the second wait is twice as long: nothing yet
    await core.app.deps.commands.sweep()
    await no_push(dev, "device_command")
    clock.advance(10)
    assert (await dev.push("device_command"))["values"]["command_id"] == cid
    got = (await api.get(f"/api/v1/commands/{cid}")).json()
    assert got["attempts"] == 3 and got["state"] == "sent"
    ack = await dev.request("/api/command/ack", {"command_id": cid, "ok": True})
    assert ack["values"]["state"] == "acked"
    await api.aclose()


async def test_expiry_while_offline_is_never_delivered(core_factory: Factory) -> None:
    clock = ManualClock()
    core = await core_factory(clock=clock)
    api = await bearer(core)
    dev = await device_at(core, "R-1", clock)
    await dev.close()
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {"types": ["retail"]})
    r = await api.post("/api/v1/devices/R-1/commands", json={"command": "dance", "ttl_s": 30})
    cid = r.json()["command_id"]
    assert r.json()["state"] == "pending"
    assert (await ops.push("command_update"))["values"]["state"] == "pending"
    clock.advance(31)
    update = await ops.push("command_update")
    assert update["values"]["command_id"] == cid and update["values"]["state"] == "expired"
    dev = await device_at(core, "R-1", clock)
    await no_push(dev, "device_command")
    assert (await api.get(f"/api/v1/commands/{cid}")).json()["state"] == "expired"
    late = await dev.request("/api/command/ack", {"command_id": cid, "ok": True})
    assert late["code"] == 409
    await api.aclose()


async def test_cancel_tells_the_device_and_blocks_later_acks(core: Core, api: httpx.AsyncClient) -> None:
    dev = await login(core, "R-1")
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "dance"})).json()["command_id"]
    await dev.push("device_command")
    r = await api.post(f"/api/v1/commands/{cid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "canceled" and r.json()["command_id"] == cid
    assert (await dev.push("command_canceled"))["values"] == {"command_id": cid}
    ack = await dev.request("/api/command/ack", {"command_id": cid, "ok": True})
    assert ack["code"] == 409
    again = await api.post(f"/api/v1/commands/{cid}/cancel")
    assert again.status_code == 409 and again.json()["code"] == 409
    assert (await api.post("/api/v1/commands/c-nope/cancel")).status_code == 404
    assert (await api.get(f"/api/v1/commands/{cid}")).json()["state"] == "canceled"


async def test_cancel_of_pending_command_means_it_is_never_delivered(core: Core, api: httpx.AsyncClient) -> None:
    await register(core, "R-1")
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "dance"})).json()["command_id"]
    assert (await api.post(f"/api/v1/commands/{cid}/cancel")).json()["state"] == "canceled"
    dev = await login(core, "R-1")
    await no_push(dev, "device_command")


async def test_idempotency_key_returns_the_same_command(core: Core, api: httpx.AsyncClient) -> None:
    await register(core, "R-1")
    body = {"command": "dance", "idempotency_key": "order-17"}
    first = await api.post("/api/v1/devices/R-1/commands", json=body)
    second = await api.post("/api/v1/devices/R-1/commands", json=body)
    assert first.status_code == second.status_code == 202 and first.json() == second.json()
    racing = await asyncio.gather(
        *(api.post("/api/v1/devices/R-1/commands", json={**body, "idempotency_key": "race"}) for _ in range(8))
    )
    assert {r.status_code for r in racing} == {202}
    assert len({r.text for r in racing}) == 1
    listed = (await api.get("/api/v1/commands", params={"sn": "R-1"})).json()["commands"]
    assert len(listed) == 2
    # The key is per device: another device gets its own command.
    await register(core, "R-2")
    other = await api.post("/api/v1/devices/R-2/commands", json=body)
    assert other.json()["command_id"] != first.json()["command_id"]


async def test_idempotent_creates_racing_for_an_online_device_agree(core: Core, api: httpx.AsyncClient) -> None:
    dev = await login(core, "R-1")
    body = {"command": "dance", "idempotency_key": "k-online"}
    racing = await asyncio.gather(*(api.post("/api/v1/devices/R-1/commands", json=body) for _ in range(6)))
    assert len({r.json()["command_id"] for r in racing}) == 1
    assert len({r.text for r in racing}) == 1, [r.text for r in racing]
    assert (await dev.push("device_command"))["values"]["command_id"] == racing[0].json()["command_id"]


async def test_ws_command_service_needs_operator(core: Core) -> None:
    await core.app.deps.auth.create_user("vic", "viewer-pass", "viewer")
    await register(core, "R-1")
    viewer = await core.ops("vic", "viewer-pass")
    denied = await viewer.request("/admin/device/command", {"sn": "R-1", "command": "dance"})
    assert denied["code"] == 403
    admin = await core.ops()
    ok = await admin.request("/admin/device/command", {"sn": "R-1", "command": "dance", "ttl_s": 60})
    assert ok["code"] == 0 and ok["values"]["state"] == "pending"
    bad = await admin.request("/admin/device/command", {"sn": "R-1", "command": "dance", "ttl_s": 0})
    assert bad["code"] == 400 and bad["values"]["errors"][0]["field"] == "ttl_s"


async def test_restart_loses_no_pending_command(core_factory: Factory) -> None:
    first = await core_factory()
    api = await bearer(first)
    await register(first, "R-1")
    ids = [(await api.post("/api/v1/devices/R-1/commands", json={"command": f"c{i}"})).json()["command_id"]
           for i in range(3)]
    await api.aclose()
    await first.app.stop()
    second = await core_factory(store=first.app.deps.store.share())
    dev = await login(second, "R-1")
    got = [(await dev.push("device_command"))["values"]["command_id"] for _ in ids]
    assert got == ids
    for cid in ids:
        assert (await dev.request("/api/command/ack", {"command_id": cid, "ok": True}))["values"]["state"] == "acked"
    api2 = await bearer(second)
    states = [c["state"] for c in (await api2.get("/api/v1/commands")).json()["commands"]]
    assert states == ["acked"] * 3
    await api2.aclose()


class _FailingInserts:
    """A commands collection whose inserts fail as if the server went away mid-request."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def insert_one(self, *a: Any, **kw: Any) -> Any:
        raise AutoReconnect("connection reset")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_create_is_never_accepted_unless_stored(core: Core, api: httpx.AsyncClient) -> None:
    dev = await login(core, "R-1")
    store = core.app.deps.store
    real = store.commands
    store.commands = _FailingInserts(real)  # type: ignore[assignment]
    try:
        r = await api.post("/api/v1/devices/R-1/commands", json={"command": "dance"})
        assert r.status_code == 503 and r.json()["code"] == 503
        admin = await core.ops()
        ws = await admin.request("/admin/device/command", {"sn": "R-1", "command": "dance"})
        assert ws["code"] == 503 and ws["result"] is False
    finally:
        store.commands = real
    await no_push(dev, "device_command")
    assert (await api.get("/api/v1/commands")).json()["commands"] == []


async def test_unstorable_args_are_a_400(core: Core, api: httpx.AsyncClient) -> None:
    await register(core, "R-1")
    r = await api.post("/api/v1/devices/R-1/commands", content=b'{"command": "x", "args": {"n": 1' + b"0" * 30 + b"}}")
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "args"
    dev = await login(core, "R-1")
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "x"})).json()["command_id"]
    await dev.push("device_command")
    ack = await dev.request("/api/command/ack", {"command_id": cid, "ok": True, "values": {"n": 10**30}})
    assert ack["code"] == 400
    assert (await api.get(f"/api/v1/commands/{cid}")).json()["state"] == "sent"


async def test_unacked_command_is_delivered_again_on_reconnect(core: Core, api: httpx.AsyncClient) -> None:
    dev = await login(core, "R-1")
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "dance"})).json()["command_id"]
    assert (await dev.push("device_command"))["values"]["command_id"] == cid
    await dev.close()  # gone before it could ack
    dev = await login(core, "R-1")
    assert (await dev.push("device_command"))["values"]["command_id"] == cid
    got = (await api.get(f"/api/v1/commands/{cid}")).json()
    assert got["state"] == "sent" and got["attempts"] == 2
    assert (await dev.request("/api/command/ack", {"command_id": cid, "ok": True}))["values"]["state"] == "acked"


async def test_ack_and_cancel_racing_leave_exactly_one_outcome(core: Core, api: httpx.AsyncClient) -> None:
    dev = await login(core, "R-1")
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {"sns": ["R-1"]})
    for _ in range(5):
        cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "x"})).json()["command_id"]
        await dev.push("device_command")
        ack, cancel = await asyncio.gather(
            dev.request("/api/command/ack", {"command_id": cid, "ok": True}),
            api.post(f"/api/v1/commands/{cid}/cancel"),
        )
        final = (await api.get(f"/api/v1/commands/{cid}")).json()["state"]
        if final == "acked":
            assert ack["code"] == 0 and cancel.status_code == 409
        else:
            assert final == "canceled" and cancel.status_code == 200 and ack["code"] == 409
        updates = []
        while len(updates) < 3:  # pending, sent, then the one final state
            updates.append((await ops.push("command_update"))["values"]["state"])
        assert updates == ["pending", "sent", final]


async def test_idempotency_key_is_forgotten_after_its_window(core_factory: Factory) -> None:
    clock = ManualClock()
    core = await core_factory(make_settings(commands={"idempotency_window_s": 3600}), clock=clock)
    api = await bearer(core)
    await (await device_at(core, "R-1", clock)).close()
    body = {"command": "dance", "idempotency_key": "nightly", "ttl_s": 86400}
    first = (await api.post("/api/v1/devices/R-1/commands", json=body)).json()
    clock.advance(1800)
    assert (await api.post("/api/v1/devices/R-1/commands", json=body)).json() == first
    clock.advance(1801)
    later = (await api.post("/api/v1/devices/R-1/commands", json=body)).json()
    assert later["command_id"] != first["command_id"] and later["state"] == "pending"
    assert (await api.post("/api/v1/devices/R-1/commands", json=body)).json() == later
    await api.aclose()


async def test_restart_redelivers_a_sent_but_unacked_command(core_factory: Factory) -> None:
    first = await core_factory()
    api = await bearer(first)
    dev = await login(first, "R-1")
    cid = (await api.post("/api/v1/devices/R-1/commands", json={"command": "dance"})).json()["command_id"]
    await dev.push("device_command")
    await api.aclose()
    await first.app.stop()
    second = await core_factory(store=first.app.deps.store.share())
    dev = await login(second, "R-1")
    assert (await dev.push("device_command"))["values"]["command_id"] == cid
    assert (await dev.request("/api/command/ack", {"command_id": cid, "ok": True}))["values"]["state"] == "acked"
