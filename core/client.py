"""Typed Python client for the fleetpush internal HTTP API (PROTOCOL.md section 6).

Used by the dashboard and the notebooks. It imports nothing else of fleetpush and nothing of
Tornado, so it can be used from any process that can reach the core over HTTP.

Every failure is raised as a :class:`FleetAPIError` carrying the API's ``{"code", "msg"}``; a core
that cannot be reached (refused, timed out, reset) raises :class:`FleetUnavailable`, never a raw
``httpx`` exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import httpx
import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "FINAL_COMMAND_STATES",
    "STATUS_CODE_FIELDS",
    "STATUS_FIELDS",
    "AuditEvent",
    "BroadcastResult",
    "Command",
    "CommandReceipt",
    "Connection",
    "Device",
    "DeviceSecret",
    "DeviceStatus",
    "FleetAPIError",
    "FleetAuthError",
    "FleetClient",
    "FleetUnavailable",
    "LoginInfo",
    "MetricSample",
    "PushTotals",
    "Snapshot",
    "Stats",
    "parse_metrics",
    "push_totals",
]

#: The integer status codes a device reports (0 means ok).
STATUS_CODE_FIELDS: tuple[str, ...] = ("location_code", "inspection_code", "rubbish_code", "electricity_code")
#: Every status field of PROTOCOL §3 ``/api/device/status``, in display order.
STATUS_FIELDS: tuple[str, ...] = (
    *STATUS_CODE_FIELDS,
    "location_msg",
    "inspection_msg",
    "rubbish_msg",
    "electricity_msg",
    "battery",
    "extra",
)
#: Command states after which nothing changes any more (PROTOCOL §5).
FINAL_COMMAND_STATES: frozenset[str] = frozenset({"acked", "failed", "expired", "canceled"})

_DATETIME_NS_UTC = "datetime64[ns, UTC]"


# --------------------------------------------------------------------------------------------- errors


class FleetAPIError(Exception):
    """An error reply of the API: HTTP ``status`` plus the body's ``code`` and ``msg``."""

    def __init__(self, status: int | None, code: int | None, msg: str) -> None:
        self.status = status
        self.code = code
        self.msg = msg
        super().__init__(f"{status} {msg}" if status is not None else msg)


class FleetAuthError(FleetAPIError):
    """HTTP 401: not logged in, login failed, or the token expired or was revoked."""


class FleetUnavailable(FleetAPIError):
    """The core could not be reached: refused, timed out or the connection broke (no HTTP status)."""

    def __init__(self, msg: str) -> None:
        super().__init__(None, None, msg)


# --------------------------------------------------------------------------------------------- models


def _as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]


class _Model(BaseModel):
    """Base of every reply model: a newer server may add fields, old clients keep working."""

    model_config = ConfigDict(extra="allow")


class LoginInfo(_Model):
    """The reply of a login: the bearer token and who it belongs to."""

    token: str
    username: str
    role: str
    expires_at: UTCDateTime | None = None


class _StatusFields(_Model):
    """The optional status fields a device reports."""

    location_code: int | None = None
    inspection_code: int | None = None
    rubbish_code: int | None = None
    electricity_code: int | None = None
    location_msg: str | None = None
    inspection_msg: str | None = None
    rubbish_msg: str | None = None
    electricity_msg: str | None = None
    battery: float | None = None
    extra: dict[str, Any] | None = None


class DeviceStatus(_StatusFields):
    """A device's latest status, as embedded in a device; ``ts`` is when it was received."""

    ts: UTCDateTime | None = None


class Snapshot(_StatusFields):
    """One stored status report of a device."""

    sn: str
    ts: UTCDateTime
    type: str | None = None


class Device(_Model):
    """A robot: identity, presence and latest status."""

    sn: str
    type: str
    name: str | None = None
    online: bool = False
    last_seen: UTCDateTime | None = None
    connected_at: UTCDateTime | None = None
    status: DeviceStatus = Field(default_factory=DeviceStatus)


class DeviceSecret(_Model):
    """A device secret, shown once: on provisioning (with ``type``) and on rotation."""

    sn: str
    secret: str
    type: str | None = None


class CommandReceipt(_Model):
    """The reply to a command create: its id and state."""

    command_id: str
    state: str


class Command(_Model):
    """A stored command and its delivery state (PROTOCOL §5)."""

    command_id: str
    sn: str
    device_type: str | None = None
    command: str
    args: dict[str, Any] = Field(default_factory=dict)
    state: str
    created_at: UTCDateTime | None = None
    sent_at: UTCDateTime | None = None
    acked_at: UTCDateTime | None = None
    expires_at: UTCDateTime | None = None
    attempts: int = 0
    result: Any = None
    issued_by: str | None = None

    @property
    def is_final(self) -> bool:
        """True when the state can no longer change (acked, failed, expired, canceled)."""
        return self.state in FINAL_COMMAND_STATES


class BroadcastResult(_Model):
    """How many connections a broadcast matched and how many frames were queued, across nodes."""

    matched: int
    queued: int


class Connection(_Model):
    """One live WebSocket connection on the core."""

    id: str
    kind: str
    sn: str | None = None
    username: str | None = None
    remote: str | None = None
    connected_at: UTCDateTime | None = None
    queue_depth: int = 0


class Stats(_Model):
    """Counters of the core; the shape is the server's, every field is kept as extra data."""

    def as_dict(self) -> dict[str, Any]:
        """Return every counter the server sent, as a plain dict."""
        return self.model_dump()


class AuditEvent(_Model):
    """One audit record: who did what to which target, and how it went."""

    ts: UTCDateTime
    actor: str | None = None
    action: str
    target: Any = None
    outcome: str | None = None
    detail: Any = None


class MetricSample(_Model):
    """One sample line of the Prometheus text format."""

    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    value: float


class PushTotals(_Model):
    """Push success and failure counts from ``/metrics``, in total and per label set."""

    success: float = 0.0
    failure: float = 0.0
    success_by_service: dict[str, float] = Field(default_factory=dict)
    failure_by_service: dict[str, float] = Field(default_factory=dict)
    failure_by_error_type: dict[str, float] = Field(default_factory=dict)


# -------------------------------------------------------------------------------------------- metrics

_SAMPLE_RE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(value: str) -> str:
    """Undo the label-value escapes of the Prometheus text format."""
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], value)


def parse_metrics(text: str) -> list[MetricSample]:
    """Parse Prometheus text exposition format into samples; comments and bad lines are skipped."""
    samples: list[MetricSample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        labels = {key: _unescape(val) for key, val in _LABEL_RE.findall(match.group("labels") or "")}
        samples.append(MetricSample(name=match.group("name"), labels=labels, value=value))
    return samples


def push_totals(text: str) -> PushTotals:
    """Sum ``push_success_total`` and ``push_failure_total`` from a ``/metrics`` text."""
    totals = PushTotals()
    for sample in parse_metrics(text):
        service = sample.labels.get("service", "")
        if sample.name == "push_success_total":
            totals.success += sample.value
            totals.success_by_service[service] = totals.success_by_service.get(service, 0.0) + sample.value
        elif sample.name == "push_failure_total":
            totals.failure += sample.value
            totals.failure_by_service[service] = totals.failure_by_service.get(service, 0.0) + sample.value
            error_type = sample.labels.get("error_type", "")
            totals.failure_by_error_type[error_type] = totals.failure_by_error_type.get(error_type, 0.0) + sample.value
    return totals


# --------------------------------------------------------------------------------------------- helpers

_M = TypeVar("_M", bound=BaseModel)
TimeArg = datetime | str | None


def _iso(value: TimeArg) -> str | None:
    """Render a time argument as ISO 8601 (naive datetimes are taken as UTC); strings pass through."""
    if value is None or isinstance(value, str):
        return value
    return _as_utc(value).isoformat()


def _params(**values: Any) -> dict[str, str | int]:
    """Build query parameters, leaving out ``None`` and spelling booleans as JSON does."""
    out: dict[str, str | int] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, datetime):
            out[key] = _as_utc(value).isoformat()
        elif isinstance(value, int):
            out[key] = value
        else:
            out[key] = str(value)
    return out


def _seg(value: str) -> str:
    """Quote one path segment (an sn or command id may hold any character)."""
    return quote(value, safe="")


def _to_utc_ns(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Convert the given columns in place to ``datetime64[ns, UTC]``."""
    for column in columns:
        frame[column] = pd.to_datetime(frame[column], utc=True, format="mixed").astype(_DATETIME_NS_UTC)
    return frame


_INT_COLUMNS = frozenset({*STATUS_CODE_FIELDS, "attempts", "queue_depth"})
_FLOAT_COLUMNS = frozenset({"battery"})


def _frame(rows: list[dict[str, Any]], columns: list[str], time_columns: list[str]) -> pd.DataFrame:
    """Build a frame with at least ``columns`` (in that order, extras after) and typed columns.

    Times become ``datetime64[ns, UTC]``, status codes and counters nullable ``Int64`` (a missing
    code stays missing instead of turning the column into floats), battery ``float64``.
    """
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame.columns:
            frame[column] = None
    extras = [c for c in frame.columns if c not in columns]
    frame = frame[[*columns, *extras]].copy()
    for column in columns:
        if column in _INT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        elif column in _FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column]).astype("float64")
    return _to_utc_ns(frame, time_columns)


# ---------------------------------------------------------------------------------------------- client


class FleetClient:
    """A synchronous client of one core's HTTP API; every method is one request."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.login_info: LoginInfo | None = None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    @classmethod
    def connect(
        cls,
        base_url: str,
        username: str,
        password: str,
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> FleetClient:
        """Create a client and log in with a username and password."""
        client = cls(base_url, timeout=timeout, transport=transport)
        try:
            client.login(username, password)
        except BaseException:
            client.close()
            raise
        return client

    # ----------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> FleetClient:
        """Use the client as a context manager that closes it on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        self.close()

    def __repr__(self) -> str:
        """Show the base URL and whether a token is set, never the token itself."""
        return f"FleetClient({self.base_url!r}, token={'set' if self.token else 'none'})"

    # ------------------------------------------------------------------------------- transport

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        auth: bool = True,
    ) -> httpx.Response:
        """Send one request and return the response, turning transport failures into FleetUnavailable."""
        headers: dict[str, str] = {"Accept": "application/json"}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            return self._http.request(method, path, params=params, json=json, headers=headers)
        except httpx.TimeoutException:
            raise FleetUnavailable(f"the core at {self.base_url} did not answer within {self.timeout:g} s") from None
        except httpx.ConnectError as exc:
            raise FleetUnavailable(f"cannot reach the core at {self.base_url} ({_reason(exc)})") from None
        except httpx.TransportError as exc:
            raise FleetUnavailable(f"the connection to the core at {self.base_url} failed ({_reason(exc)})") from None

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        auth: bool = True,
    ) -> Any:
        """Send one request and return its decoded JSON body, raising FleetAPIError on an error reply."""
        response = self._send(method, path, params=params, json=json, auth=auth)
        if response.is_error:
            raise _error_from(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise FleetAPIError(
                response.status_code, None, f"the core sent a reply that is not JSON ({method} {path})"
            ) from None

    @staticmethod
    def _parse(model: type[_M], data: Any, what: str) -> _M:
        """Validate ``data`` as ``model``; a mismatch becomes a FleetAPIError naming ``what``."""
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise FleetAPIError(None, None, f"unexpected {what} from the core: {_short(exc)}") from None

    def _parse_list(self, model: type[_M], data: Any, key: str) -> list[_M]:
        """Validate ``data[key]`` as a list of ``model``."""
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise FleetAPIError(None, None, f"unexpected reply from the core: no {key!r} list")
        return [self._parse(model, item, key) for item in items]

    # ----------------------------------------------------------------------------------- auth

    def login(self, username: str, password: str) -> LoginInfo:
        """Log in as an ops user; the token is kept and sent with every later request."""
        data = self._request(
            "POST", "/api/v1/auth/login", json={"username": username, "password": password}, auth=False
        )
        info = self._parse(LoginInfo, data, "login reply")
        self.token = info.token
        self.login_info = info
        return info

    # -------------------------------------------------------------------------------- devices

    def devices(self, type: str | None = None, online: bool | None = None) -> list[Device]:
        """List devices, optionally only one type and/or only online or offline ones."""
        data = self._request("GET", "/api/v1/devices", params=_params(type=type, online=online))
        return self._parse_list(Device, data, "devices")

    def device(self, sn: str) -> Device:
        """Get one device with its latest status (404 when unknown)."""
        return self._parse(Device, self._request("GET", f"/api/v1/devices/{_seg(sn)}"), "device")

    def provision_device(self, sn: str, type: str, name: str | None = None) -> DeviceSecret:
        """Register a device (admin); the reply holds its secret, shown only this once."""
        body: dict[str, Any] = {"sn": sn, "type": type}
        if name is not None:
            body["name"] = name
        return self._parse(DeviceSecret, self._request("POST", "/api/v1/devices", json=body), "device secret")

    def rotate_secret(self, sn: str) -> DeviceSecret:
        """Issue a new secret for a device (admin); its open connections are closed."""
        data = self._request("POST", f"/api/v1/devices/{_seg(sn)}/secret")
        return self._parse(DeviceSecret, data, "device secret")

    def history(self, sn: str, since: TimeArg = None, until: TimeArg = None, limit: int = 500) -> list[Snapshot]:
        """Stored status snapshots of a device, newest first, at most ``limit`` (1..10000)."""
        params = _params(since=_iso(since), until=_iso(until), limit=limit)
        data = self._request("GET", f"/api/v1/devices/{_seg(sn)}/status", params=params)
        return self._parse_list(Snapshot, data, "snapshots")

    # ------------------------------------------------------------------------------- commands

    def send_command(
        self,
        sn: str,
        command: str,
        args: Mapping[str, Any] | None = None,
        ttl_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandReceipt:
        """Store a command for a device (operator); it is delivered at least once until acked or expired."""
        body: dict[str, Any] = {"command": command}
        if args is not None:
            body["args"] = dict(args)
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        data = self._request("POST", f"/api/v1/devices/{_seg(sn)}/commands", json=body)
        return self._parse(CommandReceipt, data, "command receipt")

    def cancel_command(self, command_id: str) -> Command:
        """Cancel a command that is not final (operator); 409 when it already is."""
        data = self._request("POST", f"/api/v1/commands/{_seg(command_id)}/cancel")
        return self._parse(Command, data, "command")

    def commands(self, sn: str | None = None, state: str | None = None, limit: int | None = None) -> list[Command]:
        """List commands, optionally of one device and/or in one state."""
        data = self._request("GET", "/api/v1/commands", params=_params(sn=sn, state=state, limit=limit))
        return self._parse_list(Command, data, "commands")

    def command(self, command_id: str) -> Command:
        """Get one command (404 when unknown)."""
        return self._parse(Command, self._request("GET", f"/api/v1/commands/{_seg(command_id)}"), "command")

    # ------------------------------------------------------------------------------ broadcast

    def broadcast(
        self, message: Any, service: str = "broadcast", target: Mapping[str, Any] | None = None
    ) -> BroadcastResult:
        """Push ``message`` to every matching connection (operator; username/role targets need admin)."""
        body: dict[str, Any] = {"service": service, "message": message}
        if target:
            body["target"] = {key: value for key, value in target.items() if value not in (None, "", [])}
        data = self._request("POST", "/api/v1/broadcasts", json=body)
        return self._parse(BroadcastResult, data, "broadcast result")

    # ------------------------------------------------------------------------------ operations

    def connections(self) -> list[Connection]:
        """Live WebSocket connections with their outbound queue depths (admin)."""
        return self._parse_list(Connection, self._request("GET", "/api/v1/connections"), "connections")

    def stats(self) -> Stats:
        """Counts of connections, devices online by type, messages and pushes."""
        return self._parse(Stats, self._request("GET", "/api/v1/stats"), "stats")

    def audit(
        self, since: TimeArg = None, actor: str | None = None, action: str | None = None, limit: int | None = None
    ) -> list[AuditEvent]:
        """Audit events (admin), optionally since a time, of one actor and/or of one action."""
        params = _params(since=_iso(since), actor=actor, action=action, limit=limit)
        return self._parse_list(AuditEvent, self._request("GET", "/api/v1/audit", params=params), "events")

    def healthz(self) -> bool:
        """True while the core process serves; raises FleetUnavailable when it cannot be reached."""
        return self._send("GET", "/healthz", auth=False).status_code == 200

    def readyz(self) -> bool:
        """True when the core's store answers, False on 503; raises FleetUnavailable when unreachable."""
        return self._send("GET", "/readyz", auth=False).status_code == 200

    def metrics_text(self) -> str:
        """The raw Prometheus text of ``/metrics``."""
        response = self._send("GET", "/metrics", auth=False)
        if response.is_error:
            raise _error_from(response)
        return response.text

    def push_totals(self) -> PushTotals:
        """Push success and failure counts parsed from ``/metrics``."""
        return push_totals(self.metrics_text())

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of the API."""
        data = self._request("GET", "/api/v1/openapi.json", auth=False)
        if not isinstance(data, dict):
            raise FleetAPIError(None, None, "unexpected OpenAPI document from the core: not an object")
        return data

    # ---------------------------------------------------------------------------------- frames

    def devices_frame(self, type: str | None = None, online: bool | None = None) -> pd.DataFrame:
        """Devices as a frame: identity, presence, and a column per latest status field (``status_ts``)."""
        rows: list[dict[str, Any]] = []
        for device in self.devices(type=type, online=online):
            row = device.model_dump(exclude={"status"})
            status = device.status.model_dump()
            row["status_ts"] = status.pop("ts", None)
            row.update(status)
            rows.append(row)
        columns = ["sn", "type", "name", "online", "last_seen", "connected_at", *STATUS_FIELDS, "status_ts"]
        return _frame(rows, columns, ["last_seen", "connected_at", "status_ts"])

    def history_frame(self, sn: str, since: TimeArg = None, until: TimeArg = None, limit: int = 500) -> pd.DataFrame:
        """A device's status history as a frame, oldest first: ``ts`` (UTC) and a column per field."""
        rows = [snapshot.model_dump() for snapshot in self.history(sn, since=since, until=until, limit=limit)]
        frame = _frame(rows, ["ts", "sn", *STATUS_FIELDS], ["ts"])
        return frame.sort_values("ts", kind="stable").reset_index(drop=True)

    def commands_frame(self, sn: str | None = None, state: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """Commands as a frame, newest first, with UTC time columns (the API's default page is 500)."""
        rows = [command.model_dump() for command in self.commands(sn=sn, state=state, limit=limit)]
        times = ["created_at", "sent_at", "acked_at", "expires_at"]
        columns = ["command_id", "sn", "device_type", "command", "args", "state", *times, "attempts", "result",
                   "issued_by"]
        frame = _frame(rows, columns, times)
        return frame.sort_values("created_at", ascending=False, kind="stable").reset_index(drop=True)

    def audit_frame(
        self, since: TimeArg = None, actor: str | None = None, action: str | None = None, limit: int | None = None
    ) -> pd.DataFrame:
        """Audit events as a frame with ``ts`` in UTC (the API's default page is 1000)."""
        rows = [event.model_dump() for event in self.audit(since=since, actor=actor, action=action, limit=limit)]
        return _frame(rows, ["ts", "actor", "action", "target", "outcome", "detail"], ["ts"])

    def connections_frame(self) -> pd.DataFrame:
        """Live connections as a frame (admin)."""
        rows = [connection.model_dump() for connection in self.connections()]
        columns = ["id", "kind", "sn", "username", "remote", "connected_at", "queue_depth"]
        return _frame(rows, columns, ["connected_at"])


def _reason(exc: Exception) -> str:
    """A short human reason for a transport failure."""
    text = str(exc).strip()
    if "refused" in text.lower() or "errno 111" in text.lower():
        return "connection refused: is the core running?"
    return text or type(exc).__name__


def _short(exc: ValidationError) -> str:
    """The first validation problem in one line."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return f"{where}: {first.get('msg', 'invalid')}"


def _error_from(response: httpx.Response) -> FleetAPIError:
    """Turn an error reply into a FleetAPIError, using the body's code and msg when it has them."""
    status = response.status_code
    code: int | None = None
    msg = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw_code = body.get("code")
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        raw_msg = body.get("msg")
        msg = raw_msg if isinstance(raw_msg, str) else ""
    if not msg:
        text = response.text.strip()
        msg = text[:200] if text and body is None else (response.reason_phrase or f"HTTP {status}")
    error_type = FleetAuthError if status == 401 else FleetAPIError
    return error_type(status, code if code is not None else status, msg)
