"""core.wire over real sockets: Tornado's handshake, then a WireSession with an echo handler, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import websockets
from fleetkit import RawSocket
from fleetkit import client_frame as masked
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketHandler, WebSocketProtocol, _WebSocketParams

from core.wire import Handover, WireSession

LIMIT = 4096


@dataclass
class EchoServer:
    """What the handlers saw, for the test to check."""

    port: int = 0
    active: int = 0
    max_active: int = 0
    handled: int = 0
    alive: int = 0
    closed: asyncio.Queue[tuple[int | None, str | None]] = field(default_factory=asyncio.Queue)
    sessions: list[str] = field(default_factory=list)
    handled_before_calm: int | None = None


class EchoClient:
    """Echoes text; closes 1003 on binary; `yield:` messages suspend first; `raise` raises."""

    def __init__(self, srv: EchoServer) -> None:
        self.srv = srv
        self.session: WireSession | None = None

    async def on_message(self, message: str | bytes) -> None:
        srv, session = self.srv, self.session
        assert session is not None
        srv.active += 1
        srv.max_active = max(srv.max_active, srv.active)
        try:
            if isinstance(message, bytes):
                session.close(1003, "binary frames are not supported")
                return
            if message == "raise":
                raise RuntimeError("handler failed")
            if message.startswith("yield:"):
                await asyncio.sleep(0)  # a real suspension: the next message must still wait for this one
            if message == "calm":
                srv.handled_before_calm = srv.handled
            srv.handled += 1
            session.send_message(message)
        finally:
            srv.active -= 1

    def on_alive(self) -> None:
        self.srv.alive += 1

    def on_closed(self, code: int | None) -> None:
        assert self.session is not None
        self.srv.closed.put_nowait((code, self.session.close_reason))


class Echo(WebSocketHandler):
    """The handshake; the socket then goes to a WireSession with an EchoClient."""

    srv: EchoServer
    session: WireSession | None = None

    def initialize(self, srv: EchoServer) -> None:
        self.srv = srv

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        return Handover(self, _WebSocketParams(max_message_size=LIMIT, compression_options=None))

    def open(self, *args: str, **kwargs: str) -> None:
        client = EchoClient(self.srv)
        self.session = client.session = WireSession(client, LIMIT)
        self.srv.sessions.append(type(self.session).__name__)


@pytest.fixture
async def srv() -> AsyncIterator[EchoServer]:
    state = EchoServer()
    socks = bind_sockets(0, "127.0.0.1")
    http = HTTPServer(Application([(r"/ws", Echo, {"srv": state})]))
    http.add_sockets(socks)
    state.port = socks[0].getsockname()[1]
    yield state
    http.stop()
    await http.close_all_connections()


async def closed(srv: EchoServer) -> tuple[int | None, str | None]:
    return await asyncio.wait_for(srv.closed.get(), 5)


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(srv: EchoServer) -> None:
    raw = await RawSocket.connect(srv.port)
    msgs = [f"yield:{i}" if i % 3 == 0 else f"m{i}" for i in range(1000)]
    raw.writer.write(b"".join(masked(0x1, m.encode()) for m in msgs))  # one write: many frames per read
    got = [(await raw.read_frame()) for _ in msgs]
    assert got == [(0x1, m.encode()) for m in msgs]
    assert srv.max_active == 1
    assert srv.sessions == ["WireSession"]
    raw.send_frame(0x8, struct.pack("!H", 1000))
    assert await raw.close_code() == 1000
    assert await closed(srv) == (1000, None)


async def test_frames_sent_with_the_upgrade_request_are_not_lost(srv: EchoServer) -> None:
    # A client may write its first frames right behind the HTTP request, before the 101 arrives:
    # Tornado has read them already when the socket moves to the session, which must take them along.
    raw = await RawSocket.connect(srv.port, first=masked(0x1, b"early") + masked(0x1, b"bird"))
    assert await raw.read_frame() == (0x1, b"early")
    assert await raw.read_frame() == (0x1, b"bird")
    raw.close()
    assert await closed(srv) == (None, None)


async def test_pipelined_with_the_websockets_client(srv: EchoServer) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=5, ping_interval=None) as ws:
        for i in range(1000):
            await ws.send(f"yield:{i}" if i % 2 else f"r{i}")
        for i in range(1000):
            assert await asyncio.wait_for(ws.recv(), 5) == (f"yield:{i}" if i % 2 else f"r{i}")
        big = "\u00e9" * (LIMIT // 2)  # exactly LIMIT bytes, spans several TCP reads
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 5) == big
    assert await closed(srv) == (1000, None)
    assert srv.max_active == 1


async def test_a_pipelining_client_does_not_hold_the_ioloop(srv: EchoServer) -> None:
    flood = await RawSocket.connect(srv.port)
    calm = await RawSocket.connect(srv.port)
    n = 3000
    flood.writer.write(b"".join(masked(0x1, b"nowait:%d" % i) for i in range(n)))  # arrives as one or two reads
    calm.send_frame(0x1, b"calm")
    assert await calm.read_frame() == (0x1, b"calm")
    # Served after a few of the flood's messages (core.wire yields every few), not after all of them.
    assert srv.handled_before_calm is not None and srv.handled_before_calm < n // 2, srv.handled_before_calm
    for i in range(n):
        assert await flood.read_frame() == (0x1, b"nowait:%d" % i)
    flood.close()
    calm.close()


async def test_pings_are_answered_and_reported(srv: EchoServer) -> None:
    raw = await RawSocket.connect(srv.port)
    raw.send_frame(0x9, b"are you there")
    assert await raw.read_frame() == (0xA, b"are you there")
    # A ping inside a fragmented message is answered at once; the message still arrives whole.
    raw.send_frame(0x1, b"frag", fin=False)
    raw.send_frame(0x9, b"p2")
    assert await raw.read_frame() == (0xA, b"p2")
    raw.send_frame(0xA, b"unsolicited")
    raw.send_frame(0x0, b"mented", fin=False)
    raw.send_frame(0x0, b"!")
    assert await raw.read_frame() == (0x1, b"fragmented!")
    assert srv.alive == 3  # two pings and a pong counted as life
    raw.close()
    assert await closed(srv) == (None, None)
    async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=5, ping_interval=None) as ws:
        await asyncio.wait_for(await ws.ping(b"lib"), 5)
    assert srv.alive == 4


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([masked(0x1, b"x" * (LIMIT + 1))], 1009, id="too-big"),
        pytest.param([masked(0x1, b"x" * 3000, fin=False), masked(0x0, b"y" * 1100)], 1009, id="too-big-fragmented"),
        pytest.param([masked(0x1, b"ok \xff")], 1007, id="bad-utf8"),
        pytest.param([masked(0x1, b"ok", fin=False), masked(0x0, b"\xed\xa0\x80", fin=False)], 1007,
                     id="bad-utf8-frag"),
        pytest.param([masked(0x1, b"hi", masked=False)], 1002, id="unmasked"),
        pytest.param([masked(0x1, b"hi", rsv=4)], 1002, id="rsv1"),
        pytest.param([masked(0x3, b"")], 1002, id="reserved-opcode"),
        pytest.param([masked(0x0, b"orphan")], 1002, id="orphan-continuation"),
        pytest.param([masked(0x1, b"a", fin=False), masked(0x1, b"b")], 1002, id="interleaved-messages"),
        pytest.param([masked(0x9, b"p", fin=False)], 1002, id="fragmented-ping"),
        pytest.param([masked(0x8, b"\x03")], 1002, id="close-1-byte"),
        pytest.param([masked(0x8, struct.pack("!H", 1005))], 1002, id="close-code-1005"),
        pytest.param([masked(0x8, struct.pack("!H", 1000) + b"\xff")], 1002, id="close-reason-not-utf8"),
        pytest.param([masked(0x2, b"\x00\x01")], 1003, id="binary-closed-by-handler"),
    ],
)
async def test_protocol_errors_close_with_the_right_code(srv: EchoServer, frames: list[bytes], code: int) -> None:
    raw = await RawSocket.connect(srv.port)
    raw.send_frame(0x1, b"before")
    raw.writer.write(b"".join(frames))  # the last fragment of a too-big/bad message is never sent: fail fast
    assert await raw.read_frame() == (0x1, b"before")
    assert await raw.close_code() == code
    if code == 1003:  # the server waits for our close reply
        raw.send_frame(0x8, struct.pack("!H", 1003))
        assert await closed(srv) == (1003, None)
    else:
        assert await closed(srv) == (None, None)  # failed, not a clean close by the client
    # The server dropped the socket after its close frame.
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""


async def test_client_close_handshake(srv: EchoServer) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=5, ping_interval=None) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        await ws.close(4000, "done here")
        assert ws.close_code == 4000  # echoed by the server (RFC 6455 §5.5.1)
    assert await closed(srv) == (4000, "done here")
    raw = await RawSocket.connect(srv.port)
    raw.send_frame(0x8, b"")
    op, payload = await raw.read_frame()
    assert (op, payload) == (0x8, b"")
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""
    assert await closed(srv) == (None, None)


async def test_frames_after_the_close_are_ignored(srv: EchoServer) -> None:
    raw = await RawSocket.connect(srv.port)
    raw.writer.write(masked(0x1, b"one") + masked(0x8, struct.pack("!H", 1000)) + masked(0x1, b"late"))
    assert await raw.read_frame() == (0x1, b"one")
    assert await raw.read_frame() == (0x8, struct.pack("!H", 1000))
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""
    assert await closed(srv) == (1000, None)
    assert srv.handled == 1


async def test_abrupt_disconnects(srv: EchoServer) -> None:
    raw = await RawSocket.connect(srv.port)
    raw.writer.write(masked(0x1, b"x" * 1000)[:500])  # half a frame, then the TCP connection goes
    raw.close()
    assert await closed(srv) == (None, None)
    raw = await RawSocket.connect(srv.port)
    raw.send_frame(0x1, b"hello")
    assert await raw.read_frame() == (0x1, b"hello")
    raw.close()
    assert await closed(srv) == (None, None)
    # Tens of connections dropped at once, some in the middle of a fragmented message.
    socks = [await RawSocket.connect(srv.port) for _ in range(20)]
    for i, s in enumerate(socks):
        s.send_frame(0x1, b"part", fin=i % 2 == 0)
    for s in socks:
        s.close()
    for _ in socks:
        await closed(srv)


async def test_handler_error_aborts_the_connection(srv: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    raw = await RawSocket.connect(srv.port)
    with caplog.at_level(logging.ERROR, logger="fleetpush.wire"):
        raw.writer.write(masked(0x1, b"raise") + masked(0x1, b"never handled"))
        assert await raw.close_code() == 1006
        assert await closed(srv) == (None, None)
    errors = [r for r in caplog.records if r.name == "fleetpush.wire"]
    assert [str(r.exc_info[1]) for r in errors if r.exc_info] == ["handler failed"]
    assert srv.handled == 0
