"""Eager steps: run a coroutine without a task until it first waits (Python 3.11 has no eager tasks).

Most requests finish without waiting on anything (a heartbeat, a rejected or invalid request, a push
to connections on this node); creating a task for each cost a fifth of the CPU of a request/response
load. `start()` steps such a coroutine inline and only a coroutine that really suspends gets a task.

Inside an eager step there is no current task, and `asyncio.timeout` needs one (it cancels the task
when the deadline passes). `timeout()` here is its drop-in: in an eager step it first asks the driver
to move the coroutine into a task (by yielding NEED_TASK up the await chain), then arms
`asyncio.timeout` there. Code reachable from a WebSocket message uses `eager.timeout`, and the modules
that wrap a driver (store, Redis broker) `await in_task()` before calling into it: a library may use
`asyncio.timeout` itself (redis-py does, on every command).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Generator
from types import TracebackType
from typing import Any

__all__ = ["NEED_TASK", "Resumed", "in_task", "start", "timeout"]


class _NeedTask:
    """Yielded by a coroutine in an eager step that must continue inside a task."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_TASK"


NEED_TASK: Any = _NeedTask()


class _ToTask:
    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield NEED_TASK


async def in_task() -> None:
    """Continue inside a task: at once when already in one, else after the eager driver made one."""
    if asyncio.current_task() is None:
        await _ToTask()


class Resumed:
    """Awaits the rest of a coroutine that already ran up to its first suspension (`first`, what it yielded)."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, None, Any]:
        # What `await` does, from the second step on: hand each yielded future to the task, resume
        # with send(None) when it is done, or throw in what the task throws (a cancel).
        coro = self._coro
        yielded = self._first
        if yielded is NEED_TASK:  # it asked for a task, and runs in one now: resume it at once
            try:
                yielded = coro.send(None)
            except StopIteration as done:
                return done.value
        while True:
            try:
                yield yielded
            except BaseException as exc:
                try:
                    yielded = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(None)
                except StopIteration as done:
                    return done.value


def start(coro: Coroutine[Any, Any, Any]) -> Awaitable[Any] | None:
    """Step `coro` inline: None when it finished, else an awaitable of its rest (await it in a task).

    Must be called outside any task (from a transport callback); exceptions propagate."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return Resumed(coro, first)


class timeout:
    """`asyncio.timeout(delay)` that also works in an eager step (it moves the coroutine into a task first)."""

    __slots__ = ("_cm", "_delay")

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._cm: asyncio.Timeout | None = None

    async def __aenter__(self) -> asyncio.Timeout:
        if asyncio.current_task() is None:
            await _ToTask()
        self._cm = cm = asyncio.timeout(self._delay)
        await cm.__aenter__()
        return cm

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._cm is not None
        await self._cm.__aexit__(typ, exc, tb)  # it raises TimeoutError itself; it never swallows
