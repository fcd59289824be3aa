"""Test helpers: a WebSocket client that speaks the envelope, and device-token helpers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from core.auth import device_token

FLEET_SECRET = "fleet-secret-for-tests-0123456789"
ADMIN_PASSWORD = "admin-pass-for-tests"


_last_ts: dict[str, int] = {}


def _fresh_timestamp(sn: str) -> int:
    """Now, but never a (sn, timestamp) pair used before: the server refuses replays."""
    import time

    ts = max(int(time.time()), _last_ts.get(sn, 0) + 1)
    _last_ts[sn] = ts
    return ts


class Client:
    """One WebSocket client: requests get their reply by request_id, pushes are queued by service."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> Client:
        """Open a connection (no Origin header unless given)."""
        ws = await websockets.connect(url, max_size=None, open_timeout=5, ping_interval=None, **kw)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                self.frames.append(msg)
                if msg.get("op") == "galbot_response" and msg.get("request_id") in self._waiting:
                    self._waiting.pop(msg["request_id"]).set_result(msg)
                elif msg.get("op") == "galbot_push":
                    await self.pushes.put(msg)
                else:
                    await self.pushes.put(msg)  # unmatched replies (e.g. null request_id) land here too
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            if not self.closed.done():
                self.closed.set_result(rcvd.code if rcvd else 1006)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("closed"))

    async def send_raw(self, data: str | bytes) -> None:
        """Send one frame as is."""
        await self.ws.send(data)

    async def request(
        self, service: str, values: Any = None, request_id: Any = None, timeout: float = 5
    ) -> dict[str, Any]:
        """Send a request and wait for its reply."""
        rid = request_id if request_id is not None else f"r-{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        env: dict[str, Any] = {"op": "galbot_request", "service": service, "request_id": rid}
        if values is not None:
            env["values"] = values
        await self.ws.send(json.dumps(env))
        return await asyncio.wait_for(fut, timeout)

    async def push(self, service: str | None = None, timeout: float = 5) -> dict[str, Any]:
        """The next push (of a given service, skipping others)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.pushes.get()
                if service is None or msg.get("service") == service:
                    return msg

    async def close_code(self, timeout: float = 5) -> int:
        """Wait for the server to close; the close code it sent."""
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)

    async def close(self) -> None:
        """Close from the client side."""
        await self.ws.close()
        self._reader.cancel()

    async def login_device(
        self, sn: str, type_: str = "retail", secret: str = FLEET_SECRET, timestamp: int | None = None
    ) -> dict[str, Any]:
        """Device login with an HMAC token."""
        ts = _fresh_timestamp(sn) if timestamp is None else timestamp
        return await self.request(
            "/api/user/login",
            {"sn": sn, "timestamp": ts, "token": device_token(secret, sn, ts), "type": type_, "firmware": "1.0"},
        )

    async def login_ops(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict[str, Any]:
        """Ops login."""
        return await self.request("/admin/auth/login", {"username": username, "password": password})


def client_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True, rsv: int = 0,
                 mask: bytes | None = None, length: int | None = None) -> bytes:
    """One RFC 6455 client frame (masked unless told otherwise); `length` overrides the header's length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4) if mask is None else mask
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big") if size else b""
    return head + mask + body


class RawSocket:
    """A bare RFC 6455 client for what a polite library will not send (bad UTF-8, bad close codes, no reads)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, origin: str | None = None, rcvbuf: int | None = None, first: bytes = b""
    ) -> RawSocket:
        """Open /ws and finish the handshake (`first`: bytes sent in the same write as the request)."""
        import base64
        import os
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
        ]
        if origin:
            lines.append(f"Origin: {origin}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            writer.close()
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """Write one masked frame."""
        self.writer.write(client_frame(opcode, payload, fin))

    def send_json(self, obj: Any) -> None:
        """A text frame with a JSON envelope."""
        self.send_frame(0x1, json.dumps(obj).encode())

    async def read_frame(self, timeout: float = 5) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        import struct

        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def close_code(self, timeout: float = 5) -> int:
        """Read until the close frame; its code (1006 when the socket just ended)."""
        import struct

        try:
            while True:
                op, payload = await self.read_frame(timeout)
                if op == 0x8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        except (asyncio.IncompleteReadError, ConnectionError):
            return 1006

    def close(self) -> None:
        """Drop the TCP connection."""
        self.writer.close()


async def removed(hub: Any, predicate: Any, timeout: float = 5) -> None:
    """Wait until the hub drops a connection for which `predicate(conn)` holds (now or already)."""
    if not any(predicate(c) for c in hub):
        return
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def watch(conn: Any) -> None:
        if predicate(conn) and not done.done():
            done.set_result(None)

    undo = hub.watch_removals(watch)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        undo()
