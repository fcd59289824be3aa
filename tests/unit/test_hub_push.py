"""Hub indexes and push targeting, without sockets: which connections get which frame."""

from __future__ import annotations

from typing import Any

import pytest

from core.broker import LocalBroker, Target
from core.clock import ManualClock, utc
from core.connection import Connection
from core.errors import CLOSE_SLOW_CONSUMER
from core.hub import Hub
from core.metrics import Metrics
from core.push import Pusher


class Sink:
    """Collects what a connection writes; `hold` makes writes stay in flight (a slow socket)."""

    def __init__(self, hold: bool = False) -> None:
        self.data: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.hold = hold
        self.pending: list[Any] = []

    def write_frames(self, data: bytes) -> Any:
        self.data.append(data)
        if self.hold:
            fut = _Fut()
            self.pending.append(fut)
            return fut
        return None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def ping(self) -> None:
        pass


class _Fut:
    def __init__(self) -> None:
        self.cb: Any = None

    def add_done_callback(self, cb: Any) -> None:
        self.cb = cb

    def exception(self) -> None:
        return None

    def resolve(self) -> None:
        self.cb(self)


clock = ManualClock()
metrics = Metrics()


def conn(hold: bool = False, max_queue: int = 1000) -> Connection:
    return Connection(Sink(hold), clock, metrics, "127.0.0.1", utc(clock.time()), max_queue=max_queue)


def sink(c: Connection) -> Sink:
    s = c.sink
    assert isinstance(s, Sink)
    return s


@pytest.fixture
def fleet() -> tuple[Hub, Pusher, dict[str, Connection]]:
    hub = Hub()
    push = Pusher(hub, LocalBroker(), Metrics(), clock.monotonic)
    c = {name: conn() for name in ("dog1", "dog2", "retail1", "alice1", "alice2", "bob", "anon")}
    for x in c.values():
        hub.add(x)
    hub.bind_device(c["dog1"], "DOG-1", "dance_dog")
    hub.bind_device(c["dog2"], "DOG-2", "dance_dog")
    hub.bind_device(c["retail1"], "RET-1", "retail")
    hub.bind_ops(c["alice1"], "alice", "operator")
    hub.bind_ops(c["alice2"], "alice", "operator")
    hub.bind_ops(c["bob"], "bob", "admin")
    return hub, push, c


def names(hub: Hub, target: Target, c: dict[str, Connection]) -> set[str]:
    picked = set(hub.select(target))
    return {k for k, v in c.items() if v in picked}


def test_selection_by_every_index(fleet: tuple[Hub, Pusher, dict[str, Connection]]) -> None:
    hub, _, c = fleet
    everyone = {"dog1", "dog2", "retail1", "alice1", "alice2", "bob"}
    assert names(hub, Target(), c) == everyone  # anonymous connections never get broadcasts
    assert names(hub, Target(kind="device"), c) == {"dog1", "dog2", "retail1"}
    assert names(hub, Target(kind="device", types=("dance_dog",)), c) == {"dog1", "dog2"}
    assert names(hub, Target(kind="device", sns=("DOG-2", "RET-1", "NOPE")), c) == {"dog2", "retail1"}
    assert names(hub, Target(usernames=("alice",)), c) == {"alice1", "alice2"}
    assert names(hub, Target(kind="ops", roles=("admin",)), c) == {"bob"}
    assert names(hub, Target(kind="device", types=("retail",), sns=("DOG-1",)), c) == set()
    assert names(hub, Target(conn_ids=(c["bob"].id, c["anon"].id)), c) == {"bob"}


async def test_push_modes_encode_once_and_count(fleet: tuple[Hub, Pusher, dict[str, Connection]]) -> None:
    _, push, c = fleet
    res = await push.to_type("dance_dog", "dance", {"song": 1})
    assert (res.matched, res.queued) == (2, 2)
    assert sink(c["dog1"]).data[-1] is sink(c["dog2"]).data[-1]  # the very same bytes object
    res = await push.to_user("alice", "note", "hi")
    assert (res.matched, res.queued) == (2, 2)
    assert not sink(c["bob"]).data
    res = push.by_condition(lambda x: x.kind == "device" and (x.sn or "").endswith("1"), "cond", {})
    assert res.matched == 2 and {x for x in c if sink(c[x]).data and b"cond" in sink(c[x]).data[-1]} == {
        "dog1", "retail1"}


def test_newer_device_login_unindexes_older(fleet: tuple[Hub, Pusher, dict[str, Connection]]) -> None:
    hub, _, c = fleet
    newer = conn()
    hub.add(newer)
    old = hub.bind_device(newer, "DOG-1", "dance_dog")
    assert old is c["dog1"]
    assert hub.device("DOG-1") is newer
    assert c["dog1"] not in hub.select(Target(kind="device", types=("dance_dog",)))
    # The old connection closing later must not take the new one's presence with it.
    assert hub.remove(c["dog1"]) is False
    assert hub.device("DOG-1") is newer


def test_subscriptions_and_their_removal(fleet: tuple[Hub, Pusher, dict[str, Connection]]) -> None:
    hub, _, c = fleet
    hub.subscribe(c["alice1"], ["DOG-1"], [])
    hub.subscribe(c["bob"], [], ["retail"])
    hub.subscribe(c["alice2"], [], [])
    assert hub.subscribers_of("DOG-1", "dance_dog") == {c["alice1"], c["alice2"]}
    assert hub.subscribers_of("RET-1", "retail") == {c["bob"], c["alice2"]}
    assert hub.unsubscribe(c["alice1"], ["DOG-1"], []) == 1
    assert hub.subscribers_of("DOG-1", "dance_dog") == {c["alice2"]}
    hub.remove(c["alice2"])
    assert hub.subscribers_of("DOG-1", "dance_dog") == set()


def test_remove_cleans_every_index(fleet: tuple[Hub, Pusher, dict[str, Connection]]) -> None:
    hub, _, c = fleet
    hub.subscribe(c["bob"], ["DOG-1"], ["retail"])
    for x in c.values():
        hub.remove(x)
    assert len(hub) == 0
    assert hub.counts() == {"device": 0, "ops": 0, "anon": 0}
    assert hub.online_by_type() == {}
    assert hub.subscribers_of("DOG-1", "retail") == set()


def test_slow_consumer_is_cut_and_fast_writes_coalesce() -> None:
    c = conn(hold=True, max_queue=3)
    s = sink(c)
    assert c.send(b"1")  # goes straight to the socket, stays in flight
    assert c.send(b"2") and c.send(b"3") and c.send(b"4")
    assert c.queue_depth == 3
    s.pending[0].resolve()  # the socket drained: everything queued goes out in one write
    assert s.data == [b"1", b"234"]
    assert c.send(b"5") and c.send(b"6") and c.send(b"7")
    assert not c.send(b"8")  # queue full while a write is stuck: cut as a slow consumer
    assert s.closed is not None and s.closed[0] == CLOSE_SLOW_CONSUMER
    assert c.closed and not c.send(b"9")


def test_close_flushes_queued_replies_first() -> None:
    c = conn(hold=True)
    s = sink(c)
    c.send(b"a")
    c.send(b"b")
    c.close(4409, "replaced")
    assert s.data == [b"a", b"b"] and s.closed == (4409, "replaced")
