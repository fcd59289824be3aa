"""Test helpers: a WebSocket client that speaks the envelope, and device-token helpers."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from core.auth import device_token

FLEET_SECRET = "fleet-secret-for-tests-0123456789"
ADMIN_PASSWORD = "admin-pass-for-tests"


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
            rcvd = self.ws.close_rcvd
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
        import time

        ts = int(time.time()) if timestamp is None else timestamp
        return await self.request(
            "/api/user/login",
            {"sn": sn, "timestamp": ts, "token": device_token(secret, sn, ts), "type": type_, "firmware": "1.0"},
        )

    async def login_ops(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict[str, Any]:
        """Ops login."""
        return await self.request("/admin/auth/login", {"username": username, "password": password})
