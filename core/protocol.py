"""Sans-I/O envelope codec: decode requests, encode replies and pushes, build WebSocket frames."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

OP_REQUEST = "galbot_request"
OP_RESPONSE = "galbot_response"
OP_PUSH = "galbot_push"

RequestId = str | int | float | None


class ProtocolError(Exception):
    """An envelope that cannot be served; replied with `code` (400) and the request_id if known."""

    def __init__(self, msg: str, request_id: RequestId = None, service: str = "", code: int = 400) -> None:
        super().__init__(msg)
        self.msg = msg
        self.request_id = request_id
        self.service = service
        self.code = code


@dataclass(slots=True)
class Request:
    """One decoded client request."""

    service: str
    values: dict[str, Any]
    request_id: RequestId = None
    size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Limits:
    """Parser limits: bytes, nesting depth and integer literal length."""

    max_bytes: int = 65536
    max_depth: int = 32
    max_int_digits: int = 64


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


# A \uD800-\uDFFF escape: either half of a surrogate pair or a lone surrogate, which no UTF-8 can carry.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(text: str, obj: Any) -> bool:
    # Only text with a surrogate escape is checked (rare); a proper pair decodes to one
    # code point and re-encodes fine, a lone half does not.
    if "\\u" not in text or _SURROGATE_ESCAPE.search(text) is None:
        return False
    try:
        _dumps(obj).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _depth_exceeds(text: str, max_depth: int) -> bool:
    # Cheap pre-scan: the deepest bracket nesting can never exceed the bracket count, so
    # most messages skip the scan entirely. Brackets inside strings only over-estimate.
    if text.count("{") + text.count("[") <= max_depth:
        return False
    depth = 0
    in_str = False
    esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif ch in "]}":
            depth -= 1
    return False


class Decoder:
    """Decodes request frames under fixed limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        digits = limits.max_int_digits

        def parse_int(s: str) -> int:
            # Long literals are refused before int() so a 5000-digit number costs nothing.
            if len(s) > digits + (1 if s.startswith("-") else 0):
                raise ValueError("integer literal too long")
            return int(s)

        def parse_float(s: str) -> float:
            if len(s) > 64:
                raise ValueError("number literal too long")
            value = float(s)
            if value in (float("inf"), float("-inf")):
                raise ValueError("number out of range")
            return value

        self._decoder = json.JSONDecoder(
            object_pairs_hook=_pairs,
            parse_constant=_reject_constant,
            parse_int=parse_int,
            parse_float=parse_float,
        )

    def decode(self, text: str) -> Request:
        """Parse one text frame into a Request, or raise ProtocolError."""
        if len(text) > self.limits.max_bytes:
            raise ProtocolError("message too large")
        if _depth_exceeds(text, self.limits.max_depth):
            raise ProtocolError(f"nesting deeper than {self.limits.max_depth}")
        try:
            obj = self._decoder.decode(text)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"not valid JSON: {exc}") from None
        if _lone_surrogate(text, obj):
            # Replying would echo it (service, request_id) and storing it would fail: refuse it here.
            raise ProtocolError("not valid JSON: a string holds a lone UTF-16 surrogate escape")
        if not isinstance(obj, dict):
            raise ProtocolError("a request must be a JSON object")
        rid = obj.get("request_id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int | float)):
            raise ProtocolError("request_id must be a string or a number")
        if isinstance(rid, str) and len(rid) > 128:
            raise ProtocolError("request_id longer than 128 characters")
        service = obj.get("service")
        op = obj.get("op", OP_REQUEST)
        if op != OP_REQUEST:
            raise ProtocolError(f"unknown op {op!r}", rid, service if isinstance(service, str) else "")
        if not isinstance(service, str) or not service:
            raise ProtocolError("service is required and must be a string", rid)
        if len(service) > 128:
            raise ProtocolError("service longer than 128 characters", rid)
        values = obj.get("values", {})
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ProtocolError("values must be an object", rid, service)
        return Request(service=service, values=values, request_id=rid, size=len(text))


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=str).encode


# json's C encoder, built once: JSONEncoder.encode builds a new one on every call, which was a third
# of encoding a reply. Without circular-reference markers: envelopes come from decoded JSON and handlers'
# plain dicts; a cycle would end in RecursionError, never in a hang. None without the C accelerator.
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encoder: Any = (
    _make_c_encoder(None, str, json.encoder.encode_basestring, None, ":", ",", False, False, False)
    if _make_c_encoder is not None
    else None
)


def encode(obj: dict[str, Any]) -> bytes:
    """Encode one envelope as compact UTF-8 JSON."""
    try:
        if _c_encoder is not None:
            return "".join(_c_encoder(obj, 0)).encode("utf-8")
        return _dumps(obj).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate that reached a reply or push some other way: \u-escaped it is the
        # same JSON and valid UTF-8, where the raw character would fail the whole frame.
        return _dumps_ascii(obj).encode("ascii")


def response(
    service: str,
    request_id: RequestId,
    values: Any = None,
    code: int = 0,
    msg: str = "",
) -> bytes:
    """Encode a galbot_response; result is true exactly when code is 0."""
    return encode(
        {
            "op": OP_RESPONSE,
            "service": service,
            "code": code,
            "msg": msg,
            "values": values,
            "result": code == 0,
            "request_id": request_id,
        }
    )


# A random 64-bit prefix per process and a counter: unique across nodes and restarts like a
# uuid4, at a tenth of its cost (one per push; at 5k status reports/s that was 4% of the CPU).
_PUSH_PREFIX = "p-" + secrets.token_hex(8) + "-"
_push_seq = itertools.count(1)


def new_push_id() -> str:
    """A unique server-generated id for one push."""
    return f"{_PUSH_PREFIX}{next(_push_seq):x}"


def push(service: str, values: Any, push_id: str | None = None) -> bytes:
    """Encode a galbot_push with a fresh id."""
    return encode(
        {
            "op": OP_PUSH,
            "service": service,
            "code": 0,
            "msg": "",
            "values": values,
            "result": True,
            "request_id": push_id or new_push_id(),
        }
    )


def text_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked, final RFC 6455 frame around `payload` (server to client): text, or `opcode` 0x2 binary."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload
