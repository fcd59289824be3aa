"""Shared request handling of the Python peers: the same work fleetpush does in each scenario.

Device login per PROTOCOL §3 (HMAC-SHA256 over "sn:timestamp" with the fleet secret), one reply
per request (§2 envelope), `/admin/push/broadcast` to every logged-in connection,
`/admin/device/subscribe` + `/api/device/status` pushes, and a command push for the HTTP route.
Transport-specific sending is passed in, so the aiohttp and websockets peers differ only there.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

SECRET = os.environ.get("BENCH_DEVICE_SECRET", "bench-secret").encode()

_push_ids = itertools.count(1)
_session_ids = itertools.count(1)
_command_ids = itertools.count(1)


def reply(service: str, request_id: Any, values: Any, code: int = 0, msg: str = "") -> str:
    """Encode one response envelope."""
    return json.dumps(
        {
            "op": "galbot_response",
            "service": service,
            "code": code,
            "msg": msg,
            "values": values,
            "result": code == 0,
            "request_id": request_id,
        },
        separators=(",", ":"),
    )


def push(service: str, values: Any) -> str:
    """Encode one push envelope with a fresh id."""
    return json.dumps(
        {
            "op": "galbot_push",
            "service": service,
            "code": 0,
            "msg": "",
            "values": values,
            "result": True,
            "request_id": f"p-{next(_push_ids)}",
        },
        separators=(",", ":"),
    )


class Hub:
    """Logged-in connections by sn, subscribers; `conn` objects are whatever the transport uses."""

    def __init__(self, broadcast: Callable[[list[Any], str], Any], send: Callable[[Any, str], Any]) -> None:
        self.authed: dict[Any, tuple[str, str]] = {}
        self.by_sn: dict[str, Any] = {}
        self.subscribers: set[Any] = set()
        self._broadcast = broadcast
        self._send = send

    def gone(self, conn: Any) -> None:
        """Forget a closed connection."""
        ident = self.authed.pop(conn, None)
        self.subscribers.discard(conn)
        if ident and self.by_sn.get(ident[0]) is conn:
            del self.by_sn[ident[0]]

    async def handle(self, conn: Any, text: str) -> None:
        """Serve one text frame from `conn`."""
        try:
            req = json.loads(text)
        except ValueError:
            await self._send(conn, reply("", None, None, 400, "not JSON"))
            return
        if not isinstance(req, dict) or not isinstance(req.get("service"), str):
            await self._send(conn, reply("", None, None, 400, "missing service"))
            return
        service = req["service"]
        rid = req.get("request_id")
        values = req.get("values") or {}
        if service == "/api/user/login":
            await self._send(conn, self._login(conn, service, rid, values))
            return
        if service == "/admin/auth/login":
            self.authed[conn] = ("", "admin")
            out = {"token": "t", "username": "admin", "role": "admin", "expires_at": ""}
            await self._send(conn, reply(service, rid, out))
            return
        if conn not in self.authed:
            await self._send(conn, reply(service, rid, None, 401, "not authenticated"))
            return
        if service == "/admin/push/broadcast":
            frame = push(values.get("service", "broadcast"), values.get("message"))
            targets = list(self.authed)
            await self._broadcast(targets, frame)
            await self._send(conn, reply(service, rid, {"matched": len(targets), "queued": len(targets)}))
        elif service == "/admin/device/subscribe":
            self.subscribers.add(conn)
            await self._send(conn, reply(service, rid, {}))
        elif service == "/api/device/status":
            ts = datetime.now(UTC).isoformat()
            await self._send(conn, reply(service, rid, {"accepted": True, "ts": ts}))
            if self.subscribers:
                sn, typ = self.authed[conn]
                frame = push("device_status", {**values, "sn": sn, "type": typ, "ts": ts})
                await self._broadcast(list(self.subscribers), frame)
        elif service == "/api/device/heartbeat":
            await self._send(conn, reply(service, rid, {"server_time": time.time()}))
        elif service == "/api/command/ack":
            await self._send(conn, reply(service, rid, {"command_id": values.get("command_id"), "state": "acked"}))
        else:
            await self._send(conn, reply(service, rid, None, 404, "unknown service"))

    def _login(self, conn: Any, service: str, rid: Any, v: dict[str, Any]) -> str:
        sn, ts = v.get("sn"), v.get("timestamp")
        want = hmac.new(SECRET, f"{sn}:{ts}".encode(), hashlib.sha256).hexdigest()
        now = int(time.time())
        ok = (
            isinstance(sn, str)
            and isinstance(ts, int)
            and isinstance(v.get("token"), str)
            and hmac.compare_digest(v["token"], want)
            and abs(now - ts) <= 300
        )
        if not ok:
            return reply(service, rid, None, 401, "login failed")
        self.authed[conn] = (sn, str(v.get("type", "")))
        self.by_sn[sn] = conn
        out = {
            "sn": sn,
            "type": v.get("type"),
            "session_id": f"s-{next(_session_ids)}",
            "heartbeat_interval_s": 20,
            "server_time": now,
        }
        return reply(service, rid, out)

    def command_frame(self, sn: str, body: dict[str, Any]) -> tuple[Any, str, str] | None:
        """The (connection, push frame, command id) for a command to `sn`, or None when offline."""
        conn = self.by_sn.get(sn)
        if conn is None:
            return None
        cid = f"c-{next(_command_ids)}"
        now = datetime.now(UTC)
        ttl = int(body.get("ttl_s", 300))
        frame = push(
            "device_command",
            {
                "command_id": cid,
                "command": body.get("command"),
                "args": body.get("args") or {},
                "issued_at": now.isoformat(),
                "expires_at": (now + timedelta(seconds=ttl)).isoformat(),
            },
        )
        return conn, frame, cid
