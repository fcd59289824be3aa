"""Minimal python-websockets peer for the fleetpush benchmark.

websockets serves only the WebSocket handshake (GET), so the command route
`POST /api/v1/devices/{sn}/commands` is a tiny asyncio HTTP/1.1 server on PORT+1.
Usage: python websockets_peer.py PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Hub


async def _send(ws: ServerConnection, frame: str) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(frame)


async def _broadcast(targets: list[ServerConnection], frame: str) -> None:
    broadcast(targets, frame)


hub = Hub(_broadcast, _send)
_ROUTE = re.compile(rb"^POST /api/v1/devices/([^/ ]+)/commands HTTP/1\.[01]$")


async def handler(ws: ServerConnection) -> None:
    """One device or ops connection."""
    if ws.request is None or ws.request.path != "/ws":
        await ws.close(1008)
        return
    try:
        async for msg in ws:
            if isinstance(msg, bytes):
                await ws.close(1003)
                return
            await hub.handle(ws, msg)
    except ConnectionClosed:
        pass
    finally:
        hub.gone(ws)


def _http(status: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


async def http_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive HTTP/1.1 connection serving the command route."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = 0
            for line in lines[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b"{}"
            m = _ROUTE.match(lines[0])
            found = hub.command_frame(m.group(1).decode(), json.loads(body)) if m else None
            if found is None:
                writer.write(_http(404, {"code": 404, "msg": "not found"}))
            else:
                ws, frame, cid = found
                await _send(ws, frame)
                writer.write(_http(202, {"command_id": cid, "state": "sent"}))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def amain(port: int) -> None:
    """Serve until SIGINT/SIGTERM."""
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    http = await asyncio.start_server(http_conn, "127.0.0.1", port + 1, backlog=128)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=65536, ping_interval=None, backlog=4096):
        print(f"websockets peer listening on ws://127.0.0.1:{port}/ws (commands on {port + 1})", flush=True)
        await stop
    http.close()


if __name__ == "__main__":
    asyncio.run(amain(int(sys.argv[1]) if len(sys.argv) > 1 else 8765))
