"""The connection registry: sole owner of live connections and their indexes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .broker import Target
from .connection import Connection

log = logging.getLogger("fleetpush.hub")


def _index_add(index: dict[str, set[Connection]], key: str, conn: Connection) -> None:
    index.setdefault(key, set()).add(conn)


def _index_remove(index: dict[str, set[Connection]], key: str | None, conn: Connection) -> None:
    if key is None:
        return
    members = index.get(key)
    if members is not None:
        members.discard(conn)
        if not members:
            del index[key]


@dataclass(slots=True)
class Subscription:
    """What one ops connection watches: sns and/or types; both empty = every device."""

    sns: frozenset[str]
    types: frozenset[str]


class Hub:
    """Indexes connections by id, device sn, username, role, device type and subscription."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_sn: dict[str, Connection] = {}
        self._by_user: dict[str, set[Connection]] = {}
        self._by_role: dict[str, set[Connection]] = {}
        self._by_type: dict[str, set[Connection]] = {}
        self._devices: set[Connection] = set()
        self._ops: set[Connection] = set()
        self._subs: dict[Connection, list[Subscription]] = {}
        self._subs_all: set[Connection] = set()
        self._subs_sn: dict[str, set[Connection]] = {}
        self._subs_type: dict[str, set[Connection]] = {}
        self._removal_watchers: list[Callable[[Connection], None]] = []

    # ---------------------------------------------------------------- ownership

    def add(self, conn: Connection) -> None:
        """Register a new (not yet authenticated) connection."""
        self._by_id[conn.id] = conn

    def remove(self, conn: Connection) -> bool:
        """Drop a connection from every index; True when it was the device's current connection."""
        self._by_id.pop(conn.id, None)
        current = False
        if conn.sn is not None and self._by_sn.get(conn.sn) is conn:
            del self._by_sn[conn.sn]
            current = True
        _index_remove(self._by_type, conn.device_type, conn)
        _index_remove(self._by_user, conn.username, conn)
        _index_remove(self._by_role, conn.role, conn)
        self._devices.discard(conn)
        self._ops.discard(conn)
        self._drop_subscriptions(conn)
        conn.run_undo()
        for watcher in list(self._removal_watchers):
            watcher(conn)
        return current

    def watch_removals(self, fn: Callable[[Connection], None]) -> Callable[[], None]:
        """Call `fn` with every connection the hub drops; returns the undo."""
        self._removal_watchers.append(fn)
        return lambda: self._removal_watchers.remove(fn)

    def bind_device(self, conn: Connection, sn: str, type_: str) -> Connection | None:
        """Mark `conn` as device `sn`; returns the older connection of that sn, now unindexed."""
        old = self._by_sn.get(sn)
        if old is conn:
            return None
        if old is not None:
            # The old connection stays in _by_id until its close completes, but no push finds it.
            _index_remove(self._by_type, old.device_type, old)
            self._devices.discard(old)
        conn.kind, conn.sn, conn.device_type = "device", sn, type_
        self._by_sn[sn] = conn
        _index_add(self._by_type, type_, conn)
        self._devices.add(conn)
        return old

    def unbind_device(self, conn: Connection) -> None:
        """Undo bind_device for a login that failed half-way: the connection is anonymous again."""
        if conn.sn is not None and self._by_sn.get(conn.sn) is conn:
            del self._by_sn[conn.sn]
        _index_remove(self._by_type, conn.device_type, conn)
        self._devices.discard(conn)
        conn.kind, conn.sn, conn.device_type, conn.session_id = "anon", None, None, None

    def bind_ops(self, conn: Connection, username: str, role: str) -> None:
        """Mark `conn` as an ops connection of `username` with `role`."""
        _index_remove(self._by_user, conn.username, conn)
        _index_remove(self._by_role, conn.role, conn)
        conn.kind, conn.username, conn.role = "ops", username, role
        _index_add(self._by_user, username, conn)
        _index_add(self._by_role, role, conn)
        self._ops.add(conn)

    # ---------------------------------------------------------------- subscriptions

    def subscribe(self, conn: Connection, sns: Iterable[str], types: Iterable[str]) -> None:
        """Add a device subscription for an ops connection."""
        sub = Subscription(frozenset(sns), frozenset(types))
        self._subs.setdefault(conn, []).append(sub)
        self._reindex(conn)

    def unsubscribe(self, conn: Connection, sns: Iterable[str], types: Iterable[str]) -> int:
        """Remove subscriptions equal to the given one (both empty removes all); returns how many."""
        subs = self._subs.get(conn, [])
        s, t = frozenset(sns), frozenset(types)
        keep = [] if not s and not t else [x for x in subs if (x.sns, x.types) != (s, t)]
        removed = len(subs) - len(keep)
        self._subs[conn] = keep
        self._reindex(conn)
        return removed

    def _drop_subscriptions(self, conn: Connection) -> None:
        self._subs.pop(conn, None)
        self._subs_all.discard(conn)
        for index in (self._subs_sn, self._subs_type):
            for key in [k for k, v in index.items() if conn in v]:
                _index_remove(index, key, conn)

    def _reindex(self, conn: Connection) -> None:
        subs = self._subs.get(conn, [])
        self._subs_all.discard(conn)
        for index in (self._subs_sn, self._subs_type):
            for key in [k for k, v in index.items() if conn in v]:
                _index_remove(index, key, conn)
        if not subs:
            self._subs.pop(conn, None)
            return
        for sub in subs:
            if not sub.sns and not sub.types:
                self._subs_all.add(conn)
            for sn in sub.sns:
                _index_add(self._subs_sn, sn, conn)
            for t in sub.types:
                _index_add(self._subs_type, t, conn)

    def subscribers_of(self, sn: str, type_: str) -> set[Connection]:
        """Ops connections that watch this device."""
        out = set(self._subs_all)
        out.update(self._subs_sn.get(sn, ()))
        out.update(self._subs_type.get(type_, ()))
        return out

    # ---------------------------------------------------------------- reading

    def get(self, conn_id: str) -> Connection | None:
        """A connection by id."""
        return self._by_id.get(conn_id)

    def device(self, sn: str) -> Connection | None:
        """The current connection of a device."""
        return self._by_sn.get(sn)

    def user(self, username: str) -> set[Connection]:
        """Every connection of a user."""
        return set(self._by_user.get(username, ()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def counts(self) -> dict[str, int]:
        """Connections by kind."""
        anon = len(self._by_id) - len(self._devices) - len(self._ops)
        return {"device": len(self._devices), "ops": len(self._ops), "anon": max(anon, 0)}

    def online_by_type(self) -> dict[str, int]:
        """Connected devices per type."""
        return {t: len(c) for t, c in self._by_type.items()}

    def where(self, predicate: Callable[[Connection], bool]) -> list[Connection]:
        """Authenticated connections for which `predicate` holds (BroadcastByCondition)."""
        return [c for c in (*self._devices, *self._ops) if predicate(c)]

    def select(self, target: Target) -> list[Connection]:
        """The local connections a target names; see Target for the semantics."""
        if target.subscribers_of is not None:
            sn, type_ = target.subscribers_of
            return [c for c in self.subscribers_of(sn, type_) if not c.closed]
        # Start from the smallest index the target names, then filter by the rest.
        pool: Iterable[Connection]
        if target.conn_ids is not None:
            pool = [c for c in (self._by_id.get(i) for i in target.conn_ids) if c is not None and c.authenticated]
        elif target.sns is not None:
            pool = [c for c in (self._by_sn.get(s) for s in target.sns) if c is not None]
        elif target.usernames is not None:
            pool = [c for u in target.usernames for c in self._by_user.get(u, ())]
        elif target.types is not None and target.kind != "ops":
            pool = [c for t in target.types for c in self._by_type.get(t, ())]
        elif target.roles is not None:
            pool = [c for r in target.roles for c in self._by_role.get(r, ())]
        elif target.kind == "device":
            pool = self._devices
        elif target.kind == "ops":
            pool = self._ops
        else:
            pool = (*self._devices, *self._ops)
        return [c for c in pool if not c.closed and _matches(target, c)]


def _matches(t: Target, c: Connection) -> bool:
    if t.kind is not None and c.kind != t.kind:
        return False
    if t.sns is not None and c.sn not in t.sns:
        return False
    if t.types is not None and c.device_type not in t.types:
        return False
    if t.usernames is not None and c.username not in t.usernames:
        return False
    if t.roles is not None and c.role not in t.roles:
        return False
    return not (t.conn_ids is not None and c.id not in t.conn_ids)
