"""The internal HTTP API (PROTOCOL §6): one route table, bearer auth, JSON errors, OpenAPI from the models."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import tornado.web
from pydantic import BaseModel, Field, ValidationError

from . import __version__
from .audit import event_json
from .auth import Principal, new_secret, role_allows
from .clock import iso, utc
from .commands import command_json
from .context import Deps
from .errors import CLOSE_UNAUTHORIZED, ServiceError
from .monitor import device_json
from .registry import field_errors
from .services.models import (
    SN,
    Args,
    Broadcast,
    CommandCreate,
    DeviceCreate,
    DeviceListQuery,
    HistoryQuery,
    OpsLogin,
    UtcDatetime,
)
from .services.ops import history, run_broadcast

log = logging.getLogger("fleetpush.api")

Access = Literal["none", "viewer", "operator", "admin"]


class CommandQuery(Args):
    sn: str | None = Field(None, max_length=64)
    state: Literal["pending", "sent", "acked", "failed", "expired", "canceled"] | None = None
    limit: int = Field(500, ge=1, le=10000)


class AuditQuery(Args):
    since: UtcDatetime | None = None
    actor: str | None = Field(None, max_length=128)
    action: str | None = Field(None, max_length=64)
    limit: int = Field(1000, ge=1, le=10000)


class StatusQuery(Args):
    since: UtcDatetime | None = None
    until: UtcDatetime | None = None
    limit: int = Field(500, ge=1, le=10000)


class SnPath(BaseModel):
    sn: str = SN


@dataclass(slots=True)
class Call:
    """One HTTP request as a route function sees it."""

    deps: Deps
    who: Principal | None
    body: Any
    query: Any
    path: dict[str, str]
    remote: str

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail."""
        return self.who.username if self.who else "anonymous"


RouteFn = Callable[[Call], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the HTTP route table."""

    method: str
    path: str
    access: Access
    fn: RouteFn
    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200


# ------------------------------------------------------------------------------- route functions


async def login(c: Call) -> tuple[int, Any]:
    """Username and password login; the token is the bearer for every other route."""
    a: OpsLogin = c.body
    try:
        token, who = await c.deps.auth.login_ops(a.username, a.password)
    except ServiceError as exc:
        await c.deps.audit.record(a.username, "user.login", a.username, "failed", {"code": exc.code,
                                                                               "remote": c.remote})
        raise
    await c.deps.audit.record(who.username, "user.login", who.username, "ok", {"remote": c.remote, "via": "http"})
    return 200, {"token": token, "username": who.username, "role": who.role, "expires_at": iso(who.expires_at)}


async def list_devices(c: Call) -> tuple[int, Any]:
    """Every device with presence and latest status."""
    q: DeviceListQuery = c.query
    docs = await c.deps.store.list_devices(q.type, q.online)
    return 200, {"devices": [device_json(d) for d in docs]}


async def create_device(c: Call) -> tuple[int, Any]:
    """Provision a device; its secret is returned this once."""
    a: DeviceCreate = c.body
    if a.type not in c.deps.settings.devices.types:
        raise ServiceError(400, "invalid values", errors=[{"field": "type", "msg": f"unknown type {a.type!r}"}])
    secret = new_secret()
    created = await c.deps.store.create_device(a.sn, a.type, a.name or a.sn, secret, utc(c.deps.clock.time()))
    # Registered through the fleet secret earlier: provisioning now issues its own secret (and sets the
    # type and name given); a device that already has a secret is a conflict.
    if not created and not await c.deps.store.adopt_device(a.sn, a.type, a.name or a.sn, secret):
        raise ServiceError(409, f"device {a.sn} is already provisioned; rotate its secret instead")
    await c.deps.audit.record(c.actor, "device.provisioned", a.sn, "ok", {"type": a.type})
    return 201, {"sn": a.sn, "type": a.type, "secret": secret}


async def get_device(c: Call) -> tuple[int, Any]:
    """One device."""
    doc = await c.deps.store.get_device(c.path["sn"])
    if doc is None:
        raise ServiceError(404, f"unknown device {c.path['sn']}")
    return 200, device_json(doc)


async def device_status(c: Call) -> tuple[int, Any]:
    """Status history of one device, newest first."""
    q: StatusQuery = c.query
    hq = HistoryQuery(sn=c.path["sn"], since=q.since, until=q.until, limit=q.limit)
    return 200, {"snapshots": await history(c.deps, hq)}


async def rotate_secret(c: Call) -> tuple[int, Any]:
    """Issue a new device secret and close the device's connections with 4401."""
    sn = c.path["sn"]
    secret = new_secret()
    if not await c.deps.store.set_device_secret(sn, secret):
        raise ServiceError(404, f"unknown device {sn}")
    conn = c.deps.hub.device(sn)
    if conn is not None:
        conn.close(CLOSE_UNAUTHORIZED, "device secret rotated")
    # With several nodes the device may be held by another one: it closes its connection too.
    await c.deps.push.broker.send_control("close_device", {"sn": sn, "code": CLOSE_UNAUTHORIZED,
                                                           "reason": "device secret rotated"})
    await c.deps.audit.record(c.actor, "device.secret_rotated", sn, "ok", {})
    return 200, {"sn": sn, "secret": secret}


async def create_command(c: Call) -> tuple[int, Any]:
    """Issue a command through the durable outbox."""
    a: CommandCreate = c.body
    doc = await c.deps.commands.create(c.path["sn"], a.command, a.args, a.ttl_s, a.idempotency_key, c.actor)
    return 202, {"command_id": doc["command_id"], "state": doc["state"]}


async def cancel_command(c: Call) -> tuple[int, Any]:
    """Cancel a command that is not final."""
    doc = await c.deps.commands.cancel(c.path["command_id"], c.actor)
    return 200, command_json(doc)


async def list_commands(c: Call) -> tuple[int, Any]:
    """Commands, newest first."""
    q: CommandQuery = c.query
    docs = await c.deps.store.list_commands(q.sn, q.state, q.limit)
    return 200, {"commands": [command_json(d) for d in docs]}


async def get_command(c: Call) -> tuple[int, Any]:
    """One command."""
    doc = await c.deps.store.get_command(c.path["command_id"])
    if doc is None:
        raise ServiceError(404, f"unknown command {c.path['command_id']}")
    return 200, command_json(doc)


async def broadcast(c: Call) -> tuple[int, Any]:
    """Push a message to every matching connection."""
    who = c.who
    result = await run_broadcast(c.deps, c.actor, who.role if who else None, c.body)
    return 200, {"matched": result.matched, "queued": result.queued}


async def connections(c: Call) -> tuple[int, Any]:
    """Live connections of this node."""
    out = []
    for conn in c.deps.hub:
        entry: dict[str, Any] = {
            "id": conn.id,
            "kind": conn.kind,
            "remote": conn.remote,
            "connected_at": iso(conn.connected_at),
            "queue_depth": conn.queue_depth,
        }
        if conn.sn:
            entry["sn"] = conn.sn
            entry["type"] = conn.device_type
        if conn.username:
            entry["username"] = conn.username
            entry["role"] = conn.role
        out.append(entry)
    return 200, {"connections": out}


async def stats(c: Call) -> tuple[int, Any]:
    """Counts of connections, devices online by type, messages and pushes."""
    d = c.deps
    m = d.metrics

    def total(counter: Any) -> float:
        return float(sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")))

    devices = await d.store.list_devices()
    by_type: dict[str, dict[str, int]] = {}
    for doc in devices:
        entry = by_type.setdefault(doc.get("type") or "unknown", {"online": 0, "offline": 0})
        entry["online" if doc.get("online") else "offline"] += 1
    return 200, {
        "node": d.node_id,
        "connections": d.hub.counts(),
        "devices": {"total": len(devices), "online": sum(v["online"] for v in by_type.values()), "by_type": by_type},
        "messages_in": m.frames_in,
        "pushes_ok": int(total(m.push_success)),
        "pushes_failed": int(total(m.push_failure)),
        "status_reports": int(total(m.status_reports)),
        "commands": await d.store.count_commands(),
    }


async def audit(c: Call) -> tuple[int, Any]:
    """Audit events, newest first."""
    q: AuditQuery = c.query
    docs = await c.deps.store.list_audit(q.since, q.actor, q.action, q.limit)
    return 200, {"events": [event_json(d) for d in docs]}


ROUTES: list[Route] = [
    Route("POST", "/api/v1/auth/login", "none", login, "Log in; returns a bearer token", body=OpsLogin),
    Route("GET", "/api/v1/devices", "viewer", list_devices, "List devices", query=DeviceListQuery),
    Route("POST", "/api/v1/devices", "admin", create_device, "Provision a device", body=DeviceCreate, status=201),
    Route("GET", "/api/v1/devices/{sn}", "viewer", get_device, "One device"),
    Route("GET", "/api/v1/devices/{sn}/status", "viewer", device_status, "Status history", query=StatusQuery),
    Route("POST", "/api/v1/devices/{sn}/secret", "admin", rotate_secret, "Rotate a device secret"),
    Route("POST", "/api/v1/devices/{sn}/commands", "operator", create_command, "Issue a command",
          body=CommandCreate, status=202),
    Route("POST", "/api/v1/commands/{command_id}/cancel", "operator", cancel_command, "Cancel a command"),
    Route("GET", "/api/v1/commands", "viewer", list_commands, "List commands", query=CommandQuery),
    Route("GET", "/api/v1/commands/{command_id}", "viewer", get_command, "One command"),
    Route("POST", "/api/v1/broadcasts", "operator", broadcast, "Broadcast a push", body=Broadcast),
    Route("GET", "/api/v1/connections", "admin", connections, "Live connections"),
    Route("GET", "/api/v1/stats", "viewer", stats, "Counts"),
    Route("GET", "/api/v1/audit", "admin", audit, "Audit trail", query=AuditQuery),
]


# ------------------------------------------------------------------------------- Tornado plumbing


def _pattern(path: str) -> str:
    return "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"


class JsonHandler(tornado.web.RequestHandler):
    """Shared behaviour: JSON errors `{"code","msg"}`, no server banner, no caching."""

    deps: Deps

    def initialize(self, deps: Deps, routes: dict[str, Route] | None = None) -> None:
        """Tornado hands each handler the app's parts."""
        self.deps = deps
        self.routes = routes or {}

    def set_default_headers(self) -> None:
        """JSON and no caching on every answer."""
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.clear_header("Server")

    def send_json(self, status: int, obj: Any) -> None:
        """Finish with a JSON body."""
        self.set_status(status)
        self.finish(json.dumps(obj, default=str, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, 500 ...) in the contract's shape."""
        self.finish(json.dumps({"code": status_code, "msg": self._reason}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Unexpected errors are logged with the route, never with bodies or headers."""
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("HTTP handler error on %s %s", self.request.method, self.request.path, exc_info=(typ, value, tb))


# Bodies over api.max_body_bytes are still read (and dropped), up to the larger of 64 x the limit and
# 64 MiB, so the client gets the 413 reply: refusing to read resets the connection under it (bare 400).
_DRAIN_FACTOR = 64
_DRAIN_FLOOR = 64 * 1024 * 1024


@tornado.web.stream_request_body
class ApiHandler(JsonHandler):
    """Dispatches every /api/v1 route of the table."""

    def prepare(self) -> None:
        """Before the body arrives: take over the body size limit from the HTTP server."""
        limit = self.deps.settings.api.max_body_bytes
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        conn: Any = self.request.connection
        if conn is not None and hasattr(conn, "set_max_body_size"):
            conn.set_max_body_size(max(limit * _DRAIN_FACTOR, _DRAIN_FLOOR))

    def data_received(self, chunk: bytes) -> None:
        """Keep the body while it is within the limit; past it, only count."""
        self._size += len(chunk)
        if self._size <= self._limit:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    async def _run(self, method: str, **path: str) -> None:
        route = self.routes.get(method)
        if route is None:
            self.send_json(405, {"code": 405, "msg": f"{method} is not allowed here"})
            return
        d = self.deps
        status = 500
        try:
            if self._size > d.settings.api.max_body_bytes:
                raise ServiceError(413, f"body larger than {d.settings.api.max_body_bytes} bytes")
            who = await self._authenticate(route)
            body = self._parse_body(route)
            query = self._parse_query(route)
            for key, value in path.items():
                if key == "sn":
                    try:
                        SnPath(sn=value)
                    except ValidationError:
                        raise ServiceError(404, f"unknown device {value}") from None
            call = Call(d, who, body, query, path, str(self.request.remote_ip))
            async with asyncio.timeout(d.settings.limits.handler_timeout_s):
                status, result = await route.fn(call)
            self.send_json(status, result)
        except TimeoutError:
            status = 504
            self.send_json(504, {"code": 504, "msg": "the request did not finish in time"})
        except ServiceError as exc:
            status = exc.code
            err: dict[str, Any] = {"code": exc.code, "msg": exc.msg}
            if exc.errors:
                err["errors"] = exc.errors
            if exc.values:
                err.update({k: v for k, v in exc.values.items() if k not in err})
            self.send_json(exc.code if 400 <= exc.code < 600 else 400, err)
        except Exception:
            log.exception("HTTP %s %s failed", method, route.path)
            self.send_json(500, {"code": 500, "msg": "internal error; it was logged"})
        finally:
            d.metrics.http_requests.labels(method, route.path, str(status)).inc()

    async def _authenticate(self, route: Route) -> Principal | None:
        if route.access == "none":
            return None
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "missing bearer token")
        who = await self.deps.auth.resolve_token(token.strip())
        if who is None:
            raise ServiceError(401, "invalid or expired token")
        if not role_allows(who.role, route.access):
            raise ServiceError(403, f"role {who.role} may not do this ({route.access} required)")
        return who

    def _parse_body(self, route: Route) -> Any:
        if route.body is None:
            return None
        raw = b"".join(self._chunks) or b"{}"
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise ServiceError(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ServiceError(400, "body must be a JSON object")
        try:
            return route.body.model_validate(data)
        except ValidationError as exc:
            raise ServiceError(400, "invalid body", errors=field_errors(exc)) from None

    def _parse_query(self, route: Route) -> Any:
        if route.query is None:
            return None
        raw = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        data = {k: v for k, v in raw.items() if v != ""}
        try:
            return route.query.model_validate(data)
        except ValidationError as exc:
            raise ServiceError(400, "invalid query", errors=field_errors(exc)) from None

    async def get(self, **path: str) -> None:
        """GET routes."""
        await self._run("GET", **path)

    async def post(self, **path: str) -> None:
        """POST routes."""
        await self._run("POST", **path)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class HealthHandler(JsonHandler):
    """/healthz: 200 while the process serves."""

    async def get(self) -> None:
        """Liveness."""
        self.send_json(200, {"status": "ok", "node": self.deps.node_id})


class ReadyHandler(JsonHandler):
    """/readyz: 200 when the store answers (and start-up's store work is done), else 503 — within 3 s."""

    async def get(self) -> None:
        """Readiness."""
        d = self.deps
        try:
            async with asyncio.timeout(min(2.5, d.settings.store.server_selection_timeout_s + 0.3)):
                ok = await d.store.ping()
        except TimeoutError:
            ok = False
        store = "ok" if ok else "unavailable"
        if ok and not d.initialised.is_set():
            ok, store = False, "initialising"
        broker = "degraded" if d.push.broker.degraded else "ok"
        self.send_json(200 if ok else 503, {"store": store, "broker": broker,
                                            "status": "ready" if ok else "not ready"})


class MetricsHandler(tornado.web.RequestHandler):
    """/metrics in the Prometheus text format."""

    def initialize(self, deps: Deps) -> None:
        """Tornado hands each handler the app's parts."""
        self.deps = deps

    def get(self) -> None:
        """The exposition."""
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.deps.metrics.render())


class OpenApiHandler(JsonHandler):
    """/api/v1/openapi.json, generated from the route table and its pydantic models."""

    async def get(self) -> None:
        """The document."""
        self.send_json(200, openapi_document())


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API, built from ROUTES."""
    schemas: dict[str, Any] = {}
    error = {"$ref": "#/components/schemas/Error"}
    schemas["Error"] = {
        "type": "object",
        "required": ["code", "msg"],
        "properties": {"code": {"type": "integer"}, "msg": {"type": "string"},
                       "errors": {"type": "array", "items": {"type": "object"}}},
    }
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.fn.__name__, "responses": {}}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", r.path)
        ]
        if r.query is not None:
            qs = r.query.model_json_schema()
            for name, prop in qs.get("properties", {}).items():
                prop = {k: v for k, v in prop.items() if k not in ("default", "title")}
                if "anyOf" in prop:
                    non_null = [p for p in prop["anyOf"] if p.get("type") != "null"]
                    prop = non_null[0] if len(non_null) == 1 else {"anyOf": non_null}
                params.append({"name": name, "in": "query", "required": False, "schema": prop})
        if params:
            op["parameters"] = params
        if r.body is not None:
            schema = r.body.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas[name] = sub
            schemas[r.body.__name__] = schema
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}},
            }
        op["responses"][str(r.status)] = {"description": "success", "content": {"application/json": {
            "schema": {"type": "object"}}}}
        for code, why in ((400, "invalid input"), (404, "not found"), (409, "conflict"), (413, "body too large"),
                          (503, "storage unavailable")):
            op["responses"][str(code)] = {"description": why, "content": {"application/json": {"schema": error}}}
        if r.access != "none":
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": "missing or invalid token",
                                      "content": {"application/json": {"schema": error}}}
            op["responses"]["403"] = {"description": f"needs role {r.access}",
                                      "content": {"application/json": {"schema": error}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleetpush internal API", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def api_routes(deps: Deps) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
    """Tornado URL specs for the whole HTTP API."""
    grouped: dict[str, dict[str, Route]] = {}
    for r in ROUTES:
        grouped.setdefault(r.path, {})[r.method] = r
    specs: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
        (r"/healthz", HealthHandler, {"deps": deps}),
        (r"/readyz", ReadyHandler, {"deps": deps}),
        (r"/metrics", MetricsHandler, {"deps": deps}),
        (r"/api/v1/openapi.json", OpenApiHandler, {"deps": deps}),
    ]
    for path, by_method in grouped.items():
        specs.append((_pattern(path), ApiHandler, {"deps": deps, "routes": by_method}))
    return specs
