"""The injectable clock: wall time for timestamps, monotonic time for deadlines."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """What the core asks of a clock."""

    def time(self) -> float:
        """Unix seconds (wall clock)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """Unix seconds."""
        return time.time()

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()


class ManualClock:
    """A clock that only moves when told to; tests use it instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        """Unix seconds."""
        return self._wall

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        self._wall += seconds
        self._mono += seconds


def utc(ts: float) -> datetime:
    """A timezone-aware UTC datetime, truncated to milliseconds as BSON stores it."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z suffix, or None."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
