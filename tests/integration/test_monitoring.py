"""Device monitoring over real sockets: status ingest, history, subscriptions, presence with reasons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
from conftest import Core, make_settings
from fleetkit import ADMIN_PASSWORD, Client

from core.broker import Delivery, LocalDeliver, Target
from core.clock import ManualClock, iso, utc

Factory = Callable[..., Any]
_last_ts = [0]


async def login(core: Core, sn: str, type_: str = "retail", clock: ManualClock | None = None) -> Client:
    """A device logged in with a timestamp not used before (the replay cache is per (sn, timestamp))."""
    c = await core.client()
    if clock is not None:
        ts = int(clock.time())
    else:
        ts = _last_ts[0] = max(int(time.time()), _last_ts[0] + 1)
    reply = await c.login_device(sn, type_, timestamp=ts)
    assert reply["code"] == 0, reply
    return c


async def bearer(core: Core) -> httpx.AsyncClient:
    """An admin HTTP client."""
    c = httpx.AsyncClient(base_url=core.http_url, timeout=5, verify=False)
    r = await c.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
    c.headers["Authorization"] = f"Bearer {r.json()['token']}"
    return c


async def quiet(client: Client, service: str) -> None:
    """Assert no push of `service` is queued: a request's reply comes after every push queued before it."""
    assert (await client.request("/admin/device/list", {}))["code"] == 0
    queued = [client.pushes.get_nowait() for _ in range(client.pushes.qsize())]
    assert [p for p in queued if p.get("service") == service] == []


async def test_reports_are_stored_pushed_and_listed(core_factory: Factory) -> None:
    clock = ManualClock()
    core = await core_factory(clock=clock)
    ops = await core.ops()
    assert (await ops.request("/admin/device/subscribe", {"sns": ["R-1"]}))["code"] == 0
    dev = await login(core, "R-1", clock=clock)
    stamps = []
    for i in range(5):
        reply = await dev.request("/api/device/status", {"battery": 50 + i, "location_msg": f"aisle {i}"})
        assert reply["code"] == 0 and reply["values"]["accepted"] is True
        assert reply["values"]["ts"] == iso(utc(clock.time()))
        stamps.append(reply["values"]["ts"])
        pushed = await ops.push("device_status")
        assert pushed["values"]["sn"] == "R-1" and pushed["values"]["type"] == "retail"
        assert pushed["values"]["battery"] == 50 + i and pushed["values"]["ts"] == stamps[-1]
        clock.advance(10)
    hist = await ops.request("/admin/device/history", {"sn": "R-1"})
    assert [s["battery"] for s in hist["values"]["snapshots"]] == [54, 53, 52, 51, 50]
    assert hist["values"]["snapshots"][0]["ts"] == stamps[-1] and hist["values"]["snapshots"][0]["sn"] == "R-1"
    window = await ops.request("/admin/device/history", {"sn": "R-1", "since": stamps[1], "until": stamps[3]})
    assert [s["battery"] for s in window["values"]["snapshots"]] == [53, 52, 51]
    limited = await ops.request("/admin/device/history", {"sn": "R-1", "limit": 2})
    assert [s["battery"] for s in limited["values"]["snapshots"]] == [54, 53]
    api = await bearer(core)
    r = await api.get("/api/v1/devices/R-1/status", params={"since": stamps[2], "limit": 2})
    assert r.status_code == 200 and [s["battery"] for s in r.json()["snapshots"]] == [54, 53]
    assert (await api.get("/api/v1/devices/R-1/status")).json()["snapshots"] == hist["values"]["snapshots"]
    unknown = await ops.request("/admin/device/history", {"sn": "NOPE"})
    assert unknown["code"] == 404
    listed = (await ops.request("/admin/device/list", {}))["values"]["devices"]
    assert len(listed) == 1 and listed[0]["online"] is True
    assert listed[0]["status"]["battery"] == 54 and listed[0]["status"]["location_msg"] == "aisle 4"
    assert listed[0]["status"]["ts"] == stamps[-1] and listed[0]["last_seen"] == stamps[-1]
    one = (await api.get("/api/v1/devices/R-1")).json()
    assert one["status"]["battery"] == 54 and one["last_seen"] == stamps[-1] and "secret" not in one
    await api.aclose()


async def test_subscriptions_by_sn_and_type_and_unsubscribe(core: Core) -> None:
    by_sn = await core.ops()
    by_type = await core.ops()
    nobody = await core.ops()
    await by_sn.request("/admin/device/subscribe", {"sns": ["DOG-1"]})
    await by_type.request("/admin/device/subscribe", {"types": ["retail"]})
    dog = await login(core, "DOG-1", "dance_dog")
    shop = await login(core, "SHOP-1", "retail")
    await dog.request("/api/device/status", {"battery": 10})
    await shop.request("/api/device/status", {"battery": 20})
    assert (await by_sn.push("device_status"))["values"]["sn"] == "DOG-1"
    assert (await by_type.push("device_status"))["values"]["sn"] == "SHOP-1"
    await quiet(by_sn, "device_status")
    await quiet(by_type, "device_status")
    await quiet(nobody, "device_status")
    assert (await by_type.request("/admin/device/unsubscribe", {"types": ["retail"]}))["values"]["removed"] == 1
    await shop.request("/api/device/status", {"battery": 21})
    await dog.request("/api/device/status", {"battery": 11})
    assert (await by_sn.push("device_status"))["values"]["battery"] == 11
    await quiet(by_type, "device_status")


async def test_invalid_reports_get_400_with_field_errors(core: Core) -> None:
    dev = await login(core, "R-1")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"battery": 101}, "battery"),
        ({"battery": "full"}, "battery"),
        ({"location_msg": "x" * 257}, "location_msg"),
        ({"location_code": 1.5}, "location_code"),
        ({"extra": {"blob": "y" * 5000}}, "extra"),
        ({"colour": "red"}, "colour"),
        ({"sn": "OTHER-1", "battery": 5}, ""),
    ]
    for values, field in cases:
        reply = await dev.request("/api/device/status", values)
        assert reply["result"] is False, values
        if field:
            assert reply["code"] == 400
            assert field in [e["field"] for e in reply["values"]["errors"]], reply
        else:
            assert reply["code"] == 403
    empty = await dev.request("/api/device/status", {})
    assert empty["code"] == 400 and empty["values"]["errors"]
    ops = await core.ops()
    hist = await ops.request("/admin/device/history", {"sn": "R-1"})
    assert hist["values"]["snapshots"] == []


async def test_concurrent_reports_are_all_stored_in_few_writes(core: Core) -> None:
    # On MongoDB (no inline writes: the embedded engine's is switched off here) reports that
    # arrive together are group-committed.
    store = core.app.deps.store
    store.insert_status_now = lambda snapshots: False  # type: ignore[method-assign]
    devices = [await login(core, f"R-{i:03d}") for i in range(40)]
    calls: list[int] = []
    real = store.insert_status

    async def counting(docs: Any, *a: Any, **kw: Any) -> Any:
        calls.append(len(docs))
        return await real(docs, *a, **kw)

    store.insert_status = counting  # type: ignore[method-assign]
    replies = await asyncio.gather(
        *(d.request("/api/device/status", {"battery": float(n)}) for d in devices for n in range(5))
    )
    assert all(r["code"] == 0 for r in replies)
    assert sum(calls) == 200 and len(calls) < 200
    api = await bearer(core)
    for i in (0, 17, 39):
        snaps = (await api.get(f"/api/v1/devices/R-{i:03d}/status")).json()["snapshots"]
        assert sorted(s["battery"] for s in snaps) == [0.0, 1.0, 2.0, 3.0, 4.0]
    await api.aclose()


async def test_one_unstorable_report_does_not_fail_the_others(core: Core) -> None:
    good = [await login(core, f"G-{i}") for i in range(5)]
    bad = await login(core, "B-1")
    replies = await asyncio.gather(
        bad.request("/api/device/status", {"extra": {"n": 10**30}}),
        *(d.request("/api/device/status", {"battery": 42}) for d in good),
    )
    assert replies[0]["code"] == 400 and replies[0]["values"]["errors"][0]["field"] == "extra"
    assert [r["code"] for r in replies[1:]] == [0] * 5


async def test_presence_online_closed_and_replaced(core: Core) -> None:
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {})
    dev = await login(core, "R-1")
    on = await ops.push("device_online")
    assert on["values"]["sn"] == "R-1" and on["values"]["type"] == "retail" and on["values"]["ts"]
    newer = await login(core, "R-1")
    assert await dev.close_code() == 4409
    off = await ops.push("device_offline")
    assert off["values"]["sn"] == "R-1" and off["values"]["reason"] == "replaced"
    assert (await ops.push("device_online"))["values"]["sn"] == "R-1"
    # The newer connection still works and the device is still online.
    assert (await newer.request("/api/device/status", {"battery": 3}))["code"] == 0
    listed = (await ops.request("/admin/device/list", {"online": True}))["values"]["devices"]
    assert [d["sn"] for d in listed] == ["R-1"]
    await newer.close()
    off = await ops.push("device_offline")
    assert off["values"]["reason"] == "closed"
    listed = (await ops.request("/admin/device/list", {}))["values"]["devices"]
    assert listed[0]["online"] is False and listed[0]["offline_reason"] == "closed"
    back = await login(core, "R-1")
    await ops.push("device_online")
    listed = (await ops.request("/admin/device/list", {}))["values"]["devices"]
    assert listed[0]["online"] is True and listed[0]["offline_reason"] is None
    await back.close()


async def test_heartbeat_timeout_closes_4408_and_reports_offline(core_factory: Factory) -> None:
    clock = ManualClock()
    core = await core_factory(make_settings(heartbeat={"interval_s": 5, "timeout_s": 15}), clock=clock)
    ops = await core.ops()
    await ops.request("/admin/device/subscribe", {"sns": ["R-1"]})
    dev = await login(core, "R-1", clock=clock)
    await ops.push("device_online")
    clock.advance(10)
    await ops.request("/admin/device/list", {})  # the ops connection keeps itself alive
    clock.advance(6)
    assert await dev.close_code() == 4408
    assert (await ops.push("device_offline"))["values"]["reason"] == "heartbeat_timeout"


async def test_shutdown_marks_devices_offline_with_reason_shutdown(core_factory: Factory) -> None:
    first = await core_factory()
    dev = await login(first, "R-1")
    await first.app.stop()
    assert await dev.close_code() == 1001
    second = await core_factory(store=first.app.deps.store.share())
    api = await bearer(second)
    got = (await api.get("/api/v1/devices/R-1")).json()
    assert got["online"] is False and got["offline_reason"] == "shutdown"
    await api.aclose()


async def test_devices_left_online_by_this_node_are_offline_after_restart(core_factory: Factory) -> None:
    first = await core_factory()
    await login(first, "R-1")
    await login(first, "R-2")
    api1 = await bearer(first)
    assert [d["online"] for d in (await api1.get("/api/v1/devices")).json()["devices"]] == [True, True]
    await api1.aclose()
    # A second process of the same node on the same store: the first is taken as crashed.
    second = await core_factory(make_settings(), store=first.app.deps.store.share())
    api = await bearer(second)
    devices = (await api.get("/api/v1/devices")).json()["devices"]
    assert [(d["sn"], d["online"], d["offline_reason"]) for d in devices] == [
        ("R-1", False, "restart"), ("R-2", False, "restart")
    ]
    await api.aclose()


async def test_other_nodes_devices_are_left_alone_at_restart(core_factory: Factory) -> None:
    first = await core_factory(make_settings(server={"node_id": "node-a"}))
    await login(first, "R-1")
    second = await core_factory(make_settings(server={"node_id": "node-b"}), store=first.app.deps.store.share())
    api = await bearer(second)
    got = (await api.get("/api/v1/devices/R-1")).json()
    assert got["online"] is True and got["node"] == "node-a"
    await api.aclose()


class Bus:
    """An in-test fabric joining several nodes' brokers, so an operator on one node sees another's pushes."""

    def __init__(self) -> None:
        self.nodes: list[_BusBroker] = []

    def broker(self) -> _BusBroker:
        """A broker for one more node."""
        return _BusBroker(self)


class _BusBroker:
    degraded = False

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.deliver: LocalDeliver | None = None

    def bind(self, deliver: LocalDeliver) -> None:
        self.deliver = deliver

    async def start(self) -> None:
        self.bus.nodes.append(self)

    async def stop(self) -> None:
        self.bus.nodes.remove(self)

    async def send_control(self, kind: str, data: dict[str, object]) -> bool:
        return True

    async def publish(self, target: Target, service: str, frame: bytes, counts: bool = True) -> Delivery:
        total = Delivery()
        for node in list(self.bus.nodes):
            if node.deliver is not None:
                total.add(node.deliver(target, service, frame))
        return total


async def test_shutdown_push_reaches_operators_on_another_node(core_factory: Factory) -> None:
    bus = Bus()
    first = await core_factory(make_settings(server={"node_id": "node-a"}), broker=bus.broker())
    watcher = await core_factory(make_settings(server={"node_id": "node-w"}), broker=bus.broker(),
                                 store=first.app.deps.store.share())
    ops = await watcher.ops()
    await ops.request("/admin/device/subscribe", {"sns": ["R-1"]})
    await login(first, "R-1")
    assert (await ops.push("device_online"))["values"]["sn"] == "R-1"
    await first.app.stop()
    off = await ops.push("device_offline")
    assert off["values"]["sn"] == "R-1" and off["values"]["reason"] == "shutdown"


async def test_restart_push_reaches_operators_on_another_node(core_factory: Factory) -> None:
    bus = Bus()
    crashed = await core_factory(make_settings(server={"node_id": "node-a"}), broker=_BusBroker(Bus()))
    await login(crashed, "R-1")  # node-a "crashes": its broker is not on the bus, its devices stay online
    watcher = await core_factory(make_settings(server={"node_id": "node-w"}), broker=bus.broker(),
                                 store=crashed.app.deps.store.share())
    ops = await watcher.ops()
    await ops.request("/admin/device/subscribe", {})
    await core_factory(make_settings(server={"node_id": "node-a"}), broker=bus.broker(),
                       store=crashed.app.deps.store.share())
    off = await ops.push("device_offline")
    assert off["values"] == {"sn": "R-1", "type": "retail", "ts": off["values"]["ts"], "reason": "restart"}
