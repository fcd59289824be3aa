"""One WebSocket after its handshake, on asyncio's socket transport: frames in, frames out, the close handshake.

Tornado does the HTTP upgrade (routing, origin check, the 101 reply); then `Handover` gives the socket
to a `WireSession`, an `asyncio.Protocol`. Measured against keeping Tornado's IOStream for the life of
the connection: a Future and a buffer round trip per read are gone from every request, and an idle
connection holds ~20 tracked objects instead of ~90 (the handler, its request and headers, and eight
suspended coroutines of the handshake stack), which is most of the RSS per connection and of the
full-collection pauses of the garbage collector at 5k connections.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Awaitable
from types import CoroutineType
from typing import Any, Protocol, cast

from tornado.iostream import IOStream
from tornado.websocket import WebSocketProtocol13, _WebSocketDelegate, _WebSocketParams

from . import eager, protocol
from .errors import CLOSE_HEARTBEAT, CLOSE_SLOW_CONSUMER
from .wsframes import Binary, Close, Event, Fail, FrameParser, Ping, Pong, Text

__all__ = ["Handover", "WireHandler", "WireSession", "control_frame"]

log = logging.getLogger("fleetpush.wire")

# Messages handled back to back before the session yields to the event loop: a pipelining client
# must not add its whole batch to every other connection's latency.
_YIELD_EVENTS = 8
# Parsed but unhandled events at which the socket stops being read (and below which it resumes).
_PAUSE_AT = 256
_RESUME_AT = 32
# How long a closing handshake we started may wait for the peer's close frame (as Tornado's).
CLOSE_TIMEOUT_S = 5.0
# Bytes left unsent in the transport above which a peer that keeps pinging is cut as a slow consumer:
# pongs bypass the connection's bounded queue, so a client that pings without reading would otherwise
# grow the server's buffer for as long as it sends.
_MAX_UNSENT = 1 << 20
# Close codes whose peer is not expected to answer: the socket is dropped right after the frame.
_DROP_AFTER = frozenset((CLOSE_HEARTBEAT, CLOSE_SLOW_CONSUMER))


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final, unmasked control frame (ping 0x9, pong 0xA, close 0x8); payload at most 125 bytes."""
    payload = payload[:125]
    return bytes((0x80 | opcode, len(payload))) + payload


def _close_payload(code: int | None, reason: str) -> bytes:
    if code is None:
        return b""
    raw = reason.encode()[:123]
    while raw:  # never cut a UTF-8 sequence in half
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return struct.pack("!H", code) + raw


class WireHandler(Protocol):
    """What a session calls: the application side of one connection."""

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """One complete data message; the next is handled only after this one finished."""
        ...

    def on_alive(self) -> None:
        """A ping or pong arrived."""
        ...

    def on_closed(self, code: int | None) -> None:
        """The socket is gone (called once); `code` is the peer's close code, None if it sent none."""
        ...


class WireSession(asyncio.Protocol):
    """The frames of one connection: parsed in `data_received`, handled in order, written to the transport."""

    __slots__ = (
        "_close_timer",
        "_drain",
        "_early",
        "_early_close",
        "_events",
        "_notified",
        "_paused",
        "_running",
        "client_terminated",
        "close_code",
        "close_reason",
        "handler",
        "loop",
        "parser",
        "sent_code",
        "server_terminated",
        "transport",
    )

    def __init__(self, handler: WireHandler | None, max_message_bytes: int) -> None:
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.parser = FrameParser(max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self._events: deque[Event] = deque()
        self._running: asyncio.Task[None] | None = None  # the task draining _events, while one is needed
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._early: list[bytes] = []  # frames written between the 101 and the transport's start
        self._early_close: int | None = None  # the close code, when close() came that early
        self._close_timer: asyncio.TimerHandle | None = None
        self._notified = False
        self.client_terminated = False
        self.server_terminated = False
        self.close_code: int | None = None  # the peer's
        self.close_reason: str | None = None  # the peer's
        self.sent_code: int | None = None  # of the close frame this side sent

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The transport is ready: writes queued during the handover go out first."""
        # A socket transport (asyncio's, or uvloop's, which does not subclass asyncio.Transport).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # Pause (and so report a write as "in flight") whenever anything is left in the buffer:
        # the connection's queue coalesces what is pushed meanwhile into its next write.
        transport.set_write_buffer_limits(high=0, low=0)
        if self._early:
            early, self._early = self._early, []
            transport.write(b"".join(early))
        if self.server_terminated:  # closed during the handover: the frame went out just now
            self._hang_up(self._early_close)

    def data_received(self, data: bytes) -> None:
        """Parse every complete frame; handle them now, or after the message still being handled."""
        events = self.parser.feed(data)
        if not events:
            return
        self._events.extend(events)
        if self._running is None:
            self._handle_ready()
        if len(self._events) >= _PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def feed_leftover(self, data: bytes) -> None:
        """Bytes Tornado read past the upgrade request, fed from the handover's task.

        Queued now, ahead of anything the transport reads next, but handled by a task: eager steps
        (data_received's) must run outside any task."""
        self._events.extend(self.parser.feed(data))
        if self._events and self._running is None:
            self._running = self.loop.create_task(self._drain_events(None))

    def eof_received(self) -> bool:
        """The peer half-closed: let the transport close."""
        return False

    def pause_writing(self) -> None:
        """The kernel did not take everything: a write is in flight until the buffer drains."""
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        """The buffer drained: the connection may write what it queued meanwhile."""
        fut, self._drain = self._drain, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket closed: fail a pending write, stop the close timer, tell the handler once."""
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        fut, self._drain = self._drain, None
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("closed"))
        self._events.clear()
        self.client_terminated = self.server_terminated = True
        if not self._notified:
            self._notified = True
            if self.handler is not None:
                try:
                    self.handler.on_closed(self.close_code)
                except Exception:
                    log.exception("close handler failed")
            self.handler = None  # breaks the session <-> connection cycle at once

    # ------------------------------------------------------------ frames in

    def _handle_ready(self) -> None:
        # Eager: each message's handler runs inline (core.eager) and most finish without waiting;
        # the first one that waits gets a task, which finishes it and then handles the rest in order.
        # After a few messages the rest goes to a task too, so a pipelining client yields to others.
        events = self._events
        handled = 0
        while events and not self.client_terminated:
            ev = events.popleft()
            if isinstance(ev, Text | Binary):
                handler = self.handler
                if handler is None:
                    return
                try:
                    result = handler.on_message(ev.data)
                    rest = None
                    if result is not None:
                        rest = eager.start(result) if type(result) is CoroutineType else result
                except Exception:
                    log.exception("message handler failed; dropping the connection")
                    self.abort()
                    return
                if rest is not None:
                    self._running = self.loop.create_task(self._drain_events(rest))
                    return
                handled += 1
                if handled >= _YIELD_EVENTS and events:
                    self._running = self.loop.create_task(self._drain_events(None))
                    return
            else:
                self._control(ev)
        self._maybe_resume_reading()

    async def _drain_events(self, rest: Awaitable[Any] | None) -> None:
        # The same loop as _handle_ready, but awaiting each handler: inside a task an eager step
        # would arm eager.timeout on this task while the handler's rest ran in another one.
        events = self._events
        handled = 0
        try:
            if rest is None:
                await asyncio.sleep(0)  # other connections' messages go between two batches
            else:
                await rest
            while events and not self.client_terminated:
                ev = events.popleft()
                if isinstance(ev, Text | Binary):
                    handler = self.handler
                    if handler is None:
                        return
                    result = handler.on_message(ev.data)
                    if result is not None:
                        await result
                    handled += 1
                    if handled >= _YIELD_EVENTS and events:
                        handled = 0
                        await asyncio.sleep(0)
                else:
                    self._control(ev)
                if self._paused:
                    self._maybe_resume_reading()
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("message handler failed; dropping the connection")
            self.abort()
        finally:
            self._running = None
            self._maybe_resume_reading()

    def _maybe_resume_reading(self) -> None:
        if self._paused and len(self._events) <= _RESUME_AT and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _control(self, ev: Event) -> None:
        if isinstance(ev, Ping):
            unsent = self.transport.get_write_buffer_size() if self.transport is not None else 0
            if unsent > _MAX_UNSENT:
                log.warning("peer pings but does not read its pongs (%d bytes unsent): cut", unsent)
                self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
                return
            self._write(control_frame(0xA, ev.data))
            if self.handler is not None:
                self.handler.on_alive()
        elif isinstance(ev, Pong):
            if self.handler is not None:
                self.handler.on_alive()
        elif isinstance(ev, Close):
            self.client_terminated = True
            self.close_code = ev.code
            self.close_reason = ev.reason or None
            self._events.clear()
            if not self.server_terminated:
                self.close(ev.code)  # echo the peer's code (RFC 6455 §5.5.1), then the server hangs up
            elif self.transport is not None:
                self.transport.close()
        elif isinstance(ev, Fail):
            self._events.clear()
            self.close(ev.close_code, ev.reason)
            self.client_terminated = True  # nothing more is read; the close frame is flushed, then TCP closes
            if self.transport is not None:
                self.transport.close()

    # ------------------------------------------------------------ frames out (core.connection.FrameSink)

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is None:
            self._early.append(data)
        elif not t.is_closing():
            t.write(data)

    def write_frames(self, data: bytes) -> asyncio.Future[None] | None:
        """Write pre-built frames; None when the kernel took them all, else a future for the flush."""
        t = self.transport
        if t is None:
            if self._notified:
                raise ConnectionError("closed")
            self._early.append(data)
            return None
        if t.is_closing():
            raise ConnectionError("closed")
        t.write(data)
        return self._drain

    def send_message(self, message: str | bytes) -> asyncio.Future[None] | None:
        """Write one text or binary message."""
        if isinstance(message, str):
            return self.write_frames(protocol.text_frame(message.encode()))
        return self.write_frames(protocol.text_frame(message, opcode=0x2))

    def ping(self) -> None:
        """Send a ping; the peer's pong reaches the handler as on_alive."""
        if self.server_terminated:
            raise ConnectionError("closing")
        self._write(control_frame(0x9))

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Start (or answer) the closing handshake; a dead or stuck peer's socket is dropped at once."""
        if self.server_terminated:
            return
        self.server_terminated = True
        self.sent_code = code
        self._write(control_frame(0x8, _close_payload(code, reason)))
        if self.transport is None:
            self._early_close = code  # connection_made sends the frame and hangs up
            return
        self._hang_up(code)

    def _hang_up(self, code: int | None) -> None:
        t = self.transport
        assert t is not None
        if code in _DROP_AFTER:
            # Such a peer will not answer (nor read): the frame goes if the kernel takes it now, and
            # the socket is dropped, not kept in the hub (the device online) for the close timeout.
            t.abort()
            return
        if self.client_terminated:
            t.close()  # the handshake is complete: flush, then hang up
        # Also after close(): a peer that stopped reading could hold the socket (and its buffer) forever.
        self._close_timer = self.loop.call_later(CLOSE_TIMEOUT_S, self.abort)

    def abort(self) -> None:
        """Drop the socket now, without flushing."""
        t = self.transport
        if t is not None:
            t.abort()
        elif not self._notified:
            self.connection_lost(None)


async def adopt(stream: IOStream, session: WireSession) -> None:
    """Move an upgraded connection from Tornado's IOStream onto `session`, with any bytes already read."""
    try:
        await stream.write(b"")  # the 101 response, flushed
    except Exception:
        session.connection_lost(None)
        return
    leftover = bytes(stream._read_buffer[: stream._read_buffer_size])
    try:
        sock = stream.socket.dup()  # the session's own descriptor; Tornado's closes with its stream
    except OSError:
        stream.close()
        session.connection_lost(None)
        return
    stream.set_close_callback(None)
    stream.close()
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: session, sock)
    except OSError:
        sock.close()
        session.connection_lost(None)
        return
    if leftover:
        session.feed_leftover(leftover)


class Handover(WebSocketProtocol13):
    """Tornado's RFC 6455 handshake, then the connection goes to the handler's `session` (a WireSession)."""

    def __init__(self, handler: _WebSocketDelegate, params: _WebSocketParams) -> None:
        super().__init__(handler, False, params)
        self._compression_options = None  # no extension is negotiated: RSV bits are always an error

    async def _receive_frame_loop(self) -> None:
        session: WireSession | None = getattr(self.handler, "session", None)
        stream = self.stream
        if stream is None:
            return
        if session is None:  # open() refused the connection
            stream.close()
            return
        await adopt(stream, session)
