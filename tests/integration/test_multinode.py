"""Several core nodes over a real Redis: every push mode crosses nodes, presence follows, outages are survived."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import Core, make_settings
from redis.exceptions import ConnectionError as RedisConnectionError

from core.broker import Target
from core.redis_broker import RedisBroker

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None and os.environ.get("CI") != "true",
    reason="redis-server is not installed (apt-get install redis-server)",
)
ADMIN_KEY = "multinode-admin-key-0123456789"


class RedisProcess:
    """A throw-away redis-server on 127.0.0.1, no persistence; can be stopped and started on the same port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS is not None, "redis-server is required under CI=true"
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant; readiness is awaited below
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        if await client.ping():
                            return
                    except OSError:
                        pass
                    except Exception:  # ConnectionError while it boots
                        pass
                    await asyncio.sleep(0.05)  # another process is booting; there is nothing to await
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisProcess]:
    server = RedisProcess()
    await server.start()
    yield server
    server.stop()


def node_settings(name: str, redis_url: str, **extra: Any) -> Any:
    return make_settings(
        server={"node_id": name},
        broker={"redis_url": redis_url, "node_timeout_s": 1.0},
        api={"keys": [{"name": "ops", "key": ADMIN_KEY, "role": "admin"}]},
        **extra,
    )


async def cluster(core_factory: Callable[..., Any], redis_url: str, n: int = 2) -> list[Core]:
    first: Core = await core_factory(node_settings("node-a", redis_url))
    nodes = [first]
    for i in range(1, n):
        nodes.append(await core_factory(node_settings(f"node-{chr(97 + i)}", redis_url),
                                        store=first.app.deps.store.share()))
    for node in nodes:
        broker = node.app.deps.push.broker
        assert isinstance(broker, RedisBroker)
        await asyncio.wait_for(broker.connected.wait(), 5)
    return nodes


def api(node: Core) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.http_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


async def nothing(client: Any, service: str) -> bool:
    try:
        await client.push(service, timeout=0.3)
        return False
    except TimeoutError:
        return True


async def test_every_push_mode_crosses_nodes_exactly_once(core_factory: Callable[..., Any],
                                                          redis_server: RedisProcess) -> None:
    a, b, c = await cluster(core_factory, redis_server.url, 3)
    dog_a = await a.device("DOG-A", "dance_dog")
    dog_b = await b.device("DOG-B", "dance_dog")
    ret_c = await c.device("RET-C", "retail")
    await a.app.deps.auth.create_user("olga", "olga-password", "operator")
    olga_b = await b.ops("olga", "olga-password")
    olga_c = await c.ops("olga", "olga-password")
    async with api(a) as http:
        r = await http.post("/api/v1/broadcasts",
                            json={"service": "dance", "message": 1, "target": {"type": "dance_dog"}})
        assert r.json() == {"matched": 2, "queued": 2}
        assert (await dog_a.push("dance"))["values"] == 1 and (await dog_b.push("dance"))["values"] == 1
        assert await nothing(ret_c, "dance")
        r = await http.post("/api/v1/broadcasts", json={"service": "note", "message": "x",
                                                         "target": {"sns": ["RET-C", "DOG-B"]}})
        assert r.json() == {"matched": 2, "queued": 2}
        assert (await ret_c.push("note"))["values"] == "x" and (await dog_b.push("note"))["values"] == "x"
        r = await http.post("/api/v1/broadcasts",
                            json={"service": "memo", "message": 2, "target": {"username": "olga"}})
        assert r.json() == {"matched": 2, "queued": 2}
        assert (await olga_b.push("memo"))["values"] == 2 and (await olga_c.push("memo"))["values"] == 2
        r = await http.post("/api/v1/broadcasts", json={"service": "all", "message": 3})
        assert r.json()["matched"] == 5
        for client in (dog_a, dog_b, ret_c, olga_b, olga_c):
            assert (await client.push("all"))["values"] == 3
            assert await nothing(client, "all")  # exactly once, not once per node
        # Command issued through node A's API reaches a device held by node C, and its ack lands.
        r = await http.post("/api/v1/devices/RET-C/commands", json={"command": "dock"})
        assert r.status_code == 202 and r.json()["state"] == "sent"
        cmd = (await ret_c.push("device_command"))["values"]
        ack = await ret_c.request("/api/command/ack", {"command_id": cmd["command_id"], "ok": True})
        assert ack["values"]["state"] == "acked"
        assert (await http.get(f"/api/v1/commands/{cmd['command_id']}")).json()["state"] == "acked"


async def test_status_and_presence_reach_an_operator_on_another_node(core_factory: Callable[..., Any],
                                                                    redis_server: RedisProcess) -> None:
    a, b = await cluster(core_factory, redis_server.url)
    ops_b = await b.ops()
    await ops_b.request("/admin/device/subscribe", {"types": ["retail"]})
    dev_a = await a.device("RET-1", "retail")
    assert (await ops_b.push("device_online"))["values"]["sn"] == "RET-1"
    await dev_a.request("/api/device/status", {"battery": 77})
    st = await ops_b.push("device_status")
    assert st["values"]["sn"] == "RET-1" and st["values"]["battery"] == 77
    # The same device logs in on node B: node A closes its connection with 4409.
    dev_b = await b.device("RET-1", "retail")
    assert await dev_a.close_code() == 4409
    doc = await a.app.deps.store.get_device("RET-1")
    assert doc is not None and doc["online"] is True and doc["node"] == "node-b"
    assert (await dev_b.request("/api/device/status", {"battery": 76}))["code"] == 0
    assert a.app.deps.hub.device("RET-1") is None and b.app.deps.hub.device("RET-1") is not None
    # Rotating the secret through node A's API closes the connection node B holds, with 4401.
    async with api(a) as http:
        assert (await http.post("/api/v1/devices/RET-1/secret")).status_code == 200
    assert await dev_b.close_code() == 4401


async def test_lost_node_devices_go_offline_node_lost(core_factory: Callable[..., Any],
                                                      redis_server: RedisProcess) -> None:
    a, b = await cluster(core_factory, redis_server.url)
    ops_b = await b.ops()
    await ops_b.request("/admin/device/subscribe", {})
    await a.device("DOG-1", "dance_dog")
    await ops_b.push("device_online")
    # Node A dies without a goodbye: its heartbeat stops and its sockets vanish.
    broker_a = a.app.deps.push.broker
    assert isinstance(broker_a, RedisBroker)
    for task in broker_a._tasks:
        task.cancel()
    off = await ops_b.push("device_offline", timeout=10)  # within node_timeout_s (1 s) plus a heartbeat period
    assert off["values"] == {**off["values"], "sn": "DOG-1", "reason": "node_lost"}
    doc = await b.app.deps.store.get_device("DOG-1")
    assert doc is not None and doc["online"] is False and doc["offline_reason"] == "node_lost"


async def test_redis_outage_is_survived_and_counted(core_factory: Callable[..., Any],
                                                   redis_server: RedisProcess) -> None:
    a, b = await cluster(core_factory, redis_server.url)
    dev_a = await a.device("RET-A", "retail")
    dev_b = await b.device("RET-B", "retail")
    redis_server.stop()
    broker_a = a.app.deps.push.broker
    assert isinstance(broker_a, RedisBroker)
    async with api(a) as http:
        # Local delivery goes on; the cross-node part is counted as dropped, never silently.
        r = await http.post("/api/v1/broadcasts", json={"service": "x", "message": 1, "target": {"type": "retail"}})
        assert r.status_code == 200 and r.json()["matched"] >= 1
        assert (await dev_a.push("x"))["values"] == 1
        assert broker_a.degraded
        ready = (await http.get("/readyz")).json()
        assert ready["broker"] == "degraded"
        metrics = (await http.get("/metrics")).text
        assert "broker_degraded 1.0" in metrics
        dropped = [ln for ln in metrics.splitlines() if ln.startswith("broker_publish_failures_total")]
        assert dropped and float(dropped[0].split()[-1]) >= 1
        # A command for a device on node B, issued on A while Redis is away, stays pending ...
        r = await http.post("/api/v1/devices/RET-B/commands", json={"command": "dock"})
        assert r.status_code == 202 and r.json()["state"] == "pending"
        # ... and arrives once Redis is back, without restarting anything.
        await redis_server.start()
        broker_b = b.app.deps.push.broker
        assert isinstance(broker_b, RedisBroker)
        await asyncio.wait_for(asyncio.gather(broker_a.connected.wait(), broker_b.connected.wait()), 15)
        cmd = await dev_b.push("device_command", timeout=15)
        assert cmd["values"]["command"] == "dock"
        r = await http.post("/api/v1/broadcasts", json={"service": "y", "message": 2, "target": {"type": "retail"}})
        assert r.json() == {"matched": 2, "queued": 2}
        assert (await dev_b.push("y"))["values"] == 2
        assert (await http.get("/readyz")).json()["broker"] == "ok"


async def test_one_failed_publish_does_not_silence_cross_node_pushes(core_factory: Callable[..., Any],
                                                                    redis_server: RedisProcess,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis stays up: one publish fails (a timeout on a loaded machine, a reset pooled socket), the
    # listener keeps its subscription. The node must report degraded for that moment, then recover
    # on its own, not drop every later cross-node push until it is restarted.
    a, b = await cluster(core_factory, redis_server.url)
    dev_a = await a.device("RET-A", "retail")
    broker_b = b.app.deps.push.broker
    assert isinstance(broker_b, RedisBroker)
    real_publish = broker_b._redis.publish
    failures = [RedisConnectionError("injected: connection reset")]

    async def flaky_publish(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real_publish(*args, **kwargs)

    monkeypatch.setattr(broker_b._redis, "publish", flaky_publish)
    async with api(b) as http:
        r = await http.post("/api/v1/broadcasts", json={"service": "lost", "message": 1, "target": {"type": "retail"}})
        assert r.json() == {"matched": 0, "queued": 0}  # the device is on A: nothing crossed, and it says so
        assert broker_b.degraded and (await http.get("/readyz")).json()["broker"] == "degraded"
        await asyncio.wait_for(broker_b.connected.wait(), 5)  # the next heartbeat finds Redis fine
        assert (await http.get("/readyz")).json()["broker"] == "ok"
        r = await http.post("/api/v1/broadcasts", json={"service": "back", "message": 2, "target": {"type": "retail"}})
        assert r.json() == {"matched": 1, "queued": 1}
    assert (await dev_a.push("back"))["values"] == 2


async def test_a_burst_of_pushes_larger_than_the_redis_pool_all_cross(core_factory: Callable[..., Any],
                                                                     redis_server: RedisProcess) -> None:
    # 300 devices dropping together publish 300 presence pushes at once; each must cross (and be
    # counted), not fail on an exhausted connection pool and mark the broker degraded.
    a, b = await cluster(core_factory, redis_server.url)
    dev_a = await a.device("RET-A", "retail")
    broker_b = b.app.deps.push.broker
    assert isinstance(broker_b, RedisBroker)
    target = Target(kind="device", types=("retail",))
    results = await asyncio.gather(*(b.app.deps.push.publish(target, "burst", i) for i in range(300)))
    assert [(r.matched, r.queued) for r in results] == [(1, 1)] * 300
    assert not broker_b.degraded
    got = sorted([(await dev_a.push("burst"))["values"] for _ in range(300)])
    assert got == list(range(300))


async def test_a_broadcast_sent_over_websocket_crosses_nodes(core_factory: Callable[..., Any],
                                                            redis_server: RedisProcess) -> None:
    # The ops console's path: a WebSocket request, handled inline until it waits on Redis.
    a, b = await cluster(core_factory, redis_server.url)
    dev_a = await a.device("RET-A", "retail")
    ops_b = await b.ops()
    for i in range(3):
        r = await ops_b.request("/admin/push/broadcast", {"service": "ws-bc", "message": i,
                                                          "target": {"type": "retail"}})
        assert r["code"] == 0 and r["values"] == {"matched": 1, "queued": 1}, r
        assert (await dev_a.push("ws-bc"))["values"] == i
