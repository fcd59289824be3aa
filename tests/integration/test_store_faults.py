"""A store that is down or silent: the core still serves, says 503 quickly, never hangs, and recovers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import Core, make_settings
from fleetkit import Client
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from core.app import FleetApp, make_app
from core.errors import StoreUnavailable
from core.store import Store

ADMIN_KEY = "admin-key-for-fault-tests-0123"
SELECT_S = 0.5
OP_S = 1.0
BOUND_S = OP_S + 1.5  # the store's own bound (op_timeout_s + 0.5) plus slack for a loaded machine


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers a byte."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield port
    finally:
        for w in held:
            w.close()
        server.close()
        async with asyncio.timeout(5):
            await server.wait_closed()


async def start_unready(url: str) -> tuple[FleetApp, Core]:
    """Build and start an app on a store URL without waiting for the store."""
    settings = make_settings(
        store={"mongo_url": url, "server_selection_timeout_s": SELECT_S, "op_timeout_s": OP_S},
        api={"keys": [{"name": "ops", "key": ADMIN_KEY, "role": "admin"}]},
    )
    app = make_app(settings)
    port = await app.start(port=0, address="127.0.0.1")
    return app, Core(app, port)


async def timed(coro: Any) -> tuple[Any, float]:
    """The result of an awaitable and how long it took."""
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


async def assert_degraded_but_serving(core: Core) -> None:
    """Everything a user touches answers fast: 503 where the store is needed, normal elsewhere.

    The checks run side by side, each timed on its own, so the whole takes one store timeout.
    """
    anon = httpx.AsyncClient(base_url=core.http_url, timeout=10, verify=False)
    api = httpx.AsyncClient(base_url=core.http_url, timeout=10, verify=False,
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    async def ready() -> None:
        r, took = await timed(anon.get("/readyz"))
        assert r.status_code == 503 and r.json()["store"] == "unavailable" and took < 3.0

    async def store_free_routes() -> None:
        for path in ("/healthz", "/metrics", "/api/v1/openapi.json"):
            assert (await anon.get(path)).status_code == 200, path
        assert (await api.get("/api/v1/connections")).status_code == 200

    async def list_devices() -> None:
        r, took = await timed(api.get("/api/v1/devices"))
        assert r.status_code == 503 and r.json()["code"] == 503 and took < BOUND_S

    async def create_command() -> None:
        r, took = await timed(api.post("/api/v1/devices/R-1/commands", json={"command": "dance"}))
        assert r.status_code == 503 and took < BOUND_S

    async def device_login() -> None:
        ws = await core.client()
        reply, took = await timed(ws.login_device("R-1"))
        assert reply["code"] == 503 and reply["result"] is False and took < BOUND_S
        # The connection is still up and still answers.
        assert (await ws.request("/no/such/service", {}))["code"] == 404
        assert not ws.closed.done()
        await ws.close()

    async def ops_login() -> None:
        ws = await core.client()
        reply, took = await timed(ws.login_ops())
        assert reply["code"] == 503 and took < BOUND_S
        assert not ws.closed.done()
        await ws.close()

    async def http_login() -> None:
        r, took = await timed(anon.post("/api/v1/auth/login", json={"username": "admin", "password": "x"}))
        assert r.status_code == 503 and took < BOUND_S

    try:
        await asyncio.gather(ready(), store_free_routes(), list_devices(), create_command(), device_login(),
                             ops_login(), http_login())
    finally:
        await anon.aclose()
        await api.aclose()


async def stop_bounded(app: FleetApp) -> None:
    """Stopping must not hang on the dead store."""
    async with asyncio.timeout(10):
        await app.stop()


async def test_store_on_a_closed_port(core_factory: Callable[..., Any]) -> None:
    app, core = await start_unready(f"mongodb://127.0.0.1:{closed_port()}/?directConnection=true")
    try:
        await assert_degraded_but_serving(core)
        assert not app.store_ready.is_set()
    finally:
        await stop_bounded(app)


async def test_store_that_accepts_but_never_answers(silent_server: int) -> None:
    app, core = await start_unready(f"mongodb://127.0.0.1:{silent_server}/?directConnection=true")
    try:
        await assert_degraded_but_serving(core)
        assert not app.store_ready.is_set()
    finally:
        await stop_bounded(app)


class Outage:
    """Fault injection under the Store: while `mode` is set, every driver call fails or stalls."""

    COLLECTIONS = ("devices", "status", "commands", "users", "sessions", "audit_log", "replay")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mode: str | None = None
        self.release = asyncio.Event()
        for name in self.COLLECTIONS:
            setattr(store, name, _Faulty(getattr(store, name), self))
        store._client = _Faulty(store._client, self)

    def fail(self) -> Any:
        """What a driver call does during the outage."""
        if self.mode == "down":
            raise ServerSelectionTimeoutError("127.0.0.1:27017: [Errno 111] Connection refused")

        return _Stall(self.release)


class _Stall:
    """A call a server took and never answered: awaiting it (or a cursor built from it) waits for release."""

    def __init__(self, release: asyncio.Event) -> None:
        self._release = release

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: self

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await self._release.wait()
        raise AutoReconnect("connection closed")  # the stalled request ends with its connection


class _Faulty:
    def __init__(self, inner: Any, outage: Outage) -> None:
        self._inner = inner
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if self._outage.mode is None:
            return value
        if name == "admin":
            return _Faulty(value, self._outage)
        if callable(value):
            return lambda *a, **kw: self._outage.fail()
        return value


@pytest.mark.parametrize("mode", ["down", "silent"])
async def test_embedded_store_outage_then_recovery_without_restart(
    core_factory: Callable[..., Any], mode: str
) -> None:
    settings = make_settings(
        store={"server_selection_timeout_s": SELECT_S, "op_timeout_s": OP_S},
        api={"keys": [{"name": "ops", "key": ADMIN_KEY, "role": "admin"}]},
    )
    core: Core = await core_factory(settings)
    warm = await core.client()
    assert (await warm.login_device("R-0"))["code"] == 0
    outage = Outage(core.app.deps.store)
    outage.mode = mode
    try:
        await assert_degraded_but_serving(core)
        # A device already online keeps its connection; its report is refused, not lost silently.
        report, took = await timed(warm.request("/api/device/status", {"battery": 5}))
        assert report["code"] == 503 and took < BOUND_S
        assert not warm.closed.done()
    finally:
        outage.mode = None
        outage.release.set()
    async with httpx.AsyncClient(base_url=core.http_url, timeout=5, verify=False,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        assert (await api.get("/readyz")).status_code == 200
        assert (await api.post("/api/v1/devices/R-0/commands", json={"command": "dance"})).status_code == 202
        assert (await warm.push("device_command"))["values"]["command"] == "dance"
        assert (await warm.request("/api/device/status", {"battery": 6}))["code"] == 0
        dev = await core.client()
        assert (await dev.login_device("R-1"))["code"] == 0
        assert [d["sn"] for d in (await api.get("/api/v1/devices")).json()["devices"]] == ["R-0", "R-1"]


async def test_store_down_at_start_is_picked_up_when_it_returns(core_factory: Callable[..., Any]) -> None:
    settings = make_settings(store={"server_selection_timeout_s": SELECT_S, "op_timeout_s": OP_S})
    store = Store(settings.store)
    outage = Outage(store)
    outage.mode = "down"
    app = make_app(settings, _overrides(store))
    port = await app.start(port=0, address="127.0.0.1")
    core = Core(app, port)
    try:
        async with httpx.AsyncClient(base_url=core.http_url, timeout=5, verify=False) as anon:
            assert (await anon.get("/readyz")).status_code == 503
            outage.mode = None
            async with asyncio.timeout(5):  # the start-up retry backs off from 0.5 s
                await app.store_ready.wait()
            assert (await anon.get("/readyz")).status_code == 200
        dev = await core.client()
        reply: dict[str, Any] = await dev.login_device("R-1")
        assert reply["code"] == 0
        ops: Client = await core.ops()
        assert (await ops.request("/admin/device/list", {}))["values"]["devices"][0]["sn"] == "R-1"
    finally:
        await stop_bounded(app)


def _overrides(store: Store) -> Any:
    from core.app import Overrides

    return Overrides(store=store)


async def test_a_login_answered_503_leaves_the_connection_logged_out(core_factory: Callable[..., Any]) -> None:
    core: Core = await core_factory()
    store = core.app.deps.store
    real = store.mark_online

    async def fails_once(*a: Any, **kw: Any) -> None:
        store.mark_online = real  # type: ignore[method-assign]
        raise StoreUnavailable("storage unavailable (mark_online)")

    store.mark_online = fails_once  # type: ignore[method-assign]
    dev = await core.client()
    assert (await dev.login_device("R-1"))["code"] == 503
    after = await dev.request("/api/device/status", {"battery": 1})
    assert after["code"] == 401


class _GlitchOnce(Store):
    """A store whose first index creation fails with an error that is not StoreUnavailable."""

    glitched = False

    async def ensure_indexes(self) -> None:
        if not self.glitched:
            self.glitched = True
            raise RuntimeError("unexpected driver error")
        await super().ensure_indexes()


async def test_an_unexpected_start_up_error_is_retried() -> None:
    settings = make_settings()
    app = make_app(settings, _overrides(_GlitchOnce(settings.store)))
    await app.start(port=0, address="127.0.0.1")
    try:
        async with asyncio.timeout(2):  # the retry backs off from 0.5 s
            await app.store_ready.wait()
    finally:
        await stop_bounded(app)


async def test_readyz_answers_within_3_s_with_default_store_timeouts(silent_server: int) -> None:
    app = make_app(make_settings(store={"mongo_url": f"mongodb://127.0.0.1:{silent_server}/?directConnection=true"}))
    port = await app.start(port=0, address="127.0.0.1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, verify=False) as anon:
            r, took = await timed(anon.get("/readyz"))
        assert r.status_code == 503 and took < 3.0
    finally:
        await stop_bounded(app)


async def test_not_ready_until_start_up_can_log_users_in() -> None:
    # The store answers pings at once, but the admin user (or the indexes) may not exist yet: a
    # load balancer or a script that trusts /readyz must not send a login that would fail.
    app = make_app(make_settings())
    gate = asyncio.Event()
    real_ensure_admin = app.deps.auth.ensure_admin

    async def slow_ensure_admin() -> Any:
        await gate.wait()
        return await real_ensure_admin()

    app.deps.auth.ensure_admin = slow_ensure_admin  # type: ignore[method-assign]
    port = await app.start(port=0, address="127.0.0.1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as anon:
            r = await anon.get("/readyz")
            assert r.status_code == 503 and r.json()["store"] == "initialising"
            gate.set()
            await asyncio.wait_for(app.store_ready.wait(), 5)
            r = await anon.get("/readyz")
            assert r.status_code == 200 and r.json() == {"store": "ok", "broker": "ok", "status": "ready"}
    finally:
        await stop_bounded(app)
