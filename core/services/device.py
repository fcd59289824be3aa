"""Device services: login, status, heartbeat, command ack."""

from __future__ import annotations

import uuid
from typing import Any

from ..context import ServerContext
from ..errors import CLOSE_REPLACED, ServiceError
from ..registry import Rule, rule
from .models import CommandAck, DeviceLogin, NoArgs, StatusReport


async def device_login(ctx: ServerContext, a: DeviceLogin) -> dict[str, Any]:
    """HMAC login of a robot; a newer login of the same sn replaces the older connection (4409)."""
    conn = ctx.conn
    if conn.authenticated:
        raise ServiceError(409, "this connection is already logged in")
    deps = ctx.deps
    if a.type not in deps.settings.devices.types:
        raise ServiceError(400, "invalid values", errors=[{"field": "type", "msg": f"unknown type {a.type!r}"}])
    try:
        ident = await deps.auth.login_device(a.sn, a.timestamp, a.token, a.type)
    except ServiceError as exc:
        await deps.audit.record(f"device:{a.sn}", "device.login", a.sn, "failed",
                                {"code": exc.code, "reason": exc.msg, "remote": conn.remote})
        raise
    old = ctx.hub.bind_device(conn, ident.sn, ident.type)
    conn.session_id = "s-" + uuid.uuid4().hex
    try:
        if old is not None:
            old.close(CLOSE_REPLACED, "replaced by a newer login")
            await deps.monitor.offline(ident.sn, ident.type, "replaced", force_push=True)
        # The same device may be held by another node: that node closes its connection with 4409.
        await deps.push.broker.send_control("evict", {"sn": ident.sn, "conn": conn.id})
        await deps.monitor.online(conn, a.firmware)
    except BaseException:
        # A login answered with an error must not leave the connection logged in.
        ctx.hub.unbind_device(conn)
        raise
    await deps.audit.record(f"device:{ident.sn}", "device.login", ident.sn, "ok",
                            {"remote": conn.remote, "registered": not ident.registered})
    sn = ident.sn

    async def redeliver() -> None:
        await deps.commands.redeliver(sn)

    ctx.after.append(redeliver)
    return {
        "sn": ident.sn,
        "type": ident.type,
        "session_id": conn.session_id,
        "heartbeat_interval_s": deps.settings.heartbeat.interval_s,
        "server_time": int(ctx.clock.time()),
    }


async def device_status(ctx: ServerContext, a: StatusReport) -> dict[str, Any]:
    """Store a status report and push it to subscribed ops connections."""
    if a.sn is not None and a.sn != ctx.conn.sn:
        raise ServiceError(403, "a device may only report its own status")
    ts = await ctx.deps.monitor.ingest(ctx.conn, a.fields())
    return {"accepted": True, "ts": ts}


async def device_heartbeat(ctx: ServerContext, a: NoArgs) -> dict[str, Any]:
    """Application-level keepalive for firmware that cannot answer WebSocket pings."""
    return {"server_time": int(ctx.clock.time())}


async def command_ack(ctx: ServerContext, a: CommandAck) -> dict[str, Any]:
    """A device reports the outcome of a command."""
    assert ctx.conn.sn is not None
    doc = await ctx.deps.commands.ack(ctx.conn.sn, a.command_id, a.ok, a.code, a.msg, a.values)
    return {"command_id": doc["command_id"], "state": doc["state"]}


RULES: list[Rule] = [
    rule("/api/user/login", device_login, DeviceLogin, "none"),
    rule("/api/device/status", device_status, StatusReport, "device"),
    rule("/api/device/heartbeat", device_heartbeat, NoArgs, "device"),
    rule("/api/command/ack", command_ack, CommandAck, "device"),
]
