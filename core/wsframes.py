"""A sans-I/O RFC 6455 server-side frame parser: bytes in, events out."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Binary", "Close", "Event", "Fail", "FrameParser", "Ping", "Pong", "Text", "unmask"]


def _unmask_py(mask: bytes, data: bytes) -> bytes:
    """XOR `data` with the repeated 4-byte `mask`, as one big-integer operation."""
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


try:  # Tornado's C helper, when built; the parser itself does no I/O and needs nothing else from Tornado.
    from tornado.speedups import websocket_mask as _unmask_c

    unmask: Callable[[bytes, bytes], bytes] = _unmask_c
except ImportError:  # pragma: no cover - depends on the Tornado build
    unmask = _unmask_py

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")

_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009


@dataclass(slots=True)
class Text:
    """A complete text message."""

    data: str


@dataclass(slots=True)
class Binary:
    """A complete binary message."""

    data: bytes


@dataclass(slots=True)
class Ping:
    """A ping frame."""

    data: bytes


@dataclass(slots=True)
class Pong:
    """A pong frame."""

    data: bytes


@dataclass(slots=True)
class Close:
    """The peer's close frame (code None when it carried no payload)."""

    code: int | None
    reason: str


@dataclass(slots=True)
class Fail:
    """The peer broke the protocol: fail the connection with this close code."""

    close_code: int
    reason: str


Event = Text | Binary | Ping | Pong | Close | Fail


def valid_close_code(code: int) -> bool:
    """Whether a peer may send this code in a close frame (RFC 6455 §7.4)."""
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class FrameParser:
    """Parse client-to-server frames; `feed` returns every event the new bytes complete."""

    __slots__ = (
        "_bparts",
        "_buf",
        "_dec",
        "_done",
        "_frag_op",
        "_frag_size",
        "_max",
        "_need",
        "_parts",
        "_pend",
        "_pv",
        "message_bytes",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._buf = bytearray()  # bytes of the incomplete frame at the end of the last feed
        self._need = 0  # len(_buf) at which parsing can make progress again
        self._done = False  # after a Close or a Fail nothing more is parsed
        self._frag_op = 0  # 1 or 2 while a fragmented message is open, else 0
        self._frag_size = 0  # payload bytes of the open message so far
        self._parts: list[str] = []  # decoded text of the open message
        self._bparts: list[bytes] = []  # payload of an open binary message
        self._dec: codecs.IncrementalDecoder | None = None  # UTF-8 state of the open text message
        self._pend: tuple[int, bytes] | None = None  # (header length, mask) of a pending text frame
        self._pv = 0  # payload bytes of the pending text frame already validated
        self.message_bytes = 0  # total payload bytes of data frames received

    @property
    def done(self) -> bool:
        """True once a Close or a Fail was returned; later input is ignored."""
        return self._done

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes from the socket; return the events they complete, in order."""
        if self._done or not data:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                if self._pend is not None:
                    events: list[Event] = []
                    self._validate_pending(buf, 0, len(buf), events)
                    return events
                return []
            data = bytes(buf)
            buf.clear()
        events = []
        pos = self._parse(data, events)
        if pos < len(data) and not self._done:
            buf += memoryview(data)[pos:]
        return events

    def _fail(self, events: list[Event], code: int, reason: str) -> int:
        self._done = True
        self._buf.clear()
        self._parts = []
        self._bparts = []
        self._dec = None
        self._pend = None
        events.append(Fail(code, reason))
        return 0

    def _validate_pending(self, data: bytes | bytearray, base: int, end: int, events: list[Event]) -> bool:
        """Check the UTF-8 of the pending text frame (at `base`) up to `end`: fail fast (RFC 6455 §8.1)."""
        assert self._pend is not None
        hlen, mask = self._pend
        start = base + hlen + self._pv
        if end <= start:
            return True
        k = self._pv & 3
        with memoryview(data) as view:
            chunk = unmask(mask[k:] + mask[:k], bytes(view[start:end]))
        if self._dec is None:
            self._dec = _Utf8Decoder()
        try:
            self._parts.append(self._dec.decode(chunk, False))
        except UnicodeDecodeError:
            self._fail(events, INVALID_DATA, "invalid UTF-8")
            return False
        self._pv = end - base - hlen
        return True

    def _parse(self, data: bytes, events: list[Event]) -> int:
        """Consume every complete frame of `data`; return the offset of the first unconsumed byte."""
        pos = 0
        end = len(data)
        while True:
            avail = end - pos
            if avail < 2:
                self._need = 2
                return pos
            b0 = data[pos]
            b1 = data[pos + 1]
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if b0 & 0x70:
                return self._fail(events, PROTOCOL_ERROR, "reserved bits set")
            if not b1 & 0x80:
                return self._fail(events, PROTOCOL_ERROR, "client frame not masked")
            n = b1 & 0x7F
            if opcode & 0x8:
                if opcode > 0xA:
                    return self._fail(events, PROTOCOL_ERROR, "unknown opcode")
                if not fin:
                    return self._fail(events, PROTOCOL_ERROR, "fragmented control frame")
                if n > 125:
                    return self._fail(events, PROTOCOL_ERROR, "control frame too long")
            elif opcode == 0:
                if not self._frag_op:
                    return self._fail(events, PROTOCOL_ERROR, "continuation without a message")
            elif opcode > 2:
                return self._fail(events, PROTOCOL_ERROR, "unknown opcode")
            elif self._frag_op:
                return self._fail(events, PROTOCOL_ERROR, "new message inside a fragmented one")
            if n < 126:
                hlen = 6
            elif n == 126:
                if avail < 4:
                    self._need = 4
                    return pos
                n = (data[pos + 2] << 8) | data[pos + 3]
                hlen = 8
            else:
                if avail < 10:
                    self._need = 10
                    return pos
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if n >> 63:
                    return self._fail(events, PROTOCOL_ERROR, "64-bit length with the top bit set")
                hlen = 14
            if not opcode & 0x8 and (self._frag_size if opcode == 0 else 0) + n > self._max:
                return self._fail(events, TOO_BIG, "message too big")
            total = hlen + n
            if avail < total:
                self._need = total if avail >= hlen else hlen
                if avail >= hlen and (opcode == 1 or (opcode == 0 and self._frag_op == 1)):
                    if self._pend is None:
                        self._pend = (hlen, data[pos + hlen - 4 : pos + hlen])
                        self._pv = 0
                    if not self._validate_pending(data, pos, end, events):
                        return 0
                return pos
            mask = data[pos + hlen - 4 : pos + hlen]
            pv = 0
            if self._pend is not None:
                pv = self._pv
                self._pend = None
                self._pv = 0
            if pv:
                k = pv & 3
                payload = unmask(mask[k:] + mask[:k], data[pos + hlen + pv : pos + total])
            else:
                payload = unmask(mask, data[pos + hlen : pos + total])
            pos += total
            if opcode == 1:
                self.message_bytes += n
                if fin and self._dec is None:
                    try:
                        events.append(Text(payload.decode("utf-8")))
                    except UnicodeDecodeError:
                        return self._fail(events, INVALID_DATA, "invalid UTF-8")
                    continue
                if self._dec is None:
                    self._dec = _Utf8Decoder()
                try:
                    self._parts.append(self._dec.decode(payload, bool(fin)))
                except UnicodeDecodeError:
                    return self._fail(events, INVALID_DATA, "invalid UTF-8")
                if fin:
                    events.append(Text("".join(self._parts)))
                    self._parts = []
                    self._dec = None
                else:
                    self._frag_op = 1
                    self._frag_size = n
            elif opcode == 2:
                self.message_bytes += n
                if fin:
                    events.append(Binary(payload))
                else:
                    self._frag_op = 2
                    self._frag_size = n
                    self._bparts = [payload]
            elif opcode == 0:
                self.message_bytes += n
                self._frag_size += n
                if self._frag_op == 1:
                    if self._dec is None:
                        self._dec = _Utf8Decoder()
                    try:
                        self._parts.append(self._dec.decode(payload, bool(fin)))
                    except UnicodeDecodeError:
                        return self._fail(events, INVALID_DATA, "invalid UTF-8")
                    if fin:
                        events.append(Text("".join(self._parts)))
                        self._parts = []
                        self._dec = None
                else:
                    self._bparts.append(payload)
                    if fin:
                        events.append(Binary(b"".join(self._bparts)))
                        self._bparts = []
                if fin:
                    self._frag_op = 0
                    self._frag_size = 0
            elif opcode == 0x9:
                events.append(Ping(payload))
            elif opcode == 0xA:
                events.append(Pong(payload))
            else:
                return self._close(payload, events)

    def _close(self, payload: bytes, events: list[Event]) -> int:
        n = len(payload)
        if n == 0:
            events.append(Close(None, ""))
        elif n == 1:
            return self._fail(events, PROTOCOL_ERROR, "close frame with a 1-byte payload")
        else:
            code = (payload[0] << 8) | payload[1]
            if not valid_close_code(code):
                return self._fail(events, PROTOCOL_ERROR, "invalid close code")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(events, PROTOCOL_ERROR, "close reason not UTF-8")
            events.append(Close(code, reason))
        self._done = True
        self._buf.clear()
        return 0
