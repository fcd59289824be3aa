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
# As Tornado's reader: reads of data that has already arrived do not return to the IOLoop, so
# after this much work (bytes, each event counting as _EVENT_COST) the loop is yielded to.
_YIELD_THRESHOLD = 256 * 1024
_EVENT_COST = 1024


class BatchedProtocol(WebSocketProtocol13):
    """Server-side WebSocketProtocol13 whose reader parses whole chunks with `FrameParser`.

    Drop-in for `WebSocketProtocol13(handler, False, params)`. Differences from Tornado's reader:
    permessage-deflate is never negotiated (the parser refuses RSV bits); protocol errors are answered
    with a close frame (1002, 1007 or 1009) before the socket is dropped; a coroutine returned by
    `on_message`/`on_pong` is awaited inline (no Task per message), still one message at a time.
    """

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
        try:
            work = 0
            while not self.client_terminated:
                data = await stream.read_bytes(READ_CHUNK, partial=True)
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
                    work += _EVENT_COST
                    if work >= _YIELD_THRESHOLD:
                        work = 0
                        await asyncio.sleep(0)
                if work >= _YIELD_THRESHOLD:
                    work = 0
                    await asyncio.sleep(0)
        except StreamClosedError:
            self._abort()
        finally:
            handler.on_ws_connection_close(self.close_code, self.close_reason)
