"""The send side of one client: bounded outbound queue, one write in flight, coalesced batches."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .clock import Clock
from .errors import CLOSE_SLOW_CONSUMER
from .metrics import Metrics

log = logging.getLogger("fleetpush.connection")
_ids = itertools.count(1)

# One socket write carries at most this many bytes of queued frames.
_BATCH_BYTES = 256 * 1024


class FrameSink(Protocol):
    """What a connection writes to: the transport's socket."""

    def write_frames(self, data: bytes) -> Any:
        """Write pre-framed bytes; returns an awaitable-like future resolved when flushed."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and drop the connection."""
        ...

    def ping(self) -> None:
        """Send a WebSocket ping."""
        ...


@dataclass(slots=True)
class RateLimiter:
    """A token bucket with a count of consecutive refusals."""

    rate: float
    burst: float
    tokens: float
    last: float
    refused: int = 0

    def allow(self, now: float) -> bool:
        """Take one token; False when the bucket is empty."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.refused = 0
            return True
        self.refused += 1
        return False


@dataclass(eq=False, slots=True)
class Connection:
    """One client connection as the hub, push and registry see it."""

    sink: FrameSink
    clock: Clock
    metrics: Metrics
    remote: str
    connected_at: datetime
    max_queue: int = 1000
    node_id: str = ""
    id: str = ""
    kind: str = "anon"  # anon | device | ops
    sn: str | None = None
    device_type: str | None = None
    username: str | None = None
    role: str | None = None
    session_id: str | None = None
    session_expires: float | None = None  # monotonic deadline of an ops session
    opened_mono: float = 0.0
    last_rx: float = 0.0
    last_ping: float = 0.0
    closed: bool = False
    close_code: int | None = None
    close_reason: str = ""
    limiter: RateLimiter | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)
    _queue: deque[bytes] = field(default_factory=deque)
    _inflight_since: float | None = None

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.node_id}-{next(_ids)}" if self.node_id else str(next(_ids))
        now = self.clock.monotonic()
        self.opened_mono = self.last_rx = self.last_ping = now

    @property
    def queue_depth(self) -> int:
        """Frames waiting behind the write in flight."""
        return len(self._queue)

    @property
    def authenticated(self) -> bool:
        """True once a device or ops login succeeded."""
        return self.kind != "anon"

    def touch(self) -> None:
        """Record that something arrived from the client."""
        self.last_rx = self.clock.monotonic()

    def send(self, frame: bytes) -> bool:
        """Queue one pre-built frame; False (and the connection is cut with 4503) when it overflows."""
        if self.closed:
            return False
        if self._inflight_since is None:
            self._write(frame, 1)
            return True
        if len(self._queue) >= self.max_queue:
            self.metrics.queue_overflows.inc()
            log.warning("connection %s cut: outbound queue full (%d frames)", self.id, len(self._queue))
            self._queue.clear()
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        self._queue.append(frame)
        return True

    def _write(self, data: bytes, frames: int) -> None:
        try:
            fut = self.sink.write_frames(data)
        except Exception:  # the stream closed under us; on_close will clean up
            self.closed = True
            return
        m = self.metrics
        m.bytes_out += len(data)
        m.frames_out += frames
        if fut is not None:
            # In flight until the kernel takes the rest; the sweeper cuts a write stalled too long.
            # (A write the kernel took at once, the usual case, leaves nothing queued behind it.)
            self._inflight_since = self.clock.monotonic()
            fut.add_done_callback(self._flushed)
        elif self._queue:
            self._flushed(None)

    def _flushed(self, fut: Any) -> None:
        # Runs when the previous write reached the kernel: send everything queued meanwhile
        # in one write, so a burst costs one syscall instead of one per frame.
        self._inflight_since = None
        if fut is not None and fut.exception() is not None:
            self.closed = True
            self._queue.clear()
            return
        if self._queue and not self.closed:
            q = self._queue
            if len(q) == 1:
                self._write(q.popleft(), 1)
                return
            parts = []
            size = 0
            while q and size < _BATCH_BYTES:
                frame = q.popleft()
                parts.append(frame)
                size += len(frame)
            self._write(b"".join(parts), len(parts))

    def write_stalled(self, now: float, timeout: float) -> bool:
        """True when one write has waited on the socket longer than `timeout`."""
        return self._inflight_since is not None and now - self._inflight_since > timeout

    def ping(self) -> None:
        """Send a WebSocket ping."""
        self.last_ping = self.clock.monotonic()
        try:
            self.sink.ping()
        except Exception:
            self.closed = True

    def close(self, code: int, reason: str = "") -> None:
        """Close once: flush what is queued (unless cut as slow), then the close frame."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        if self._queue and code != CLOSE_SLOW_CONSUMER:
            try:
                self.sink.write_frames(b"".join(self._queue))
            except Exception:
                pass
        self._queue.clear()
        try:
            self.sink.close(code, reason)
        except Exception:
            log.debug("close of %s failed", self.id, exc_info=True)

    def run_undo(self) -> None:
        """Run every undo registered on this connection (subscriptions and the like)."""
        undo, self.undo = self.undo, []
        for fn in reversed(undo):
            try:
                fn()
            except Exception:
                log.exception("undo on close of %s failed", self.id)
