"""core.wsreader.BatchedProtocol over real sockets, in a tiny Tornado echo app on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from fleetkit import RawSocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketHandler, WebSocketProtocol, _WebSocketParams

from core.wsreader import BatchedProtocol

LIMIT = 4096


@dataclass
class EchoServer:
    """What the handlers saw, for the test to check."""

    port: int = 0
    active: int = 0
    max_active: int = 0
    handled: int = 0
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    closed: asyncio.Queue[tuple[int | None, str | None]] = field(default_factory=asyncio.Queue)
    errors: list[BaseException] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    handled_before_calm: int | None = None


class Echo(WebSocketHandler):
    """Echoes text; closes 1003 on binary; `yield:` messages suspend first; `raise` raises."""

    srv: EchoServer

    def initialize(self, srv: EchoServer) -> None:
        self.srv = srv

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        return BatchedProtocol(self, False, _WebSocketParams(max_message_size=LIMIT, compression_options=None))

    def open(self, *args: str, **kwargs: str) -> None:
        self.srv.protocols.append(type(self.ws_connection).__name__)

    async def on_message(self, message: str | bytes) -> None:
        srv = self.srv
        srv.active += 1
        srv.max_active = max(srv.max_active, srv.active)
        try:
            if isinstance(message, bytes):
                self.close(1003, "binary frames are not supported")
                return
            if message == "raise":
                raise RuntimeError("handler failed")
            if message.startswith("yield:"):
                await asyncio.sleep(0)  # a real suspension: the next message must still wait for this one
            if message == "calm":
                srv.handled_before_calm = srv.handled
            srv.handled += 1
            if message.startswith("nowait:"):
                self.write_message(message)  # a handler that never suspends
                return
            await self.write_message(message)
        finally:
            srv.active -= 1

    def on_ping(self, data: bytes) -> None:
        self.srv.pings.append(data)

    def on_pong(self, data: bytes) -> None:
        self.srv.pongs.append(data)

    def on_close(self) -> None:
        self.srv.closed.put_nowait((self.close_code, self.close_reason))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        self.srv.errors.append(value)


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


def masked(opcode: int, payload: bytes, fin: bool = True, masked_: bool = True, rsv: int = 0) -> bytes:
    """One client frame (masked unless told otherwise)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked_ else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked_:
        return head + payload
    mask = os.urandom(4)
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
    return head + mask + body


async def closed(srv: EchoServer) -> tuple[int | None, str | None]:
    return await asyncio.wait_for(srv.closed.get(), 5)


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(srv: EchoServer) -> None:
    raw = await RawSocket.connect(srv.port)
    msgs = [f"yield:{i}" if i % 3 == 0 else f"m{i}" for i in range(1000)]
    raw.writer.write(b"".join(masked(0x1, m.encode()) for m in msgs))  # one write: many frames per read
    got = [(await raw.read_frame()) for _ in msgs]
    assert got == [(0x1, m.encode()) for m in msgs]
    assert srv.max_active == 1
    assert srv.protocols == ["BatchedProtocol"]
    raw.send_frame(0x8, struct.pack("!H", 1000))
    assert await raw.close_code() == 1000
    assert await closed(srv) == (1000, None)


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
    # Served after a few of the flood's messages (BatchedProtocol.yield_events), not after all of them.
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
    assert srv.pings == [b"are you there", b"p2"]
    assert srv.pongs == [b"unsolicited"]
    raw.close()
    assert await closed(srv) == (None, None)
    async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=5, ping_interval=None) as ws:
        await asyncio.wait_for(await ws.ping(b"lib"), 5)
    assert srv.pings[-1] == b"lib"


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([masked(0x1, b"x" * (LIMIT + 1))], 1009, id="too-big"),
        pytest.param([masked(0x1, b"x" * 3000, fin=False), masked(0x0, b"y" * 1100)], 1009, id="too-big-fragmented"),
        pytest.param([masked(0x1, b"ok \xff")], 1007, id="bad-utf8"),
        pytest.param([masked(0x1, b"ok", fin=False), masked(0x0, b"\xed\xa0\x80", fin=False)], 1007,
                     id="bad-utf8-frag"),
        pytest.param([masked(0x1, b"hi", masked_=False)], 1002, id="unmasked"),
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
    assert srv.errors == []


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


async def test_handler_error_aborts_the_connection(srv: EchoServer) -> None:
    raw = await RawSocket.connect(srv.port)
    raw.writer.write(masked(0x1, b"raise") + masked(0x1, b"never handled"))
    assert await raw.close_code() == 1006
    assert await closed(srv) == (None, None)
    assert [str(e) for e in srv.errors] == ["handler failed"]
    assert srv.handled == 0
