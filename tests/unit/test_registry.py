"""ServerRules dispatch without sockets: access, validation, timeouts, crashes, rate limits."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from conftest import make_settings
from pydantic import BaseModel, Field

from core import eager
from core.app import Overrides, make_app
from core.clock import ManualClock, utc
from core.connection import Connection, RateLimiter
from core.context import ServerContext
from core.errors import CLOSE_RATE_LIMIT, Disconnect
from core.protocol import Request
from core.registry import ServerRules, rule
from core.services import SERVICE_TABLE


class Echo(BaseModel):
    model_config = {"extra": "forbid"}
    n: int = Field(ge=0, le=10)
    tag: str = "x"


async def echo(ctx: ServerContext, a: Echo) -> dict[str, Any]:
    return {"n": a.n, "tag": a.tag}


async def hang(ctx: ServerContext, a: Echo) -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def boom(ctx: ServerContext, a: Echo) -> dict[str, Any]:
    raise RuntimeError("kaboom")


async def waits(ctx: ServerContext, a: Echo) -> dict[str, Any]:
    # Suspends several times (real I/O does), then answers: the reply must be the handler's.
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, a.n * 2)
    doubled = await fut
    await asyncio.sleep(0)
    return {"n": doubled, "tag": a.tag}


async def waits_then_boom(ctx: ServerContext, a: Echo) -> dict[str, Any]:
    await asyncio.sleep(0)
    raise RuntimeError("late kaboom")


class NullSink:
    def write_frames(self, data: bytes) -> None:
        return None

    def close(self, code: int, reason: str) -> None:
        pass

    def ping(self) -> None:
        pass


@pytest.fixture
def env() -> Any:
    clock = ManualClock()
    settings = make_settings(limits={"handler_timeout_s": 0.05, "rate_burst": 3, "rate_per_s": 1,
                                     "rate_abuse_replies": 3})
    app = make_app(settings, Overrides(clock=clock))
    rules = ServerRules(
        [
            rule("/t/echo", echo, Echo, "none"),
            rule("/t/device", echo, Echo, "device"),
            rule("/t/operator", echo, Echo, "operator"),
            rule("/t/hang", hang, Echo, "none"),
            rule("/t/boom", boom, Echo, "none"),
            rule("/t/waits", waits, Echo, "none"),
            rule("/t/late-boom", waits_then_boom, Echo, "none"),
            rule("/t/hang-forever", hang, Echo, "none"),
        ],
        app.deps,
    )

    def connection(kind: str = "anon", role: str | None = None, limited: bool = False) -> Connection:
        c = Connection(NullSink(), clock, app.deps.metrics, "127.0.0.1", utc(clock.time()))  # type: ignore[arg-type]
        c.kind, c.role = kind, role
        if kind == "device":
            c.sn = "D-1"
        if limited:
            c.limiter = RateLimiter(1, 3, 3, clock.monotonic())
        return c

    async def call(service: str, values: dict[str, Any], conn: Connection | None = None, rid: Any = "r1") -> Any:
        ctx = ServerContext(conn or connection(), Request(service, values, rid), app.deps)
        return json.loads(await rules.dispatch(ctx))

    call.rules = rules  # type: ignore[attr-defined]
    call.connection = connection  # type: ignore[attr-defined]
    call.deps = app.deps  # type: ignore[attr-defined]
    return call, connection, clock


async def eager_call(call: Any, service: str, values: dict[str, Any]) -> tuple[bool, Any]:
    """Dispatch as the WebSocket session does: stepped inline from a loop callback, outside any task.

    Returns whether it finished inline (no task) and the decoded reply."""
    ctx = ServerContext(call.connection(), Request(service, values, "e1"), call.deps)
    box: list[bytes] = []

    async def run() -> None:
        box.append(await call.rules.dispatch(ctx))

    loop = asyncio.get_running_loop()
    started: asyncio.Future[Any] = loop.create_future()

    def kick() -> None:
        assert asyncio.current_task() is None
        started.set_result(eager.start(run()))

    loop.call_soon(kick)
    rest = await started
    if rest is not None:
        await asyncio.ensure_future(rest)
    return rest is None, json.loads(box[0])


async def test_eager_dispatch_outside_a_task(env: Any) -> None:
    call, _, _ = env
    # A handler that never waits finishes inline, without a task: the common, cheap case.
    inline, r = await eager_call(call, "/t/echo", {"n": 3})
    assert inline and r["code"] == 0 and r["values"] == {"n": 3, "tag": "x"}
    inline, r = await eager_call(call, "/t/nope", {})
    assert inline and r["code"] == 404
    # One that waits moves into a task and still gets its own reply, its timeout and its crash handling.
    inline, r = await eager_call(call, "/t/waits", {"n": 4, "tag": "io"})
    assert not inline and r["code"] == 0 and r["values"] == {"n": 8, "tag": "io"}
    inline, r = await eager_call(call, "/t/hang", {"n": 1})
    assert not inline and r["code"] == 504
    inline, r = await eager_call(call, "/t/late-boom", {"n": 1})
    assert not inline and r["code"] == 500


async def test_ok_reply(env: Any) -> None:
    call, _, _ = env
    r = await call("/t/echo", {"n": 3}, rid=42)
    assert r["code"] == 0 and r["result"] is True and r["values"] == {"n": 3, "tag": "x"} and r["request_id"] == 42


async def test_unknown_service_404(env: Any) -> None:
    call, _, _ = env
    r = await call("/t/nope", {})
    assert r["code"] == 404 and r["result"] is False and "/t/nope" in r["msg"] and r["request_id"] == "r1"


async def test_invalid_values_give_per_field_errors(env: Any) -> None:
    call, _, _ = env
    r = await call("/t/echo", {"n": 99, "extra": 1})
    assert r["code"] == 400
    fields = {e["field"] for e in r["values"]["errors"]}
    assert fields == {"n", "extra"}
    assert all(e["msg"] for e in r["values"]["errors"])


async def test_access_rules(env: Any) -> None:
    call, connection, _ = env
    assert (await call("/t/device", {"n": 1}))["code"] == 401
    assert (await call("/t/operator", {"n": 1}))["code"] == 401
    assert (await call("/t/device", {"n": 1}, connection("ops", "admin")))["code"] == 403
    assert (await call("/t/operator", {"n": 1}, connection("device")))["code"] == 403
    assert (await call("/t/operator", {"n": 1}, connection("ops", "viewer")))["code"] == 403
    assert (await call("/t/operator", {"n": 1}, connection("ops", "operator")))["code"] == 0
    assert (await call("/t/device", {"n": 1}, connection("device")))["code"] == 0


async def test_access_is_checked_before_validation(env: Any) -> None:
    call, _, _ = env
    r = await call("/t/operator", {"n": "garbage"})
    assert r["code"] == 401  # an anonymous caller learns nothing about the schema


async def test_handlers_that_suspend_get_their_own_reply(env: Any) -> None:
    call, _, _ = env
    r = await call("/t/waits", {"n": 4, "tag": "io"})
    assert r["code"] == 0 and r["values"] == {"n": 8, "tag": "io"}
    r = await call("/t/late-boom", {"n": 1})
    assert r["code"] == 500


async def test_an_outside_cancel_still_reaches_a_suspended_handler(env: Any) -> None:
    call, _, _ = env
    task = asyncio.ensure_future(call("/t/hang-forever", {"n": 1}))
    await asyncio.sleep(0)  # let it reach its first suspension
    task.cancel()  # e.g. the connection's task is torn down at shutdown
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_timeout_is_504(env: Any) -> None:
    call, _, _ = env
    r = await call("/t/hang", {"n": 1})
    assert r["code"] == 504 and "0.05" in r["msg"]


async def test_crash_is_500_logged_with_request_id(env: Any, caplog: pytest.LogCaptureFixture) -> None:
    call, _, _ = env
    with caplog.at_level(logging.ERROR, logger="fleetpush.registry"):
        r = await call("/t/boom", {"n": 1}, rid="req-boom")
    assert r["code"] == 500 and "kaboom" not in r["msg"]
    rec = [x for x in caplog.records if getattr(x, "request_id", None) == "req-boom"]
    assert rec and rec[0].exc_info is not None and "kaboom" in str(rec[0].exc_info[1])


async def test_rate_limit_429_then_disconnect(env: Any) -> None:
    call, connection, clock = env
    c = connection(limited=True)
    codes = [(await call("/t/echo", {"n": 1}, c))["code"] for _ in range(5)]
    assert codes == [0, 0, 0, 429, 429]
    clock.advance(1.0)  # one token back
    assert (await call("/t/echo", {"n": 1}, c))["code"] == 0
    assert (await call("/t/echo", {"n": 1}, c))["code"] == 429
    assert (await call("/t/echo", {"n": 1}, c))["code"] == 429
    with pytest.raises(Disconnect) as info:
        await call("/t/echo", {"n": 1}, c)
    assert info.value.code == CLOSE_RATE_LIMIT


def test_service_table_is_explicit_and_unique() -> None:
    services = [r.service for r in SERVICE_TABLE]
    assert len(services) == len(set(services))
    expected = {
        "/api/user/login": "none", "/api/device/status": "device", "/api/device/heartbeat": "device",
        "/api/command/ack": "device", "/admin/auth/login": "none", "/admin/device/list": "viewer",
        "/admin/device/history": "viewer", "/admin/device/subscribe": "viewer",
        "/admin/device/unsubscribe": "viewer", "/admin/device/command": "operator",
        "/admin/push/broadcast": "operator",
    }
    assert {r.service: r.access for r in SERVICE_TABLE} == expected
