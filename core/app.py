"""make_app(settings, deps): build every part, serve /ws and the HTTP API, start and stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer

from .api import api_routes
from .audit import Audit
from .auth import Authenticator
from .broker import Broker, LocalBroker
from .clock import Clock, SystemClock, utc
from .commands import CommandOutbox
from .config import Settings
from .context import Deps
from .errors import CLOSE_GOING_AWAY, CLOSE_REPLACED, CLOSE_UNAUTHORIZED, StoreUnavailable
from .hub import Hub
from .metrics import Metrics
from .monitor import Monitor
from .push import Pusher
from .redis_broker import RedisBroker
from .registry import ServerRules
from .services import SERVICE_TABLE
from .store import Store
from .transport import FleetSocket, Gateway

log = logging.getLogger("fleetpush.app")


@dataclass(slots=True)
class Overrides:
    """Parts a caller (a test, a second node) may supply instead of the defaults."""

    store: Store | None = None
    clock: Clock | None = None
    broker: Broker | None = None
    metrics: Metrics | None = None


def _access_log(handler: tornado.web.RequestHandler) -> None:
    # Method, path (never the query string or headers: they may carry credentials), status, time.
    req = handler.request
    logging.getLogger("fleetpush.access").info(
        "%s %s %s %.1fms", req.method, req.path, handler.get_status(), 1000 * req.request_time(),
        extra={"method": req.method, "path": req.path, "status": handler.get_status()},
    )


def _counter(hub: Hub, kind: str) -> Callable[[], float]:
    return lambda: float(hub.counts()[kind])


class FleetApp:
    """One core node: the Tornado application plus its lifecycle."""

    def __init__(self, settings: Settings, overrides: Overrides | None = None) -> None:
        o = overrides or Overrides()
        self.settings = settings
        clock = o.clock or SystemClock()
        metrics = o.metrics or Metrics()
        store = o.store or Store(settings.store)
        node_id = settings.server.node_id or f"{socket.gethostname()}:{settings.server.port}"
        broker: Broker
        if o.broker is not None:
            broker = o.broker
        elif settings.broker.redis_url:
            broker = RedisBroker(settings.broker, node_id, metrics)
        else:
            broker = LocalBroker()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleetpush-cpu")
        hub = Hub()
        push = Pusher(hub, broker, metrics, clock.monotonic)
        audit = Audit(store, clock)
        auth = Authenticator(settings, store, clock, self.executor, metrics)
        monitor = Monitor(settings, store, push, clock, metrics, node_id)
        commands = CommandOutbox(settings, store, hub, push, audit, clock, metrics)
        for kind in ("device", "ops", "anon"):
            metrics.connections.labels(kind).set_function(_counter(hub, kind))
        self.deps = Deps(settings, clock, store, hub, push, auth, monitor, commands, audit, metrics, node_id)
        if isinstance(broker, RedisBroker):
            broker.bind_control(self._on_control, self._on_node_lost, self._on_reconnect)
        self.rules = ServerRules(SERVICE_TABLE, self.deps)
        self.gateway = Gateway(self.deps, self.rules)
        self.application = tornado.web.Application(
            [(r"/ws", FleetSocket, {"gateway": self.gateway}), *api_routes(self.deps)],
            websocket_max_message_size=settings.limits.max_message_bytes,
            log_function=_access_log if settings.server.access_log else (lambda h: None),
            compress_response=False,
        )
        self.server: HTTPServer | None = None
        self.port: int | None = None
        self.generated_admin_password: str | None = None
        self.store_ready = self.deps.initialised
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self, port: int | None = None, address: str | None = None) -> int:
        """Listen, then bring the store up in the background; returns the bound port."""
        s = self.settings
        self.server = HTTPServer(
            self.application,
            xheaders=False,
            max_body_size=s.api.max_body_bytes * 2,
            idle_connection_timeout=s.server.idle_timeout_s,
            body_timeout=30,
            max_header_size=16384,
        )
        sockets = tornado.netutil.bind_sockets(
            s.server.port if port is None else port, address or s.server.host, backlog=4096
        )
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._store_init()))
        self._tasks.append(asyncio.create_task(self._every(s.heartbeat.sweep_interval_s, self._sweep)))
        self._tasks.append(asyncio.create_task(self._every(s.commands.sweep_interval_s, self._command_sweep)))
        if self.deps.store.embedded:
            self._tasks.append(asyncio.create_task(self._every(60.0, self._purge)))
        await self.deps.push.broker.start()
        if self.deps.store.embedded:
            log.warning("store: embedded in-memory engine; every device, status and command is lost at exit")
        return self.port

    async def _store_init(self) -> None:
        # Indexes, the admin user and presence recovery need the store; the app serves
        # (and /readyz says 503) until they succeed, retrying so a late store is picked up.
        delay = 0.5
        while not self._stopping:
            try:
                await self.deps.store.ensure_indexes()
                self.generated_admin_password = await self.deps.auth.ensure_admin()
                await self.deps.auth.ensure_users()
                restarted = await self.deps.monitor.recover()
                if restarted:
                    log.info("presence: %d devices left online by this node's last run set offline", restarted)
                self.store_ready.set()
                return
            except StoreUnavailable:
                log.warning("store not reachable; retrying in %.1f s", delay)
            except Exception:
                log.exception("store initialisation failed; retrying in %.1f s", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _every(self, interval: float, fn: Any) -> None:
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception:
                log.exception("periodic task %s failed", getattr(fn, "__name__", fn))

    async def _sweep(self) -> None:
        self.gateway.sweep()

    async def _on_control(self, kind: str, data: dict[str, Any]) -> None:
        # Another node's message: a device that logged in there is evicted here (4409).
        conn = self.deps.hub.device(str(data.get("sn")))
        if conn is None:
            return
        if kind == "evict" and conn.id != data.get("conn"):
            conn.close(CLOSE_REPLACED, "replaced by a newer login on another node")
        elif kind == "close_device":
            conn.close(int(data.get("code") or CLOSE_UNAUTHORIZED), str(data.get("reason") or ""))

    async def _on_node_lost(self, node: str) -> None:
        try:
            released = await self.deps.monitor.release_node(node, "node_lost")
            log.warning("node %s lost: %d devices set offline", node, released)
        except StoreUnavailable:
            log.warning("node %s lost, but the store is unavailable; its devices stay marked online", node)

    async def _on_reconnect(self) -> None:
        # While Redis was away, commands for devices held here may have been issued elsewhere.
        for conn in self.deps.hub:
            if conn.kind == "device" and conn.sn and self.deps.hub.device(conn.sn) is conn:
                try:
                    await self.deps.commands.redeliver(conn.sn)
                except StoreUnavailable:
                    return

    async def _purge(self) -> None:
        if self.store_ready.is_set():
            await self.deps.store.purge_expired(utc(self.deps.clock.time()))

    async def _command_sweep(self) -> None:
        if self.store_ready.is_set():
            await self.deps.commands.safe_sweep()

    def url(self) -> str:
        """The URL this node serves on."""
        s = self.settings.server
        if s.public_url:
            return s.public_url
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Refuse new connections, close every client with 1001, finish background work, close the store."""
        if self._stopping:
            return
        self._stopping = True
        g = self.gateway
        g.accepting = False
        if self.server is not None:
            self.server.stop()
        for conn in self.deps.hub:
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        try:
            async with asyncio.timeout(self.settings.server.shutdown_grace_s):
                await g.empty.wait()
        except TimeoutError:
            log.warning("%d connections did not close in time; dropping them", len(self.deps.hub))
            for conn in list(self.deps.hub):
                sink: Any = conn.sink
                abort = getattr(sink, "abort", None)
                if abort is not None:
                    abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if g.background:
            await asyncio.wait(list(g.background), timeout=self.settings.server.shutdown_grace_s)
        await self.deps.monitor.drain()
        await self.deps.push.broker.stop()
        if self.server is not None:
            await self.server.close_all_connections()
        await self.deps.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def make_app(settings: Settings, deps: Overrides | None = None) -> FleetApp:
    """Build a core node from settings and optional injected parts."""
    return FleetApp(settings, deps)
