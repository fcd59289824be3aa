"""Inbound frames/s: core.wsframes.FrameParser and core.wire.WireSession vs Tornado's per-frame reader.

All three parse the same bytes (masked client text frames, `--size` bytes of JSON each, in 64 KiB reads)
in this process, without sockets: `FrameParser.feed` alone; Tornado's own `WebSocketProtocol13._receive_frame`
loop (three awaits per frame) over an in-memory stream; and `WireSession.data_received` fed the same chunks
(as asyncio's transport would), each drained before the next. The handlers' `on_message` does nothing,
so this is the reader's cost only.

    .venv/bin/python bench/reader_bench.py [--frames 200000] [--size 120] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado.concurrent import Future
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketProtocol13, _WebSocketParams

from core.wire import WireSession
from core.wsframes import FrameParser, Text

READ_CHUNK = 65536


def client_frame(payload: bytes) -> bytes:
    """One masked text frame."""
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack("!H", n)
    mask = os.urandom(4)
    key = (mask * (n // 4 + 1))[:n]
    return head + mask + (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def make_stream_bytes(frames: int, size: int) -> bytes:
    """`frames` text frames carrying a JSON request padded to `size` bytes."""
    base = {"op": "galbot_request", "service": "/api/device/heartbeat", "request_id": 0, "values": {"p": ""}}
    out = []
    for i in range(frames):
        base["request_id"] = i
        raw = json.dumps(base)
        base["values"] = {"p": "x" * max(0, size - len(raw))}
        out.append(client_frame(json.dumps(base).encode()))
        base["values"] = {"p": ""}
    return b"".join(out)


class MemoryStream:
    """The part of IOStream the readers use, over bytes already in memory (every read completes inline)."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self._closed = False

    def _done(self, value: bytes) -> Future[bytes]:
        fut: Future[bytes] = Future()
        fut.set_result(value)
        return fut

    def read_bytes(self, n: int, partial: bool = False) -> Future[bytes]:
        """What IOStream.read_bytes returns when the bytes are already buffered: a finished Future."""
        left = len(self.data) - self.pos
        if left == 0 or (left < n and not partial):
            raise StreamClosedError()
        take = min(n, left)
        chunk = bytes(self.data[self.pos : self.pos + take])
        self.pos += take
        return self._done(chunk)

    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def write(self, data: bytes) -> Future[None]:
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


class CountingHandler:
    """A WebSocketHandler stand-in whose on_message only counts."""

    def __init__(self) -> None:
        self.messages = 0
        self.closed = False

    def on_message(self, message: str | bytes) -> None:
        self.messages += 1

    def on_ping(self, data: bytes) -> None:
        pass

    def on_pong(self, data: bytes) -> None:
        pass

    def on_ws_connection_close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed = True

    def log_exception(self, *exc: Any) -> None:
        raise RuntimeError("handler error in benchmark") from exc[1]


class NullTransport(asyncio.Transport):
    """The part of asyncio's transport a WireSession uses; writes go nowhere."""

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class CountingClient:
    """A WireHandler whose on_message only counts."""

    def __init__(self) -> None:
        self.messages = 0

    def on_message(self, message: str | bytes) -> None:
        self.messages += 1

    def on_alive(self) -> None:
        pass

    def on_closed(self, code: int | None) -> None:
        pass


async def bench_session(data: bytes, frames: int) -> float:
    """WireSession.data_received per 64 KiB chunk, each chunk's messages handled before the next; frames/s."""
    client = CountingClient()
    session = WireSession(client, 1 << 20)
    session.connection_made(NullTransport())  # type: ignore[arg-type]
    view = memoryview(data)
    start = time.perf_counter()
    for i in range(0, len(data), READ_CHUNK):
        session.data_received(bytes(view[i : i + READ_CHUNK]))
        if session._running is not None:  # one task handles every queued message, then ends
            await session._running
    elapsed = time.perf_counter() - start
    assert client.messages == frames, client.messages
    return frames / elapsed


def bench_parser(data: bytes, frames: int) -> float:
    """FrameParser.feed over 64 KiB chunks; frames/s."""
    parser = FrameParser(1 << 20)
    view = memoryview(data)
    start = time.perf_counter()
    got = 0
    for i in range(0, len(data), READ_CHUNK):
        got += len(parser.feed(bytes(view[i : i + READ_CHUNK])))
    elapsed = time.perf_counter() - start
    assert got == frames, got
    return frames / elapsed


async def bench_protocol(cls: type[WebSocketProtocol13], data: bytes, frames: int) -> float:
    """A protocol's _receive_frame_loop over a MemoryStream; frames/s."""
    handler = CountingHandler()
    proto = cls(handler, False, _WebSocketParams(max_message_size=1 << 20, compression_options=None))  # type: ignore[arg-type]
    proto.stream = MemoryStream(data)  # type: ignore[assignment]
    start = time.perf_counter()
    await proto._receive_frame_loop()
    elapsed = time.perf_counter() - start
    assert handler.messages == frames and handler.closed, handler.messages
    return frames / elapsed


def main() -> None:
    """Run each reader `--repeat` times on the same bytes and print the best frames/s of each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=120, help="payload bytes per frame")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    data = make_stream_bytes(args.frames, args.size)
    first = FrameParser(1 << 20).feed(data[:READ_CHUNK])[0]
    assert isinstance(first, Text) and json.loads(first.data)["request_id"] == 0
    rows: dict[str, float] = {"FrameParser.feed": 0.0, "WireSession": 0.0, "Tornado WebSocketProtocol13": 0.0}
    for _ in range(args.repeat):
        rows["FrameParser.feed"] = max(rows["FrameParser.feed"], bench_parser(data, args.frames))
        rows["WireSession"] = max(rows["WireSession"], asyncio.run(bench_session(data, args.frames)))
        rows["Tornado WebSocketProtocol13"] = max(rows["Tornado WebSocketProtocol13"],
                                                  asyncio.run(bench_protocol(WebSocketProtocol13, data, args.frames)))
    print(f"{args.frames} masked text frames of {args.size} payload bytes, {len(data)} bytes, best of {args.repeat}")
    tornado = rows["Tornado WebSocketProtocol13"]
    for name, rate in rows.items():
        print(f"  {name:<30} {rate:>12,.0f} frames/s  ({rate / tornado:.1f}x Tornado)")


if __name__ == "__main__":
    main()
