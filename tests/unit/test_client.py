"""core.client against httpx.MockTransport: the requests it sends and how it reads replies."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pandas as pd
import pytest

from core.client import (
    BroadcastResult,
    Command,
    FleetAPIError,
    FleetAuthError,
    FleetClient,
    FleetUnavailable,
    parse_metrics,
    push_totals,
)

BASE = "http://core.test:8765"
TOKEN = "tok-123"

DEVICE = {
    "sn": "DOG-0001",
    "type": "dance_dog",
    "name": "Rex",
    "online": True,
    "last_seen": "2026-12-01T10:00:05Z",
    "connected_at": "2026-12-01T09:00:00+00:00",
    "status": {"battery": 81.5, "location_code": 0, "electricity_code": 2, "ts": "2026-12-01T10:00:05Z"},
}
COMMAND = {
    "command_id": "c-1",
    "sn": "DOG-0001",
    "command": "dance",
    "args": {"style": "waltz"},
    "state": "pending",
    "created_at": "2026-12-01T10:00:00Z",
    "sent_at": None,
    "acked_at": None,
    "expires_at": "2026-12-01T10:05:00Z",
    "attempts": 0,
    "result": None,
    "issued_by": "admin",
}


class Recorder:
    """A MockTransport handler that records every request and answers from a route table."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response]) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.reply(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self) -> Any:
        return json.loads(self.last.content)


def make(
    reply: Callable[[httpx.Request], httpx.Response] | httpx.Response, token: str | None = TOKEN
) -> tuple[FleetClient, Recorder]:
    handler = reply if callable(reply) else (lambda _req: reply)
    rec = Recorder(handler)
    return FleetClient(BASE, token=token, transport=httpx.MockTransport(rec)), rec


def ok(payload: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=payload)


# ------------------------------------------------------------------------------------------- requests


def test_login_posts_credentials_without_bearer_and_keeps_the_token_for_later_calls() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/login":
            return ok({"token": "fresh", "username": "ops", "role": "viewer", "expires_at": "2026-12-02T00:00:00Z"})
        return ok({"devices": []})

    client, rec = make(reply, token=None)
    info = client.login("ops", "s3cret")

    login = rec.requests[0]
    assert (login.method, login.url.path) == ("POST", "/api/v1/auth/login")
    assert json.loads(login.content) == {"username": "ops", "password": "s3cret"}
    assert "authorization" not in login.headers
    assert info.role == "viewer"
    assert info.expires_at == datetime(2026, 12, 2, tzinfo=UTC)

    client.devices()
    assert rec.last.headers["authorization"] == "Bearer fresh"


def test_connect_logs_in_and_returns_a_ready_client() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/login":
            return ok({"token": "t2", "username": "admin", "role": "admin", "expires_at": None})
        return ok({"commands": []})

    rec = Recorder(reply)
    client = FleetClient.connect(BASE, "admin", "pw", transport=httpx.MockTransport(rec))
    assert client.login_info is not None and client.login_info.role == "admin"
    client.commands()
    assert rec.last.headers["authorization"] == "Bearer t2"


def test_devices_sends_filters_as_query_and_parses_devices() -> None:
    client, rec = make(ok({"devices": [DEVICE]}))
    devices = client.devices(type="dance_dog", online=False)

    assert rec.last.method == "GET"
    assert rec.last.url.path == "/api/v1/devices"
    assert dict(rec.last.url.params) == {"type": "dance_dog", "online": "false"}
    assert rec.last.headers["authorization"] == f"Bearer {TOKEN}"
    (device,) = devices
    assert device.sn == "DOG-0001" and device.online is True
    assert device.status.battery == 81.5 and device.status.electricity_code == 2
    assert device.last_seen == datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)


def test_devices_without_filters_sends_no_query() -> None:
    client, rec = make(ok({"devices": []}))
    assert client.devices() == []
    assert rec.last.url.query == b""


def test_path_segments_are_quoted() -> None:
    client, rec = make(ok(DEVICE))
    client.device("weird/sn ?#")
    assert rec.last.url.raw_path == b"/api/v1/devices/weird%2Fsn%20%3F%23"


def test_provision_and_rotate_secret() -> None:
    client, rec = make(ok({"sn": "R-1", "type": "retail", "secret": "abc"}, status=201))
    created = client.provision_device("R-1", "retail", name="Front desk")
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/devices")
    assert rec.body() == {"sn": "R-1", "type": "retail", "name": "Front desk"}
    assert created.secret == "abc"

    client.provision_device("R-2", "retail")
    assert rec.body() == {"sn": "R-2", "type": "retail"}

    client, rec = make(ok({"sn": "R-1", "secret": "new"}))
    assert client.rotate_secret("R-1").secret == "new"
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/devices/R-1/secret")


def test_history_sends_iso_times_and_limit_in_utc() -> None:
    client, rec = make(ok({"snapshots": [{"sn": "A", "ts": "2026-12-01T10:00:00Z", "battery": 50}]}))
    plus_two = timezone(timedelta(hours=2))
    snaps = client.history(
        "A", since=datetime(2026, 12, 1, 12, 0, tzinfo=plus_two), until=datetime(2026, 12, 1, 11), limit=10
    )
    params = rec.last.url.params
    assert rec.last.url.path == "/api/v1/devices/A/status"
    assert params["since"] == "2026-12-01T10:00:00+00:00"  # converted to UTC
    assert params["until"] == "2026-12-01T11:00:00+00:00"  # naive taken as UTC
    assert params["limit"] == "10"
    assert snaps[0].battery == 50


def test_send_command_body_leaves_out_unset_fields() -> None:
    client, rec = make(ok({"command_id": "c-9", "state": "pending"}, status=202))
    receipt = client.send_command("DOG-0001", "dance", args={"n": 2}, ttl_s=60, idempotency_key="k1")
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/devices/DOG-0001/commands")
    assert rec.body() == {"command": "dance", "args": {"n": 2}, "ttl_s": 60, "idempotency_key": "k1"}
    assert (receipt.command_id, receipt.state) == ("c-9", "pending")

    client.send_command("DOG-0001", "sit")
    assert rec.body() == {"command": "sit"}


def test_commands_cancel_and_get() -> None:
    canceled = {**COMMAND, "state": "canceled"}

    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/commands":
            return ok({"commands": [COMMAND]})
        if request.url.path.endswith("/cancel"):
            return ok(canceled)
        return ok(COMMAND)

    client, rec = make(reply)
    (listed,) = client.commands(sn="DOG-0001", state="pending")
    assert dict(rec.last.url.params) == {"sn": "DOG-0001", "state": "pending"}
    assert isinstance(listed, Command) and not listed.is_final
    assert listed.args == {"style": "waltz"}

    result = client.cancel_command("c-1")
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/commands/c-1/cancel")
    assert result.state == "canceled" and result.is_final

    assert client.command("c-1").expires_at == datetime(2026, 12, 1, 10, 5, tzinfo=UTC)
    assert (rec.last.method, rec.last.url.path) == ("GET", "/api/v1/commands/c-1")


def test_broadcast_body_and_result() -> None:
    client, rec = make(ok({"matched": 3, "queued": 2}))
    result = client.broadcast({"text": "hi"}, target={"type": "retail", "sns": [], "username": None})
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/broadcasts")
    # empty parts of a target are left out: an empty sn list must not mean "nobody"
    assert rec.body() == {"service": "broadcast", "message": {"text": "hi"}, "target": {"type": "retail"}}
    assert result == BroadcastResult(matched=3, queued=2)

    client.broadcast("plain text", service="notice")
    assert rec.body() == {"service": "notice", "message": "plain text"}


def test_connections_stats_audit() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/connections":
            conn = {"id": "k1", "kind": "device", "sn": "A", "remote": "127.0.0.1"}
            return ok({"connections": [{**conn, "connected_at": "2026-12-01T10:00:00Z", "queue_depth": 4}]})
        if path == "/api/v1/stats":
            return ok({"connections": 5, "devices_online": {"retail": 2}, "messages_in": 100})
        event = {"ts": "2026-12-01T10:00:00Z", "actor": "admin", "action": "command.create"}
        return ok({"events": [{**event, "target": "A", "outcome": "ok", "detail": {}}]})

    client, rec = make(reply)
    assert client.connections()[0].queue_depth == 4
    stats = client.stats()
    assert stats.as_dict() == {"connections": 5, "devices_online": {"retail": 2}, "messages_in": 100}
    events = client.audit(since=datetime(2026, 12, 1, tzinfo=UTC), actor="admin")
    assert dict(rec.last.url.params) == {"since": "2026-12-01T00:00:00+00:00", "actor": "admin"}
    assert events[0].action == "command.create"


def test_models_tolerate_fields_a_newer_server_adds() -> None:
    client, _ = make(ok({"devices": [{**DEVICE, "firmware": "9.9", "status": {"ts": None, "temp_c": 40}}]}))
    (device,) = client.devices()
    assert device.model_extra == {"firmware": "9.9"}
    assert device.status.model_extra == {"temp_c": 40}


# --------------------------------------------------------------------------------------------- frames


def test_devices_frame_has_a_column_per_status_field_and_utc_times() -> None:
    offline = {"sn": "R-1", "type": "retail", "online": False, "last_seen": None, "status": {}}
    client, _ = make(ok({"devices": [DEVICE, offline]}))
    frame = client.devices_frame()
    assert list(frame["sn"]) == ["DOG-0001", "R-1"]
    assert str(frame["last_seen"].dtype) == "datetime64[ns, UTC]"
    assert str(frame["status_ts"].dtype) == "datetime64[ns, UTC]"
    assert frame.loc[0, "battery"] == 81.5
    assert frame.loc[0, "electricity_code"] == 2
    assert pd.isna(frame.loc[1, "electricity_code"])  # missing stays missing, not 0
    assert pd.isna(frame.loc[1, "last_seen"])


def test_history_frame_is_oldest_first_with_ns_utc_ts() -> None:
    snaps = [
        {"sn": "A", "ts": "2026-12-01T10:00:02.500Z", "battery": 40.0},
        {"sn": "A", "ts": "2026-12-01T11:00:01+01:00", "battery": 41.0, "location_code": 3},
    ]
    client, _ = make(ok({"snapshots": snaps}))
    frame = client.history_frame("A")
    assert str(frame["ts"].dtype) == "datetime64[ns, UTC]"
    assert list(frame["ts"]) == [
        pd.Timestamp("2026-12-01T10:00:01Z"),
        pd.Timestamp("2026-12-01T10:00:02.500Z"),
    ]
    assert list(frame["battery"]) == [41.0, 40.0]
    for field in ("location_code", "inspection_code", "rubbish_code", "electricity_code", "battery"):
        assert field in frame.columns


def test_empty_frames_keep_their_columns_and_dtypes() -> None:
    client, _ = make(ok({"snapshots": [], "commands": [], "events": []}))
    history = client.history_frame("A")
    assert history.empty and str(history["ts"].dtype) == "datetime64[ns, UTC]"
    commands = client.commands_frame()
    assert {"command_id", "state", "created_at"} <= set(commands.columns)
    assert str(commands["created_at"].dtype) == "datetime64[ns, UTC]"
    assert str(client.audit_frame()["ts"].dtype) == "datetime64[ns, UTC]"


def test_commands_frame_newest_first() -> None:
    older = {**COMMAND, "command_id": "c-0", "created_at": "2026-12-01T09:00:00Z"}
    client, _ = make(ok({"commands": [older, COMMAND]}))
    frame = client.commands_frame()
    assert list(frame["command_id"]) == ["c-1", "c-0"]
    assert str(frame["expires_at"].dtype) == "datetime64[ns, UTC]"


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "msg"),
    [
        (401, "not authenticated"),
        (403, "role viewer may not do this"),
        (404, "unknown device"),
        (409, "final"),
    ],
)
def test_error_replies_raise_fleet_api_error_with_code_and_msg(status: int, msg: str) -> None:
    client, _ = make(httpx.Response(status, json={"code": status, "msg": msg}))
    with pytest.raises(FleetAPIError) as info:
        client.cancel_command("c-1")
    assert (info.value.status, info.value.code, info.value.msg) == (status, status, msg)
    assert isinstance(info.value, FleetAuthError) == (status == 401)


def test_error_without_json_body_still_has_a_message() -> None:
    client, _ = make(httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(FleetAPIError) as info:
        client.devices()
    assert info.value.status == 502 and "Bad Gateway" in info.value.msg


def test_a_reply_of_the_wrong_shape_is_an_api_error_not_a_validation_traceback() -> None:
    client, _ = make(ok({"devices": [{"sn": "A"}]}))  # no type
    with pytest.raises(FleetAPIError, match="unexpected"):
        client.devices()
    client, _ = make(httpx.Response(200, text="not json"))
    with pytest.raises(FleetAPIError, match="not JSON"):
        client.stats()


def test_readyz_is_false_on_503_and_healthz_true_on_200() -> None:
    client, rec = make(httpx.Response(503, json={"code": 503, "msg": "store unavailable"}))
    assert client.readyz() is False
    assert "authorization" not in rec.last.headers
    client, _ = make(httpx.Response(200, text="ok"))
    assert client.readyz() is True
    assert client.healthz() is True


def test_metrics_text_and_push_totals() -> None:
    text = "\n".join(
        [
            "# HELP push_success_total Pushes delivered",
            "# TYPE push_success_total counter",
            'push_success_total{service="device_status"} 7.0',
            'push_success_total{service="broadcast"} 3',
            'push_failure_total{service="broadcast",error_type="queue_full"} 2.0',
            'push_failure_total{service="broadcast",error_type="clo\\"sed"} 1.0 1700000000',
            'push_latency_seconds_bucket{service="broadcast",le="+Inf"} 10',
        ]
    )
    client, rec = make(httpx.Response(200, text=text))
    totals = client.push_totals()
    assert rec.last.url.path == "/metrics"
    assert (totals.success, totals.failure) == (10.0, 3.0)
    assert totals.success_by_service == {"device_status": 7.0, "broadcast": 3.0}
    assert totals.failure_by_error_type == {"queue_full": 2.0, 'clo"sed': 1.0}
    assert {s.labels.get("le") for s in parse_metrics(text) if s.name.endswith("_bucket")} == {"+Inf"}
    assert push_totals("") == push_totals("# nothing\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_connection_refused_raises_fleet_unavailable_with_a_clear_message() -> None:
    client = FleetClient(f"http://127.0.0.1:{_free_port()}", token=TOKEN, timeout=2)
    with pytest.raises(FleetUnavailable) as info:
        client.devices()
    assert info.value.status is None
    assert "cannot reach the core" in info.value.msg and "127.0.0.1" in info.value.msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no httpx chain shown
    with pytest.raises(FleetUnavailable):
        client.readyz()


def test_timeout_raises_fleet_unavailable() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client, _ = make(reply)
    with pytest.raises(FleetUnavailable, match=r"did not answer within 5 s"):
        client.devices()
