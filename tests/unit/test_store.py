"""Store tests, written once and run on the embedded engine and (when configured) a real MongoDB."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import mongo_store_settings

from core.config import StoreSettings
from core.errors import ServiceError, StoreUnavailable
from core.store import Store

T0 = datetime(2027, 1, 15, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=mongo_store_settings())
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A fresh store with its indexes, on the embedded engine or on FLEETPUSH_TEST_MONGO_URL."""
    url = "" if request.param == "embedded" else str(request.param)
    db = f"fleetpush_test_{uuid.uuid4().hex[:12]}"
    s = Store(StoreSettings(mongo_url=url, database=db, server_selection_timeout_s=2, op_timeout_s=3))
    await s.ensure_indexes()
    try:
        yield s
    finally:
        if url:
            await s._client.drop_database(db)
        await s.close()


def command(cid: str, sn: str = "R-1", created: datetime = T0, ttl_s: int = 300, **kw: Any) -> dict[str, Any]:
    """A command document as the outbox stores it."""
    doc: dict[str, Any] = {
        "command_id": cid, "sn": sn, "command": "dance", "args": {}, "state": "pending",
        "created_at": created, "sent_at": None, "acked_at": None,
        "expires_at": created + timedelta(seconds=ttl_s), "attempts": 0, "next_attempt_at": None,
        "result": None, "issued_by": "admin",
    }
    doc.update(kw)
    return doc


async def test_ping_and_indexes_can_be_ensured_twice(store: Store) -> None:
    assert await store.ping() is True
    store.indexes_ready = False
    await store.ensure_indexes()
    assert store.indexes_ready


async def test_devices_are_unique_by_sn_and_listed_without_secrets(store: Store) -> None:
    assert await store.create_device("B-2", "retail", "two", "s3cret", T0)
    assert await store.create_device("A-1", "dance_dog", "one", None, T0)
    assert not await store.create_device("B-2", "retail", "again", "other", T0)
    listed = await store.list_devices()
    assert [d["sn"] for d in listed] == ["A-1", "B-2"]
    assert all("secret" not in d for d in listed)
    assert [d["sn"] for d in await store.list_devices(type_="retail")] == ["B-2"]
    assert await store.list_devices(online=True) == []
    got = await store.get_device("B-2")
    assert got is not None and got["secret"] == "s3cret" and got["name"] == "two"
    assert await store.get_device("nope") is None
    assert await store.set_device_secret("B-2", "new")
    assert not await store.set_device_secret("nope", "new")
    got = await store.get_device("B-2")
    assert got is not None and got["secret"] == "new"


async def test_presence_is_per_node(store: Store) -> None:
    for sn in ("A", "B", "C"):
        await store.create_device(sn, "retail", sn, None, T0)
    await store.mark_online("A", "retail", "node-1", T0, "2.0")
    await store.mark_online("B", "retail", "node-1", T0, None)
    await store.mark_online("C", "retail", "node-2", T0, None)
    a = await store.get_device("A")
    assert a is not None and a["online"] and a["node"] == "node-1" and a["firmware"] == "2.0"
    assert a["connected_at"] == T0 and a["connected_at"].tzinfo is not None
    # Another node cannot take a device offline that it does not hold.
    assert not await store.mark_offline("A", "node-2", "closed", T0)
    assert await store.mark_offline("A", "node-1", "closed", T0 + timedelta(seconds=5))
    assert not await store.mark_offline("A", "node-1", "closed", T0)
    a = await store.get_device("A")
    assert a is not None and not a["online"] and a["offline_reason"] == "closed"
    assert a["last_seen"] == T0 + timedelta(seconds=5)
    left = await store.mark_node_offline("node-1", "restart", T0)
    assert [d["sn"] for d in left] == ["B"]
    assert [d["sn"] for d in await store.list_devices(online=True)] == ["C"]
    b = await store.get_device("B")
    assert b is not None and b["offline_reason"] == "restart"


async def test_status_history_newest_first_with_window_and_limit(store: Store) -> None:
    await store.create_device("R-1", "retail", "r", None, T0)
    await store.create_device("R-2", "retail", "r", None, T0)
    snaps = [
        {"sn": "R-1" if i % 2 == 0 else "R-2", "type": "retail", "ts": T0 + timedelta(seconds=i), "battery": float(i)}
        for i in range(10)
    ]
    await store.insert_status(snaps)
    hist = await store.history("R-1", None, None, 500)
    assert [h["battery"] for h in hist] == [8.0, 6.0, 4.0, 2.0, 0.0]
    assert all("_id" not in h for h in hist)
    assert hist[0]["ts"] == T0 + timedelta(seconds=8) and hist[0]["ts"].tzinfo is not None
    window = await store.history("R-1", T0 + timedelta(seconds=2), T0 + timedelta(seconds=6), 500)
    assert [h["battery"] for h in window] == [6.0, 4.0, 2.0]
    assert [h["battery"] for h in await store.history("R-1", None, None, 2)] == [8.0, 6.0]
    assert await store.history("R-3", None, None, 10) == []
    # The device's latest status and last_seen follow the newest snapshot of the batch.
    dev = await store.get_device("R-2")
    assert dev is not None and dev["status"]["battery"] == 9.0 and dev["last_seen"] == T0 + timedelta(seconds=9)
    assert "sn" not in dev["status"] and dev["status"]["ts"] == T0 + timedelta(seconds=9)


async def test_snapshots_are_stored_as_mongodb_stores_them(store: Store) -> None:
    # Millisecond precision, UTC, nested values intact, and a copy: the caller's dict changing
    # afterwards (the monitor reuses values for the push) must not change what was stored.
    await store.create_device("R-1", "retail", "r", None, T0)
    ts = datetime(2027, 1, 15, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    snap = {"sn": "R-1", "type": "retail", "ts": ts, "location": {"code": 0, "message": "aisle 4"},
            "extra": {"path": [[1.5, 2.0], [3.25, 4.0]], "tags": ["a", "b"]}}
    await store.insert_status([snap], checked=True)
    snap["location"]["message"] = "changed"
    snap["extra"]["path"].append([9.0, 9.0])
    (hist,) = await store.history("R-1", None, None, 10)
    assert hist["ts"] == datetime(2027, 1, 15, 12, 0, 0, 123000, tzinfo=UTC) and hist["ts"].utcoffset() == timedelta(0)
    assert hist["location"] == {"code": 0, "message": "aisle 4"}
    assert hist["extra"] == {"path": [[1.5, 2.0], [3.25, 4.0]], "tags": ["a", "b"]}
    dev = await store.get_device("R-1")
    assert dev is not None and dev["status"]["location"]["message"] == "aisle 4"
    assert dev["last_seen"] == hist["ts"] and dev["status"]["ts"] == hist["ts"]
    # A report for a device that was never registered is kept in history but creates no device.
    await store.insert_status([{"sn": "GHOST", "type": "retail", "ts": T0}])
    assert await store.get_device("GHOST") is None
    assert len(await store.history("GHOST", None, None, 10)) == 1


async def test_values_bson_cannot_hold_are_rejected_as_bad_input_not_outage(store: Store) -> None:
    await store.create_device("R-1", "retail", "r", None, T0)
    for bad in ({"x": 2**70}, {"a\x00b": 1}):
        with pytest.raises(ServiceError) as err:
            await store.insert_command(command("c-bad", args=bad))
        assert err.value.code == 400 and not isinstance(err.value, StoreUnavailable)
        with pytest.raises(ServiceError) as err:
            await store.insert_status([{"sn": "R-1", "type": "retail", "ts": T0, "extra": bad}])
        assert err.value.code == 400
    assert await store.get_command("c-bad") is None
    assert await store.history("R-1", None, None, 10) == []


async def test_command_ids_and_idempotency_keys_are_unique(store: Store) -> None:
    assert await store.insert_command(command("c-1")) is None
    assert await store.insert_command(command("c-2")) is None  # no key: never collides
    dup = await store.insert_command(command("c-1", command="other"))
    assert dup is not None and dup["command"] == "dance"
    assert await store.insert_command(command("c-3", idempotency_key="k")) is None
    again = await store.insert_command(command("c-4", idempotency_key="k"))
    assert again is not None and again["command_id"] == "c-3"
    # The same key on another device is another command.
    assert await store.insert_command(command("c-5", sn="R-2", idempotency_key="k")) is None
    found = await store.find_idempotent("R-1", "k")
    assert found is not None and found["command_id"] == "c-3"
    await store.release_idempotency_key("R-1", "k", T0 + timedelta(seconds=1))
    assert await store.find_idempotent("R-1", "k") is None
    assert await store.insert_command(command("c-6", idempotency_key="k")) is None


async def test_transitions_only_move_forward(store: Store) -> None:
    await store.insert_command(command("c-1"))
    sent = await store.transition("c-1", ("pending", "sent"), {"state": "sent", "sent_at": T0}, inc_attempts=True)
    assert sent is not None and sent["state"] == "sent" and sent["attempts"] == 1 and "_id" not in sent
    acked = await store.transition("c-1", ("pending", "sent"), {"state": "acked", "acked_at": T0})
    assert acked is not None and acked["state"] == "acked"
    assert await store.transition("c-1", ("pending", "sent"), {"state": "canceled"}) is None
    assert await store.transition("c-unknown", ("pending", "sent"), {"state": "canceled"}) is None
    got = await store.get_command("c-1")
    assert got is not None and got["state"] == "acked" and got["attempts"] == 1


async def test_open_due_and_expired_commands(store: Store) -> None:
    await store.insert_command(command("c-new", created=T0 + timedelta(seconds=20)))
    await store.insert_command(command("c-old", created=T0))
    await store.insert_command(command("c-short", created=T0 + timedelta(seconds=10), ttl_s=5))
    await store.insert_command(command("c-other", sn="R-2", created=T0))
    await store.insert_command(command("c-done", created=T0, state="acked"))
    await store.transition("c-old", ("pending",), {"state": "sent", "next_attempt_at": T0 + timedelta(seconds=30)})
    now = T0 + timedelta(seconds=25)
    assert [c["command_id"] for c in await store.open_commands("R-1", now)] == ["c-old", "c-new"]
    assert await store.due_commands(now) == []
    due = await store.due_commands(T0 + timedelta(seconds=30))
    assert [c["command_id"] for c in due] == ["c-old"]
    assert [c["command_id"] for c in await store.expired_commands(now)] == ["c-short"]
    listed = await store.list_commands("R-1", None)
    assert [c["command_id"] for c in listed] == ["c-new", "c-short", "c-old", "c-done"]
    assert [c["command_id"] for c in await store.list_commands(None, "sent")] == ["c-old"]
    counts = await store.count_commands()
    assert counts["pending"] == 3 and counts["sent"] == 1 and counts["acked"] == 1 and counts["failed"] == 0


async def test_users_sessions_and_replay_cache(store: Store) -> None:
    assert await store.create_user("ann", "h1", "viewer", T0)
    assert not await store.create_user("ann", "h2", "admin", T0)
    await store.set_password("ann", "h3")
    user = await store.get_user("ann")
    assert user is not None and user["password_hash"] == "h3" and user["role"] == "viewer"
    await store.create_session("hash-1", "ann", "viewer", T0)
    sess = await store.get_session("hash-1")
    assert sess is not None and sess["username"] == "ann" and sess["expires_at"] == T0
    assert await store.get_session("hash-2") is None
    assert await store.claim_token("R-1", 1700000000, T0)
    assert not await store.claim_token("R-1", 1700000000, T0)
    assert await store.claim_token("R-1", 1700000001, T0)


async def test_audit_newest_first_with_filters(store: Store) -> None:
    for i, (actor, action) in enumerate([("ann", "a.x"), ("bob", "a.x"), ("ann", "a.y")]):
        await store.insert_audit({"ts": T0 + timedelta(seconds=i), "actor": actor, "action": action,
                                  "target": "t", "outcome": "ok", "detail": {}})
    assert [e["action"] for e in await store.list_audit(None, "ann", None)] == ["a.y", "a.x"]
    assert [e["actor"] for e in await store.list_audit(None, None, "a.x")] == ["bob", "ann"]
    assert [e["actor"] for e in await store.list_audit(T0 + timedelta(seconds=1), None, None)] == ["ann", "bob"]
    assert len(await store.list_audit(None, None, None, limit=2)) == 2


async def test_adopting_a_fleet_registered_device_happens_once(store: Store) -> None:
    await store.create_device("R-1", "retail", "R-1", None, T0)
    await store.create_device("R-2", "retail", "R-2", "own", T0)
    assert await store.adopt_device("R-1", "dance_dog", "Rex", "s1")
    assert not await store.adopt_device("R-1", "retail", "x", "s2")
    assert not await store.adopt_device("R-2", "retail", "x", "s3")
    assert not await store.adopt_device("R-3", "retail", "x", "s4")
    r1 = await store.get_device("R-1")
    assert r1 is not None and (r1["secret"], r1["type"], r1["name"]) == ("s1", "dance_dog", "Rex")
    await store.mark_online("R-1", "dance_dog", "n", T0, None)
    await store.mark_offline("R-1", "n", "closed", T0)
    await store.mark_online("R-1", "dance_dog", "n", T0, None)
    r1 = await store.get_device("R-1")
    assert r1 is not None and r1["online"] and r1["offline_reason"] is None


async def test_indexes_can_be_ensured_again_over_existing_data(store: Store) -> None:
    # A restarted app on the same database runs ensure_indexes again over commands with and without keys.
    await store.insert_command(command("c-1"))
    await store.insert_command(command("c-2"))
    await store.insert_command(command("c-3", idempotency_key="k"))
    again = Store(store.settings, client=store._client)
    await again.ensure_indexes()
    assert again.indexes_ready
    assert await again.insert_command(command("c-4", idempotency_key="k")) is not None
