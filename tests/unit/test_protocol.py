"""The sans-I/O envelope codec: what a device gets back for good and bad input."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import protocol
from core.protocol import Decoder, Limits, ProtocolError

dec = Decoder(Limits(max_bytes=65536, max_depth=32, max_int_digits=64))


def test_request_fields_and_defaults() -> None:
    req = dec.decode('{"service": "/api/device/status", "request_id": "r-17", "values": {"battery": 81}}')
    assert (req.service, req.request_id, req.values) == ("/api/device/status", "r-17", {"battery": 81})
    bare = dec.decode('{"service": "/x"}')
    assert bare.request_id is None and bare.values == {}


@pytest.mark.parametrize("rid", [17, "17", 1.5, "r-1"])
def test_request_id_keeps_its_type(rid: object) -> None:
    req = dec.decode(json.dumps({"service": "/x", "request_id": rid}))
    assert req.request_id == rid and type(req.request_id) is type(rid)
    reply = json.loads(protocol.response("/x", req.request_id, {"ok": 1}))
    assert reply["request_id"] == rid and type(reply["request_id"]) is type(rid)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"str"', "JSON object"),
        ('{"service": 5}', "service"),
        ("{}", "service"),
        ('{"service": "/x", "op": "galbot_push"}', "unknown op"),
        ('{"service": "/x", "values": [1]}', "values must be an object"),
        ('{"service": "/x", "request_id": true}', "request_id"),
        ('{"service": "/x", "request_id": {"a": 1}}', "request_id"),
        ('{"service": "/x", "values": {"a": NaN}}', "NaN"),
        ('{"service": "/x", "values": {"a": Infinity}}', "Infinity"),
        ('{"service": "/x", "values": {"a": 1e999}}', "out of range"),
        ('{"service": "/x", "service": "/y"}', "duplicate key"),
        ('{"service": "/x", "values": {"n": ' + "9" * 5000 + "}}", "too long"),
        ('{"service": "/x", "values": ' + '{"a":' * 40 + "1" + "}" * 40 + "}", "nesting"),
        ("[" * 60000, "nesting"),
    ],
)
def test_malformed_input_is_a_400_protocol_error(text: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        dec.decode(text)
    assert info.value.code == 400
    assert fragment in info.value.msg


def test_unknown_op_still_echoes_request_id() -> None:
    with pytest.raises(ProtocolError) as info:
        dec.decode('{"service": "/x", "op": "nope", "request_id": 9}')
    assert info.value.request_id == 9


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    req = dec.decode(json.dumps({"service": "/x", "values": {"msg": "[" * 500 + "{" * 500}}))
    assert req.values["msg"].startswith("[[[")


def test_oversize_message_rejected() -> None:
    small = Decoder(Limits(max_bytes=100))
    with pytest.raises(ProtocolError):
        small.decode(json.dumps({"service": "/x", "values": {"p": "x" * 200}}))


def test_response_and_push_shapes() -> None:
    ok = json.loads(protocol.response("/s", "r", {"a": 1}))
    assert ok == {"op": "galbot_response", "service": "/s", "code": 0, "msg": "", "values": {"a": 1},
                  "result": True, "request_id": "r"}
    err = json.loads(protocol.response("/s", None, None, 404, "unknown service"))
    assert err["result"] is False and err["code"] == 404 and err["values"] is None
    p1 = json.loads(protocol.push("device_status", {"sn": "A"}))
    p2 = json.loads(protocol.push("device_status", {"sn": "A"}))
    assert p1["op"] == "galbot_push" and p1["result"] is True
    assert p1["request_id"] != p2["request_id"] and p1["request_id"].startswith("p-")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_header_lengths(size: int) -> None:
    frame = protocol.text_frame(b"x" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and len(frame) == 2 + size
    elif size < 65536:
        assert frame[1] == 126 and struct.unpack("!H", frame[2:4])[0] == size
    else:
        assert frame[1] == 127 and struct.unpack("!Q", frame[2:10])[0] == size


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values=_json_values, rid=st.none() | st.integers() | st.text(max_size=10))
def test_encoded_envelopes_are_the_compact_json_of_the_envelope(values: object, rid: object) -> None:
    # What a device parses: exactly json.dumps's compact form, non-ASCII kept as UTF-8.
    raw = protocol.response("/svc", rid, values)  # type: ignore[arg-type]
    expected = {"op": "galbot_response", "service": "/svc", "code": 0, "msg": "", "values": values,
                "result": True, "request_id": rid}
    try:
        assert raw == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: sent \u-escaped instead, still the same JSON
        assert raw == json.dumps(expected, separators=(",", ":")).encode("ascii")


def test_encoding_refuses_nan_and_stringifies_other_objects() -> None:
    with pytest.raises(ValueError):
        protocol.response("/svc", 1, {"x": float("nan")})
    from datetime import UTC, datetime

    raw = protocol.response("/svc", 1, {"at": datetime(2027, 1, 1, tzinfo=UTC)})
    assert json.loads(raw)["values"] == {"at": "2027-01-01 00:00:00+00:00"}

