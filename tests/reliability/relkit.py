"""Shared helpers of the reliability suite: an event-loop lag probe and a frozen test heap."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

# A liveness bound, not a speed target: a loop blocked this long is a bug whatever the machine.
LAG_BOUND_S = 0.25


def _runqueue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class LagProbe:
    """A task in the core's loop that records how late a short sleep wakes up.

    The time the loop's thread spent runnable but waiting for a CPU is subtracted: on a shared,
    oversubscribed machine the OS may not schedule the process for a while, which is not the core
    blocking its loop. A handler that hogs the loop, blocks in a syscall or waits on a lock counts.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_wall = 0.0
        self.samples = 0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop and self.samples < 1_000_000:
            start, queued = loop.time(), _runqueue_wait()
            await asyncio.sleep(0.005)
            late = loop.time() - start - 0.005
            self.worst_wall = max(self.worst_wall, late)
            self.worst = max(self.worst, late - (_runqueue_wait() - queued))
            self.samples += 1

    def start(self) -> None:
        """Start in the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> float:
        """Stop; the worst lag seen, in seconds."""
        self._stop = True
        assert self._task is not None
        await self._task
        assert self.samples > 0
        return self.worst


@pytest.fixture(autouse=True)
def frozen_heap() -> Iterator[None]:
    """Take the test process's own heap (pytest, hypothesis, every import) out of garbage collection.

    A full collection of that heap stops every thread for 0.2-0.5 s on this machine, which the lag
    probe would report as the core's lag; a core process does not carry that heap. What the core
    allocates during the test is still collected as usual.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class FrameReader:
    """Reads a raw socket's server frames in bulk (cheap enough for hundreds of clients in one loop)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()

    async def frames(self, limit: int, timeout: float) -> list[tuple[int, bytes]]:
        """Up to `limit` complete frames, waiting at most `timeout` seconds for the first."""
        import struct

        out: list[tuple[int, bytes]] = []
        async with asyncio.timeout(timeout):
            while not out:
                buf = self.buf
                pos = 0
                while len(out) < limit and len(buf) - pos >= 2:
                    b0, b1 = buf[pos], buf[pos + 1]
                    n, head = b1 & 0x7F, 2
                    if n == 126:
                        if len(buf) - pos < 4:
                            break
                        n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
                    elif n == 127:
                        if len(buf) - pos < 10:
                            break
                        n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
                    if len(buf) - pos < head + n:
                        break
                    out.append((b0 & 0x0F, bytes(buf[pos + head : pos + head + n])))
                    pos += head + n
                del buf[:pos]
                if not out:
                    chunk = await self.reader.read(1 << 18)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf.extend(chunk)
        return out
