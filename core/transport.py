"""The WebSocket endpoint: handshake checks (Tornado), then per message decode, dispatch, reply; hub come and go."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from tornado.websocket import WebSocketHandler, WebSocketProtocol13, _WebSocketParams

from . import protocol
from .clock import utc
from .connection import Connection, RateLimiter
from .context import Deps, ServerContext
from .errors import (
    CLOSE_GOING_AWAY,
    CLOSE_HEARTBEAT,
    CLOSE_REPLACED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED,
    Disconnect,
)
from .registry import ServerRules
from .wire import Handover, WireSession

log = logging.getLogger("fleetpush.transport")

_OFFLINE_REASON = {CLOSE_HEARTBEAT: "heartbeat_timeout", CLOSE_REPLACED: "replaced", CLOSE_GOING_AWAY: "shutdown"}


class Gateway:
    """Everything the WebSocket handler needs, shared by all connections."""

    def __init__(self, deps: Deps, rules: ServerRules) -> None:
        self.deps = deps
        self.rules = rules
        lim = deps.settings.limits
        self.decoder = protocol.Decoder(protocol.Limits(lim.max_message_bytes, lim.max_json_depth, lim.max_int_digits))
        self.allowed_origins = {o.rstrip("/").lower() for o in deps.settings.server.allowed_origins}
        self.background: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.empty = asyncio.Event()
        self.empty.set()

    def spawn(self, coro: Any) -> None:
        """Run a coroutine in the background, kept until it ends (awaited at shutdown)."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def sweep(self) -> None:
        """Enforce every deadline once: login, heartbeat, write stall, session expiry; send due pings."""
        d = self.deps
        now = d.clock.monotonic()
        hb = d.settings.heartbeat
        login_timeout = d.settings.auth.login_timeout_s
        write_timeout = d.settings.limits.write_timeout_s
        for c in d.hub:
            if c.closed:
                continue
            if c.kind == "anon" and now - c.opened_mono > login_timeout:
                c.close(CLOSE_UNAUTHORIZED, "login timeout")
            elif now - c.last_rx > hb.timeout_s:
                c.close(CLOSE_HEARTBEAT, "heartbeat timeout")
            elif c.write_stalled(now, write_timeout):
                d.metrics.queue_overflows.inc()
                c.close(CLOSE_SLOW_CONSUMER, "write timeout")
            elif c.session_expires is not None and now > c.session_expires:
                c.close(CLOSE_UNAUTHORIZED, "session expired")
            elif now - c.last_ping >= hb.interval_s:
                c.ping()


class FleetSocket(WebSocketHandler):
    """The HTTP upgrade of one client; after the 101 its socket belongs to a WireSession (core.wire)."""

    gateway: Gateway
    session: WireSession | None = None

    def initialize(self, gateway: Gateway) -> None:
        """Tornado hands each handler the shared gateway."""
        self.gateway = gateway

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Refuse the upgrade while shutting down or at the connection cap."""
        g = self.gateway
        if not g.accepting:
            self.set_status(503)
            self.finish("shutting down")
            return
        if len(g.deps.hub) >= g.deps.settings.limits.max_connections:
            self.set_status(503)
            self.finish("too many connections")
            return
        await super().get(*args, **kwargs)

    def get_websocket_protocol(self) -> WebSocketProtocol13 | None:
        """Tornado's RFC 6455 handshake, then the socket moves to core.wire (strict UTF-8, close codes)."""
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        # Pings and their timeout are ours (Gateway.sweep), so Tornado's own are off.
        params = _WebSocketParams(max_message_size=self.max_message_size, compression_options=None)
        return Handover(self, params)

    def check_origin(self, origin: str) -> bool:
        """Exact allowlist match, or the server's own host; anything else gets 403."""
        norm = origin.rstrip("/").lower()
        if norm in self.gateway.allowed_origins:
            return True
        parsed = urlsplit(norm)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            return False
        host = self.request.headers.get("Host", "").lower()
        return parsed.netloc == host

    def open(self, *args: str, **kwargs: str) -> None:
        """A client connected: its connection joins the hub, its session takes the socket over."""
        g = self.gateway
        d = g.deps
        lim = d.settings.limits
        client = Client(g)
        session = WireSession(client, lim.max_message_bytes)
        conn = Connection(
            sink=session,
            clock=d.clock,
            metrics=d.metrics,
            remote=str(self.request.remote_ip),
            connected_at=utc(d.clock.time()),
            max_queue=lim.outbound_queue,
            node_id=d.node_id,
            limiter=RateLimiter(lim.rate_per_s, lim.rate_burst, lim.rate_burst, d.clock.monotonic()),
        )
        client.conn = conn
        self.session = session
        d.hub.add(conn)
        g.empty.clear()
        d.metrics.connections_opened.inc()

    def on_message(self, message: str | bytes) -> None:
        """Never called: frames are read by the WireSession."""

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Unexpected errors in the handshake are logged without the request's contents."""
        log.error("websocket handshake error", exc_info=(typ, value, tb))


class Client:
    """The application side of one connection: decode, dispatch, reply; the hub and presence on close."""

    __slots__ = ("conn", "gateway")

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.conn: Connection | None = None

    async def on_message(self, message: str | bytes) -> None:
        """One text frame: decode, dispatch, reply."""
        conn = self.conn
        if conn is None or conn.closed:
            return
        g = self.gateway
        conn.touch()
        g.deps.metrics.frames_in += 1
        if isinstance(message, bytes):
            conn.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
            return
        try:
            req = g.decoder.decode(message)
        except protocol.ProtocolError as exc:
            g.deps.push.reply(conn, protocol.response(exc.service, exc.request_id, None, exc.code, exc.msg))
            return
        ctx = ServerContext(conn, req, g.deps)
        try:
            payload = await g.rules.dispatch(ctx)
        except Disconnect as exc:
            conn.close(exc.code, exc.reason)
            return
        g.deps.push.reply(conn, payload)
        for fn in ctx.after:
            try:
                await fn()
            except Exception:
                log.exception("post-reply work failed for %s", req.service)

    def on_alive(self) -> None:
        """A ping or pong counts as life."""
        if self.conn is not None:
            self.conn.touch()

    def on_closed(self, code: int | None) -> None:
        """The socket is gone: the hub forgets it, presence is updated."""
        conn = self.conn
        if conn is None:
            return
        g = self.gateway
        d = g.deps
        conn.closed = True
        # The app's own close code, else the peer's, else the one the session sent (a protocol error,
        # a runaway pinger), else 1006 (the socket just went).
        code = conn.close_code or code or getattr(conn.sink, "sent_code", None) or 1006
        try:
            d.metrics.closes.labels(str(code)).inc()
        finally:
            current = d.hub.remove(conn)
            if len(d.hub) == 0:
                g.empty.set()
        if conn.kind == "device" and current and conn.sn and conn.device_type:
            reason = _OFFLINE_REASON.get(conn.close_code or 0, "closed")
            g.spawn(d.monitor.offline(conn.sn, conn.device_type, reason))
