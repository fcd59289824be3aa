"""A small loopback TCP fault proxy (Toxiproxy in miniature): forward, delay, black-hole or reset."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field


@dataclass(eq=False)
class Link:
    """One proxied connection: client <-> proxy <-> upstream."""

    client_w: asyncio.StreamWriter
    upstream_w: asyncio.StreamWriter
    up_bytes: int = 0  # client -> upstream, forwarded
    down_bytes: int = 0  # upstream -> client, forwarded
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Listens on 127.0.0.1 and forwards to 127.0.0.1:upstream_port, with faults switched on at will.

    - `delay_s`: each chunk waits this long before it is forwarded (both directions).
    - `blackhole()`: from now on nothing is forwarded either way; the sockets stay open, as with a
      peer that vanished behind a NAT or a pulled cable.
    - `reset()`: every link is aborted with a TCP RST (SO_LINGER 0) towards both ends, at whatever
      point of a frame the bytes have reached.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.blackholed = False
        self.links: list[Link] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self.connected = asyncio.Condition()
        self.progress = asyncio.Condition()

    async def start(self) -> FaultProxy:
        """Listen on an ephemeral port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        link = Link(writer, up_w)
        link.tasks = [
            asyncio.create_task(self._pipe(reader, up_w, link, "up")),
            asyncio.create_task(self._pipe(up_r, writer, link, "down")),
        ]
        self.links.append(link)
        async with self.connected:
            self.connected.notify_all()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: Link, way: str) -> None:
        try:
            while True:
                chunk = await src.read(65536)
                if not chunk:
                    break
                if self.blackholed:
                    continue  # read and dropped, so the sender's writes still succeed
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)  # the fault itself: latency on the path
                dst.write(chunk)
                await dst.drain()
                if way == "up":
                    link.up_bytes += len(chunk)
                else:
                    link.down_bytes += len(chunk)
                async with self.progress:
                    self.progress.notify_all()
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.blackholed:
                dst.close()

    def blackhole(self) -> None:
        """Drop everything from now on, both ways, keeping the connections open."""
        self.blackholed = True

    def reset(self) -> None:
        """Abort every link with a RST to both ends."""
        for link in self.links:
            for w in (link.client_w, link.upstream_w):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                w.transport.abort()
            for t in link.tasks:
                t.cancel()
        self.links.clear()

    async def wait_links(self, n: int, timeout: float = 5) -> None:
        """Wait until at least `n` connections have been accepted."""
        async with asyncio.timeout(timeout), self.connected:
            await self.connected.wait_for(lambda: len(self.links) >= n)

    async def forwarded_up(self, total: int, timeout: float = 5) -> None:
        """Wait until `total` bytes, over all links, have been forwarded towards the upstream."""
        async with asyncio.timeout(timeout), self.progress:
            await self.progress.wait_for(lambda: sum(link.up_bytes for link in self.links) >= total)

    async def close(self) -> None:
        """Stop listening and drop every link."""
        self.blackholed = False
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
