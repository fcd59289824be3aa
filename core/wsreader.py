"""Tornado's RFC 6455 server protocol with a batched reader: one read per chunk, every frame in it parsed at once."""

from __future__ import annotations

import asyncio
import sys
from types import CoroutineType
from typing import Any

from tornado import gen
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketProtocol13, _WebSocketDelegate, _WebSocketParams

from .wsframes import Binary, Close, Fail, FrameParser, Ping, Pong, Text

__all__ = ["READ_CHUNK", "BatchedProtocol"]

READ_CHUNK = 65536
# Reads of data that has already arrived, and handlers that finish without suspending, do not
# return to the IOLoop; so after this many events or bytes the reader yields to it. Tornado's reader
# runs each on_message as a Task and so gives every connection one message per IOLoop iteration;
# a larger quantum here would let a pipelining client add its whole batch to everyone else's latency.
_YIELD_EVENTS = 8
_YIELD_BYTES = 256 * 1024


class BatchedProtocol(WebSocketProtocol13):
    """Server-side WebSocketProtocol13 whose reader parses whole chunks with `FrameParser`.

    Drop-in for `WebSocketProtocol13(handler, False, params)`. Differences from Tornado's reader:
    permessage-deflate is never negotiated (the parser refuses RSV bits); protocol errors are answered
    with a close frame (1002, 1007 or 1009) before the socket is dropped; a coroutine returned by
    `on_message`/`on_pong` is awaited inline (no Task per message), still one message at a time.
    """

    yield_events = _YIELD_EVENTS  # events handled between two yields to the IOLoop

    def __init__(self, handler: _WebSocketDelegate, mask_outgoing: bool, params: _WebSocketParams) -> None:
        if mask_outgoing:
            raise ValueError("BatchedProtocol is server-side only")
        super().__init__(handler, mask_outgoing, params)
        self._compression_options = None  # no extension is negotiated, so RSV bits are always an error
        self.parser = FrameParser(params.max_message_size)

    async def _deliver(self, callback: Any, arg: str | bytes) -> None:
        """Run a handler callback and wait for it if it returns an awaitable; errors abort the connection."""
        try:
            result = callback(arg)
            if result is not None:
                if type(result) is not CoroutineType:
                    result = gen.convert_yielded(result)
                await result
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception:
            self.handler.log_exception(*sys.exc_info())
            self._abort()

    async def _receive_frame_loop(self) -> None:
        stream = self.stream
        assert stream is not None
        parser = self.parser
        handler = self.handler
        yield_events = self.yield_events
        try:
            work = 0
            events_since = 0
            while not self.client_terminated:
                pending = stream.read_bytes(READ_CHUNK, partial=True)
                if isinstance(pending, asyncio.Future) and not pending.done():
                    events_since = work = 0  # this read returns to the IOLoop anyway
                data = await pending
                self._wire_bytes_in += len(data)
                work += len(data)
                before = parser.message_bytes
                events = parser.feed(data)
                self._message_bytes_in += parser.message_bytes - before
                for ev in events:
                    if self.client_terminated:
                        break
                    if isinstance(ev, Text | Binary):
                        # Inline fast path for the common case: an async on_message.
                        try:
                            result = handler.on_message(ev.data)
                            if result is not None:
                                if type(result) is not CoroutineType:
                                    result = gen.convert_yielded(result)
                                await result
                        except asyncio.CancelledError:
                            self._abort()
                            raise
                        except Exception:
                            handler.log_exception(*sys.exc_info())
                            self._abort()
                    elif isinstance(ev, Ping):
                        self._send_pong(ev.data)
                        self._run_callback(handler.on_ping, ev.data)
                    elif isinstance(ev, Pong):
                        self._received_pong = True
                        await self._deliver(handler.on_pong, ev.data)
                    elif isinstance(ev, Close):
                        self.client_terminated = True
                        self.close_code = ev.code
                        self.close_reason = ev.reason or None
                        # Echo the received close code, if any (RFC 6455 §5.5.1).
                        self.close(self.close_code)
                    elif isinstance(ev, Fail):
                        self.close(ev.close_code, ev.reason)
                        self._abort()
                    events_since += 1
                    if events_since >= yield_events:
                        events_since = work = 0
                        await asyncio.sleep(0)
                if work >= _YIELD_BYTES:
                    events_since = work = 0
                    await asyncio.sleep(0)
        except StreamClosedError:
            self._abort()
        finally:
            handler.on_ws_connection_close(self.close_code, self.close_reason)
