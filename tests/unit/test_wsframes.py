"""core.wsframes.FrameParser without sockets: every RFC 6455 rule it enforces, at every split point."""

from __future__ import annotations

import random
import struct

import pytest
from fleetkit import client_frame as frame

from core.wsframes import Binary, Close, Event, Fail, FrameParser, Ping, Pong, Text, _unmask_py, unmask


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    return frame(0x8, b"" if code is None else struct.pack("!H", code) + reason)


def feed_all(data: bytes, limit: int = 1 << 20) -> list[Event]:
    return FrameParser(limit).feed(data)


def feed_split(data: bytes, cuts: list[int], limit: int = 1 << 20) -> list[Event]:
    p = FrameParser(limit)
    out: list[Event] = []
    prev = 0
    for c in [*cuts, len(data)]:
        out += p.feed(data[prev:c])
        prev = c
    return out


def fail_code(events: list[Event]) -> int | None:
    assert events, "no events"
    last = events[-1]
    return last.close_code if isinstance(last, Fail) else None


MIXED = (
    frame(0x1, b"hello")
    + frame(0x9, b"ping!")
    + frame(0x1, "h\u00e9".encode(), fin=False)
    + frame(0xA, b"pong")  # control frames may sit inside a fragmented message
    + frame(0x0, "ll\u00f6 \u4e16".encode()[:3], fin=False)
    + frame(0x0, "ll\u00f6 \u4e16".encode()[3:])
    + frame(0x2, b"\x00\xff" * 100)
    + frame(0x2, b"ab", fin=False)
    + frame(0x0, b"cd")
    + frame(0x1, b"x" * 300)
    + frame(0x1, b"y" * 70000)
    + frame(0x1, b"")
    + close_frame(1000, "bye \u00e9".encode())
)
MIXED_EVENTS: list[Event] = [
    Text("hello"), Ping(b"ping!"), Pong(b"pong"), Text("h\u00e9ll\u00f6 \u4e16"), Binary(b"\x00\xff" * 100),
    Binary(b"abcd"), Text("x" * 300), Text("y" * 70000), Text(""), Close(1000, "bye \u00e9"),
]


def test_many_frames_in_one_feed() -> None:
    assert feed_all(MIXED) == MIXED_EVENTS


def test_split_at_every_byte_boundary() -> None:
    # MIXED without its 70000-byte frame (every split of that one is test_byte_by_byte_and_random_chunks).
    head = (
        frame(0x1, b"hello") + frame(0x9, b"ping!") + frame(0x1, "h\u00e9".encode(), fin=False)
        + frame(0xA, b"pong") + frame(0x0, "ll\u00f6 \u4e16".encode()[:3], fin=False)
        + frame(0x0, "ll\u00f6 \u4e16".encode()[3:]) + frame(0x2, b"ab", fin=False) + frame(0x0, b"cd")
        + frame(0x1, b"x" * 300) + close_frame(1000, b"bye")
    )
    want = [Text("hello"), Ping(b"ping!"), Pong(b"pong"), Text("h\u00e9ll\u00f6 \u4e16"), Binary(b"abcd"),
            Text("x" * 300), Close(1000, "bye")]
    for i in range(len(head) + 1):
        assert feed_split(head, [i]) == want, i
    for i in range(0, len(head), 7):
        for j in range(i, len(head), 13):
            assert feed_split(head, [i, j]) == want, (i, j)


def test_byte_by_byte_and_random_chunks() -> None:
    p = FrameParser(1 << 20)
    out: list[Event] = []
    for b in range(len(MIXED)):
        out += p.feed(MIXED[b : b + 1])
    assert out == MIXED_EVENTS
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(MIXED)), 20))
        assert feed_split(MIXED, cuts) == MIXED_EVENTS


def test_lengths_at_the_header_boundaries() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536, 100000):
        data = bytes(random.Random(n).randrange(256) for _ in range(n))
        assert feed_all(frame(0x2, data)) == [Binary(data)], n
        assert feed_split(frame(0x2, data), [1, 2, 3, 5, 9, 13, 14]) == [Binary(data)], n


def test_unmask_matches_a_naive_reference() -> None:
    rng = random.Random(1)
    for n in (0, 1, 3, 4, 5, 1000, 65537, 1 << 20):
        data = rng.randbytes(n)
        mask = rng.randbytes(4)
        naive = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert unmask(mask, data) == naive
        assert _unmask_py(mask, data) == naive
    big = rng.randbytes(1 << 20)
    assert feed_all(frame(0x2, big), limit=2 << 20) == [Binary(big)]
    assert feed_split(frame(0x2, big), [1, 3, 1000, 50001, 700003], limit=2 << 20) == [Binary(big)]


def test_unmasked_client_frame_is_1002() -> None:
    assert fail_code(feed_all(frame(0x1, b"hi", masked=False))) == 1002
    assert fail_code(feed_all(frame(0x9, b"", masked=False))) == 1002


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_rsv_bits_are_1002(rsv: int) -> None:
    events = feed_all(frame(0x1, b"ok") + frame(0x1, b"hi", rsv=rsv) + frame(0x1, b"never"))
    assert events[0] == Text("ok")
    assert fail_code(events) == 1002
    assert len(events) == 2


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_1002(opcode: int) -> None:
    assert fail_code(feed_all(frame(opcode, b""))) == 1002


def test_control_frames_too_long_or_fragmented_are_1002() -> None:
    assert feed_all(frame(0x9, b"x" * 125)) == [Ping(b"x" * 125)]
    for op in (0x8, 0x9, 0xA):
        assert fail_code(feed_all(frame(op, b"x" * 126))) == 1002
        assert fail_code(feed_all(frame(op, b"x", fin=False))) == 1002
    # Detected from the first two bytes, before the rest of the frame arrives.
    assert fail_code(FrameParser(100).feed(frame(0x9, b"x" * 126)[:2])) == 1002


def test_fragmentation_errors_are_1002() -> None:
    assert fail_code(feed_all(frame(0x0, b"orphan"))) == 1002
    assert fail_code(feed_all(frame(0x1, b"a", fin=False) + frame(0x1, b"b"))) == 1002
    assert fail_code(feed_all(frame(0x1, b"a", fin=False) + frame(0x2, b"b"))) == 1002
    assert fail_code(feed_all(frame(0x1, b"a") + frame(0x0, b"b"))) == 1002


def test_control_frames_inside_a_fragmented_message() -> None:
    data = (frame(0x1, b"a", fin=False) + frame(0x9, b"1") + frame(0x0, b"b", fin=False) + frame(0xA, b"2")
            + frame(0x0, b"c"))
    want = [Ping(b"1"), Pong(b"2"), Text("abc")]
    assert feed_all(data) == want
    for i in range(len(data)):
        assert feed_split(data, [i]) == want


def test_size_limit_single_frame_and_across_fragments() -> None:
    assert feed_all(frame(0x1, b"x" * 100), limit=100) == [Text("x" * 100)]
    assert fail_code(feed_all(frame(0x1, b"x" * 101), limit=100)) == 1009
    assert fail_code(feed_all(frame(0x2, b"x" * 101), limit=100)) == 1009
    ok = frame(0x1, b"x" * 50, fin=False) + frame(0x0, b"y" * 50)
    assert feed_all(ok, limit=100) == [Text("x" * 50 + "y" * 50)]
    over = frame(0x1, b"x" * 50, fin=False) + frame(0x0, b"y" * 30, fin=False) + frame(0x0, b"z" * 21)
    assert fail_code(feed_all(over, limit=100)) == 1009
    # Each message starts from zero again.
    assert feed_all(ok + ok, limit=100) == [Text("x" * 50 + "y" * 50)] * 2


def test_size_limit_fails_on_the_header_before_the_payload() -> None:
    big = frame(0x1, b"x" * 60000)
    p = FrameParser(1000)
    assert fail_code(p.feed(big[:8])) == 1009  # 2-byte header + 16-bit length + mask, no payload yet
    p = FrameParser(1000)
    assert p.feed(big[:3]) == []
    assert fail_code(p.feed(big[3:4])) == 1009
    # A 2^62-byte frame: failed at once, never buffered.
    assert fail_code(FrameParser(1 << 20).feed(frame(0x2, b"", length=1 << 62)[:10])) == 1009
    p = FrameParser(100)
    assert p.feed(frame(0x1, b"x" * 60, fin=False)) == []
    assert fail_code(p.feed(frame(0x0, b"y" * 41)[:2])) == 1009


def test_64_bit_length_with_top_bit_is_1002() -> None:
    head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 63)
    assert fail_code(FrameParser(1 << 70).feed(head)) == 1002


def test_invalid_utf8_text_is_1007() -> None:
    for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80"):
        assert fail_code(feed_all(frame(0x1, bad))) == 1007, bad
        assert fail_code(feed_all(frame(0x1, b"a", fin=False) + frame(0x0, bad))) == 1007, bad
    # Binary payloads are not checked.
    assert feed_all(frame(0x2, b"\xff")) == [Binary(b"\xff")]


def test_utf8_sequence_split_across_fragments() -> None:
    text = "\u00e9\u4e16\U0001f600"
    raw = text.encode()
    for i in range(len(raw) + 1):
        data = frame(0x1, raw[:i], fin=False) + frame(0x0, raw[i:])
        assert feed_all(data) == [Text(text)], i


def test_invalid_utf8_fails_fast_on_the_fragment() -> None:
    p = FrameParser(1 << 20)
    assert p.feed(frame(0x1, b"valid ", fin=False)) == []
    assert fail_code(p.feed(frame(0x0, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80", fin=False))) == 1007
    # Inside one frame too: the part of the payload that has arrived is checked (Autobahn 6.4.3/6.4.4).
    p = FrameParser(1 << 20)
    f = frame(0x1, b"valid \xed\xa0\x80" + b"x" * 1000)
    assert p.feed(f[:20]) == [Fail(1007, "invalid UTF-8")]
    p = FrameParser(1 << 20)
    out: list[Event] = []
    for i in range(len(f)):
        out += p.feed(f[i : i + 1])
        if out:
            assert i < 20
            break
    assert out == [Fail(1007, "invalid UTF-8")]
    # A truncated sequence at the end of what has arrived is not an error yet.
    p = FrameParser(1 << 20)
    raw = frame(0x1, "ab\u4e16".encode())
    assert p.feed(raw[:9]) == []
    assert p.feed(raw[9:]) == [Text("ab\u4e16")]


def test_close_frames() -> None:
    assert feed_all(close_frame(None)) == [Close(None, "")]
    assert feed_all(close_frame(1000)) == [Close(1000, "")]
    assert feed_all(close_frame(4999, b"why")) == [Close(4999, "why")]
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999):
        assert feed_all(close_frame(code)) == [Close(code, "")], code
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
        assert fail_code(feed_all(close_frame(code))) == 1002, code
    assert fail_code(feed_all(frame(0x8, b"\x03"))) == 1002
    assert fail_code(feed_all(close_frame(1000, b"\xff\xfe"))) == 1002


def test_nothing_after_close_or_fail() -> None:
    p = FrameParser(1 << 20)
    assert p.feed(close_frame(1000) + frame(0x1, b"late")) == [Close(1000, "")]
    assert p.done
    assert p.feed(frame(0x1, b"later")) == []
    p = FrameParser(1 << 20)
    events = p.feed(frame(0x1, b"a") + frame(0x1, b"b", masked=False) + frame(0x1, b"c"))
    assert events == [Text("a"), Fail(1002, "client frame not masked")]
    assert p.feed(frame(0x1, b"d")) == []
    assert p.feed(b"") == []


def test_leftover_is_kept_without_growing() -> None:
    p = FrameParser(1 << 20)
    one = frame(0x1, b"x" * 10)
    stream = one * 1000
    out: list[Event] = []
    for i in range(0, len(stream), 37):
        out += p.feed(stream[i : i + 37])
    assert out == [Text("x" * 10)] * 1000
    assert len(p._buf) == 0


def test_message_bytes_counter() -> None:
    p = FrameParser(1 << 20)
    p.feed(frame(0x1, b"abc") + frame(0x9, b"zz") + frame(0x2, b"de", fin=False) + frame(0x0, b"f"))
    assert p.message_bytes == 6
