"""Ops services: login, device list and history, subscriptions, commands, broadcasts."""

from __future__ import annotations

from typing import Any

from ..auth import role_allows
from ..broker import Delivery, Target
from ..clock import iso
from ..context import Deps, ServerContext
from ..errors import ServiceError
from ..monitor import device_json, snapshot_json
from ..registry import Rule, rule
from .models import Broadcast, DeviceCommand, DeviceListQuery, HistoryQuery, OpsLogin, SubscribeArgs


async def ops_login(ctx: ServerContext, a: OpsLogin) -> dict[str, Any]:
    """Username and password login of an ops user; the token also works as an HTTP bearer."""
    conn = ctx.conn
    if conn.kind == "device":
        raise ServiceError(409, "this connection is logged in as a device")
    deps = ctx.deps
    try:
        token, who = await deps.auth.login_ops(a.username, a.password)
    except ServiceError as exc:
        await deps.audit.record(a.username, "user.login", a.username, "failed", {"code": exc.code,
                                                                             "remote": conn.remote})
        raise
    ctx.hub.bind_ops(conn, who.username, who.role)
    conn.session_expires = ctx.clock.monotonic() + deps.settings.auth.session_ttl_s
    await deps.audit.record(who.username, "user.login", who.username, "ok", {"remote": conn.remote, "via": "ws"})
    return {"token": token, "username": who.username, "role": who.role, "expires_at": iso(who.expires_at)}


async def device_list(ctx: ServerContext, a: DeviceListQuery) -> dict[str, Any]:
    """Every device with its presence and latest status."""
    docs = await ctx.store.list_devices(a.type, a.online)
    return {"devices": [device_json(d) for d in docs]}


async def device_history(ctx: ServerContext, a: HistoryQuery) -> dict[str, Any]:
    """Status snapshots of one device, newest first."""
    return {"snapshots": await history(ctx.deps, a)}


async def history(deps: Deps, a: HistoryQuery) -> list[dict[str, Any]]:
    """Snapshots for a history query; 404 for an unknown device."""
    if await deps.store.get_device(a.sn) is None:
        raise ServiceError(404, f"unknown device {a.sn}")
    docs = await deps.store.history(a.sn, a.since, a.until, a.limit)
    return [snapshot_json(d) for d in docs]


async def subscribe(ctx: ServerContext, a: SubscribeArgs) -> dict[str, Any]:
    """Receive device_status / online / offline / command_update pushes for matching devices."""
    ctx.hub.subscribe(ctx.conn, a.sns, a.types)
    return {"subscribed": True, "sns": a.sns, "types": a.types}


async def unsubscribe(ctx: ServerContext, a: SubscribeArgs) -> dict[str, Any]:
    """Drop a subscription made with the same sns and types (both empty: all of them)."""
    removed = ctx.hub.unsubscribe(ctx.conn, a.sns, a.types)
    return {"removed": removed}


async def device_command(ctx: ServerContext, a: DeviceCommand) -> dict[str, Any]:
    """Issue a command through the durable outbox."""
    doc = await ctx.deps.commands.create(a.sn, a.command, a.args, a.ttl_s, a.idempotency_key, ctx.actor)
    return {"command_id": doc["command_id"], "state": doc["state"]}


def broadcast_target(a: Broadcast, role: str | None) -> Target:
    """The push target of a broadcast; username and role targets need admin."""
    t = a.target
    if t is None:
        return Target()
    if (t.username is not None or t.role is not None) and not role_allows(role, "admin"):
        raise ServiceError(403, "target.username and target.role need the admin role")
    if (t.type is not None or t.sns is not None) and (t.username is not None or t.role is not None):
        kind = None  # contradictory on purpose: the AND of a device filter and a user filter matches nothing
    elif t.type is not None or t.sns is not None:
        kind = "device"
    elif t.username is not None or t.role is not None:
        kind = "ops"
    else:
        kind = None
    return Target(
        kind=kind,
        types=(t.type,) if t.type is not None else None,
        sns=tuple(t.sns) if t.sns is not None else None,
        usernames=(t.username,) if t.username is not None else None,
        roles=(t.role,) if t.role is not None else None,
    )


async def run_broadcast(deps: Deps, actor: str, role: str | None, a: Broadcast) -> Delivery:
    """Publish a broadcast to every node and audit it."""
    target = broadcast_target(a, role)
    result = await deps.push.publish(target, a.service, a.message)
    await deps.audit.record(actor, "broadcast", a.service, "ok",
                            {"target": target.to_json(), "matched": result.matched, "queued": result.queued})
    return result


async def broadcast(ctx: ServerContext, a: Broadcast) -> dict[str, Any]:
    """Push a message to every matching connection."""
    result = await run_broadcast(ctx.deps, ctx.actor, ctx.conn.role, a)
    return {"matched": result.matched, "queued": result.queued}


RULES: list[Rule] = [
    rule("/admin/auth/login", ops_login, OpsLogin, "none"),
    rule("/admin/device/list", device_list, DeviceListQuery, "viewer"),
    rule("/admin/device/history", device_history, HistoryQuery, "viewer"),
    rule("/admin/device/subscribe", subscribe, SubscribeArgs, "viewer"),
    rule("/admin/device/unsubscribe", unsubscribe, SubscribeArgs, "viewer"),
    rule("/admin/device/command", device_command, DeviceCommand, "operator"),
    rule("/admin/push/broadcast", broadcast, Broadcast, "operator"),
]
