"""Minimal aiohttp peer for the fleetpush benchmark: `/ws` plus the command HTTP route on one port.

Usage: python aiohttp_peer.py PORT
"""

from __future__ import annotations

import os
import sys
from typing import Any

from aiohttp import WSMsgType, web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Hub


async def _send(ws: web.WebSocketResponse, frame: str) -> None:
    if not ws.closed:
        await ws.send_str(frame)


async def _broadcast(targets: list[web.WebSocketResponse], frame: str) -> None:
    for ws in targets:
        if not ws.closed:
            await ws.send_str(frame)


hub = Hub(_broadcast, _send)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    """One device or ops connection."""
    ws = web.WebSocketResponse(max_msg_size=65536, compress=False)
    await ws.prepare(request)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await hub.handle(ws, msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.close(code=1003)
    finally:
        hub.gone(ws)
    return ws


async def command_handler(request: web.Request) -> web.Response:
    """POST /api/v1/devices/{sn}/commands: push device_command to the device."""
    try:
        body: dict[str, Any] = await request.json()
    except ValueError:
        return web.json_response({"code": 400, "msg": "not JSON"}, status=400)
    found = hub.command_frame(request.match_info["sn"], body)
    if found is None:
        return web.json_response({"code": 404, "msg": "unknown device"}, status=404)
    ws, frame, cid = found
    await _send(ws, frame)
    return web.json_response({"command_id": cid, "state": "sent"}, status=202)


def main() -> None:
    """Serve on 127.0.0.1:PORT until SIGINT/SIGTERM."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_post("/api/v1/devices/{sn}/commands", command_handler)
    print(f"aiohttp peer listening on ws://127.0.0.1:{port}/ws", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
