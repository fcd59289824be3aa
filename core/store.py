"""The only module that knows MongoDB: collections, indexes, queries, and error mapping."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import bson
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from . import eager
from .config import StoreSettings
from .errors import ServiceError, StoreUnavailable

log = logging.getLogger("fleetpush.store")
T = TypeVar("T")
Doc = dict[str, Any]

FINAL_STATES = ("acked", "failed", "expired", "canceled")
OPEN_STATES = ("pending", "sent")


def _aware(doc: Doc | None) -> Doc | None:
    # pymongo (tz_aware) and mongomock disagree on tzinfo classes; normalise to datetime.UTC.
    if doc is None:
        return None
    for key, value in doc.items():
        if isinstance(value, datetime):
            doc[key] = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        elif isinstance(value, dict):
            _aware(value)
    return doc


class Unstorable(ServiceError):
    """A value BSON cannot hold (an integer over 8 bytes, a NUL in a key ...): bad input, replied as 400."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(400, "invalid values", errors=[{"field": field, "msg": f"cannot be stored: {why}"}])


def check_storable(doc: Mapping[str, Any], field: str = "values") -> None:
    """Raise Unstorable unless `doc` encodes as BSON; callers check user data before it reaches a batch."""
    try:
        bson.encode(doc)
    except (InvalidDocument, OverflowError) as exc:
        raise Unstorable(field, str(exc)) from None


_fast_ids_installed = False


def _install_id_fast_path() -> None:
    # mongomock answers every query by scanning and matching every document of the collection,
    # so looking a device up among 10k cost ~10k Python-level matches. Queries on a plain `_id`
    # (how devices, commands and users are keyed here) go straight to its dict instead; every
    # other query keeps mongomock's own path. MongoDB itself serves these from the _id index.
    global _fast_ids_installed
    if _fast_ids_installed:
        return
    from mongomock import filtering
    from mongomock.collection import Collection

    filter_applies: Any = filtering.filter_applies
    original: Any = Collection._iter_documents

    def iter_documents(self: Any, filter: Any) -> Any:
        if isinstance(filter, dict) and "_id" in filter:
            key = filter["_id"]
            if isinstance(key, str):
                store = self._store
                doc = store._documents.get(key) if not store._ttl_indexes else None
                if doc is not None or not store._ttl_indexes:
                    return iter([doc] if doc is not None and filter_applies(filter, doc) else [])
        return original(self, filter)

    Collection._iter_documents = iter_documents  # type: ignore[method-assign]
    _fast_ids_installed = True


def _latest_of(snapshot: Doc) -> Doc:
    return {k: v for k, v in snapshot.items() if k not in ("sn", "type", "_id")}


_ATOMIC = frozenset((str, int, float, bool, type(None)))


def _mongo_value(value: Any) -> Any:
    # What mongomock stores for a value: a deep copy with datetimes naive UTC at millisecond
    # precision (MongoDB's own). Status values come from JSON, so this meets dicts, lists, scalars.
    t = type(value)
    if t is dict:
        return {k: v if type(v) in _ATOMIC else _mongo_value(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) in _ATOMIC else _mongo_value(v) for v in value]
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = (value - value.utcoffset()).replace(tzinfo=None)  # type: ignore[operator]
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, dict):  # a dict subclass
        return {k: _mongo_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mongo_value(v) for v in value]
    return value


# Ids of status snapshots on the embedded engine: a random prefix per process and a counter, as
# unique as an ObjectId and a string (see _write_status_embedded), at a fraction of the cost.
_SNAP_PREFIX = secrets.token_hex(6)
_snap_seq = itertools.count(1)
_mock_collection: Any = None


def _latest_by_sn(snapshots: list[Doc]) -> dict[str, Doc]:
    # The newest snapshot of each device in a batch (they come oldest first).
    return {s["sn"]: s for s in snapshots}


def _write_status_embedded(status: Any, devices: Any, snapshots: list[Doc]) -> bool:
    """Embedded engine: write snapshots and latest status straight into mongomock's collection stores.

    The status ingest path writes every report a fleet sends (5k/s at 5k devices); through
    mongomock's insert/update that cost ~150 us per report in validation, version checks and
    repeated deep copies, more than the rest of the request. The documents stored here are the
    ones mongomock would store (tests read them back through its normal query path). Returns False,
    and leaves the write to mongomock, when a unique or TTL index would need checking.
    """
    global _mock_collection
    if _mock_collection is None:
        from mongomock_motor import AsyncMongoMockCollection

        _mock_collection = AsyncMongoMockCollection
    if type(status) is not _mock_collection or type(devices) is not _mock_collection:
        return False  # wrapped (a test's fault injection, say): every write goes through the driver
    sstore, dstore = status._store, devices._store
    # A TTL index hides expired documents from reads; a unique one on status would need checking.
    if sstore._ttl_indexes or dstore._ttl_indexes or (sstore.indexes and _has_unique(sstore.indexes)):
        return False
    # mongomock's reader/writer lock is not taken: every call into the embedded engine runs on the
    # event loop's thread (mongomock-motor calls mongomock inline), so nothing can contend for it.
    docs = sstore._documents
    for snap in snapshots:
        doc = _mongo_value(snap)
        # A string id, not an ObjectId: a document of strings, numbers, datetimes and dicts of
        # those is never tracked by the garbage collector, so a history of millions of snapshots
        # adds nothing to its full collections (an ObjectId would make each one tracked).
        oid = doc["_id"] = f"{_SNAP_PREFIX}{next(_snap_seq):010x}"
        docs[oid] = doc
    devs = dstore._documents
    for sn, snap in _latest_by_sn(snapshots).items():
        device = devs.get(sn)
        if device is not None:  # as update_one without upsert: an unknown device is not created
            device["status"] = _mongo_value(_latest_of(snap))
            device["last_seen"] = _mongo_value(snap["ts"])
    return True


def _has_unique(indexes: dict[str, Any]) -> bool:
    return any(ix.get("unique") for ix in indexes.values())


class Store:
    """Async access to fleetpush's collections on MongoDB or the embedded engine."""

    def __init__(self, settings: StoreSettings, client: Any = None) -> None:
        self.settings = settings
        self.embedded = not settings.mongo_url
        if client is not None:
            self._client = client
        elif self.embedded:
            from mongomock_motor import AsyncMongoMockClient

            self._client = AsyncMongoMockClient(tz_aware=True)
            _install_id_fast_path()
        else:
            from pymongo import AsyncMongoClient

            ms = int(settings.server_selection_timeout_s * 1000)
            self._client = AsyncMongoClient(
                settings.mongo_url,
                tz_aware=True,
                serverSelectionTimeoutMS=ms,
                connectTimeoutMS=ms,
                timeoutMS=int(settings.op_timeout_s * 1000),
                appname="fleetpush",
            )
        db = self._client[settings.database]
        self.db = db
        self.devices = db["devices"]
        self.status = db["status"]
        self.commands = db["commands"]
        self.users = db["users"]
        self.sessions = db["sessions"]
        self.audit_log = db["audit"]
        self.replay = db["replay"]
        self.indexes_ready = False
        self._orphans: set[asyncio.Future[Any]] = set()
        self.failed_at: float | None = None  # time.monotonic() of the latest failed call, None after a success

    def share(self) -> Store:
        """A second Store over the same client and data (a restarted app on the same database)."""
        other = Store(self.settings, client=self._client)
        # The indexes live with the data. Creating them again is harmless on MongoDB, but mongomock
        # checks a unique index against existing documents ignoring partialFilterExpression, so a
        # second ensure_indexes failed with DuplicateKeyError once two commands had no idempotency key.
        other.indexes_ready = self.indexes_ready
        return other

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        # Every driver call goes through here so a dead or silent server becomes a quick 503,
        # never a hang: the driver's own timeouts, bounded again by op_timeout_s.
        try:
            bound = self.settings.op_timeout_s + 0.5
            if self.embedded:
                async with eager.timeout(bound):
                    result = await fn()
            else:
                result = await self._bounded(fn, bound)
            self.failed_at = None
            return result
        except DuplicateKeyError:
            self.failed_at = None
            raise
        except (InvalidDocument, OverflowError) as exc:
            # The driver refused the document before sending it: the input is at fault, not the store.
            raise Unstorable("values", str(exc)) from None
        except (PyMongoError, TimeoutError, OSError) as exc:
            self.failed_at = time.monotonic()
            log.warning("store operation %s failed: %s", op, type(exc).__name__)
            raise StoreUnavailable(f"storage unavailable ({op})") from exc

    def just_failed(self) -> bool:
        """True when the latest store call failed for want of the store (within the selection timeout).

        Best-effort writers (the audit trail) skip their write then, so an action that already waited
        out one store timeout does not wait out a second one just to log that it failed.
        """
        at = self.failed_at
        return at is not None and time.monotonic() - at < self.settings.server_selection_timeout_s + 0.5

    async def _update_one(self, op: str, flt: Doc, upd: Doc) -> None:
        await self._call(op, lambda: self.devices.update_one(flt, upd))

    async def _count(self, flt: Doc) -> int:
        return int(await self._call("count_commands", lambda: self.commands.count_documents(flt)))

    # ---------------------------------------------------------------- lifecycle

    async def ping(self) -> bool:
        """True when the store answers within its timeout."""
        try:
            await self._call("ping", lambda: self._client.admin.command("ping"))
            return True
        except StoreUnavailable:
            return False

    async def ensure_indexes(self) -> None:
        """Create collections and indexes; safe to call again until it succeeds."""
        if self.indexes_ready:
            return
        retention = self.settings.status_retention_days * 86400

        async def create() -> None:
            if not self.embedded:
                try:
                    await self.db.create_collection(
                        "status",
                        timeseries={"timeField": "ts", "metaField": "sn", "granularity": "seconds"},
                        expireAfterSeconds=retention,
                    )
                except OperationFailure as exc:
                    if exc.code != 48:  # 48: NamespaceExists
                        raise
            await self.devices.create_index([("type", ASCENDING), ("online", ASCENDING)])
            await self.devices.create_index("node")
            await self.status.create_index([("sn", ASCENDING), ("ts", DESCENDING)])
            await self.commands.create_index([("sn", ASCENDING), ("state", ASCENDING), ("created_at", ASCENDING)])
            await self.commands.create_index([("state", ASCENDING), ("next_attempt_at", ASCENDING)])
            try:
                await self.commands.create_index(
                    [("sn", ASCENDING), ("idempotency_key", ASCENDING)],
                    unique=True,
                    partialFilterExpression={"idempotency_key": {"$type": "string"}},
                )
            except DuplicateKeyError:
                # mongomock checks a new unique index against the documents already there, ignoring the
                # partial filter, so two commands without a key "collide" when the index is created again
                # over existing data (a restarted app). MongoDB honours the filter and never gets here.
                if not self.embedded:
                    raise
            if not self.embedded:
                await self.sessions.create_index("expires_at", expireAfterSeconds=0)
                await self.replay.create_index("expires_at", expireAfterSeconds=0)
            await self.audit_log.create_index([("ts", DESCENDING)])
            await self.audit_log.create_index([("actor", ASCENDING), ("ts", DESCENDING)])

        await self._call("ensure_indexes", create)
        self.indexes_ready = True

    async def purge_expired(self, now: datetime) -> int:
        """Embedded engine only: apply retention and expiry that MongoDB's TTL indexes do by themselves."""
        if not self.embedded:
            return 0
        cutoff = now - timedelta(days=self.settings.status_retention_days)
        removed = 0
        for coll, flt in (
            (self.status, {"ts": {"$lt": cutoff}}),
            (self.sessions, {"expires_at": {"$lt": now}}),
            (self.replay, {"expires_at": {"$lt": now}}),
        ):
            removed += await self._delete_many(coll, flt)
        return removed

    async def _delete_many(self, coll: Any, flt: Doc) -> int:
        res = await self._call("purge", lambda: coll.delete_many(flt))
        return int(res.deleted_count)

    async def _bounded(self, fn: Callable[[], Awaitable[T]], bound: float) -> T:
        # PyMongo's async client must not be cancelled mid-operation: a cancel inside server
        # selection left its topology lock unusable ("Lock is not acquired") and close() hung.
        # So the caller stops waiting at the bound, and the operation is left to end by the
        # driver's own timeouts (serverSelectionTimeoutMS, timeoutMS), kept referenced meanwhile.
        task: asyncio.Future[T] = asyncio.ensure_future(fn())
        try:
            done, _ = await asyncio.wait({task}, timeout=bound)
        except asyncio.CancelledError:  # the caller gave up (a stop): the operation is left to end too
            self._adopt(task)
            raise
        if not done:
            self._adopt(task)
            raise TimeoutError(f"store operation still running after {bound:g} s")
        return task.result()

    def _adopt(self, task: asyncio.Future[Any]) -> None:
        self._orphans.add(task)
        task.add_done_callback(self._orphan_done)

    def _orphan_done(self, task: asyncio.Future[Any]) -> None:
        self._orphans.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned operation's error was already reported as a 503

    async def close(self) -> None:
        """Close the driver's connections, without hanging on a server that does not answer."""
        closer = getattr(self._client, "close", None)
        if closer is not None and not self.embedded:
            try:
                async with eager.timeout(self.settings.op_timeout_s + self.settings.server_selection_timeout_s):
                    await closer()
            except TimeoutError:
                log.warning("store client did not close in time; dropping it")
        if self._orphans:
            # Operations abandoned at their bound end now that the client is closed; wait briefly so
            # their errors are collected here, not reported as "never retrieved" when the loop ends.
            await asyncio.wait(set(self._orphans), timeout=1.0)

    # ---------------------------------------------------------------- users and sessions

    async def get_user(self, username: str) -> Doc | None:
        """The user document, or None."""
        return _aware(await self._call("get_user", lambda: self.users.find_one({"_id": username})))

    async def create_user(self, username: str, password_hash: str, role: str, now: datetime) -> bool:
        """Insert a user; False when the username exists."""
        doc = {"_id": username, "username": username, "password_hash": password_hash, "role": role, "created_at": now}
        try:
            await self._call("create_user", lambda: self.users.insert_one(doc))
            return True
        except DuplicateKeyError:
            return False

    async def set_password(self, username: str, password_hash: str) -> None:
        """Replace a user's password hash (rehash on login when parameters change)."""
        await self._call(
            "set_password",
            lambda: self.users.update_one({"_id": username}, {"$set": {"password_hash": password_hash}}),
        )

    async def create_session(self, token_hash: str, username: str, role: str, expires_at: datetime) -> None:
        """Store an ops session by the hash of its token (the token itself is never stored)."""
        doc = {"_id": token_hash, "username": username, "role": role, "expires_at": expires_at}
        await self._call("create_session", lambda: self.sessions.insert_one(doc))

    async def get_session(self, token_hash: str) -> Doc | None:
        """The session for a token hash, or None."""
        return _aware(await self._call("get_session", lambda: self.sessions.find_one({"_id": token_hash})))

    # ---------------------------------------------------------------- replay cache

    async def claim_token(self, sn: str, timestamp: int, expires_at: datetime) -> bool:
        """Record (sn, timestamp) as used; False when it was already used (a replay)."""
        doc = {"_id": f"{sn}:{timestamp}", "expires_at": expires_at}
        try:
            await self._call("claim_token", lambda: self.replay.insert_one(doc))
            return True
        except DuplicateKeyError:
            return False

    # ---------------------------------------------------------------- devices

    async def get_device(self, sn: str) -> Doc | None:
        """The device document (secret included: callers must not expose it), or None."""
        return _aware(await self._call("get_device", lambda: self.devices.find_one({"_id": sn}, {"_id": 0})))

    async def create_device(self, sn: str, type_: str, name: str, secret: str | None, now: datetime) -> bool:
        """Insert a device; False when the sn exists."""
        doc: Doc = {
            "_id": sn, "sn": sn, "type": type_, "name": name, "secret": secret, "online": False,
            "last_seen": None, "connected_at": None, "node": None, "status": {}, "created_at": now,
        }
        try:
            await self._call("create_device", lambda: self.devices.insert_one(doc))
            return True
        except DuplicateKeyError:
            return False

    async def set_device_secret(self, sn: str, secret: str) -> bool:
        """Replace a device's secret; False when the device is unknown."""
        res = await self._call(
            "set_device_secret", lambda: self.devices.update_one({"_id": sn}, {"$set": {"secret": secret}})
        )
        return bool(res.matched_count)

    async def adopt_device(self, sn: str, type_: str, name: str, secret: str) -> bool:
        """Provision a device that registered through the fleet secret; False unless it had no secret.

        One atomic update, so of two concurrent provisionings only one wins and its secret is the one kept.
        """
        res = await self._call(
            "adopt_device",
            lambda: self.devices.update_one(
                {"sn": sn, "secret": {"$in": [None, ""]}},
                {"$set": {"secret": secret, "type": type_, "name": name}},
            ),
        )
        return bool(res.matched_count)

    async def list_devices(self, type_: str | None = None, online: bool | None = None) -> list[Doc]:
        """Devices matching the filters, by sn, without secrets."""
        query: Doc = {}
        if type_ is not None:
            query["type"] = type_
        if online is not None:
            query["online"] = online
        docs = await self._call(
            "list_devices",
            lambda: self.devices.find(query, {"_id": 0, "secret": 0}).sort("sn", ASCENDING).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

    async def mark_online(self, sn: str, type_: str, node: str, now: datetime, firmware: str | None) -> None:
        """Set a device online on this node."""
        fields: Doc = {
            "online": True, "node": node, "connected_at": now, "last_seen": now, "type": type_, "offline_reason": None,
        }
        if firmware:
            fields["firmware"] = firmware
        await self._call("mark_online", lambda: self.devices.update_one({"_id": sn}, {"$set": fields}))

    async def mark_offline(self, sn: str, node: str, reason: str, now: datetime) -> bool:
        """Set a device offline, only if this node still holds it; True when it changed."""
        res = await self._call(
            "mark_offline",
            lambda: self.devices.update_one(
                {"_id": sn, "node": node, "online": True},
                {"$set": {"online": False, "offline_reason": reason, "last_seen": now}},
            ),
        )
        return bool(res.modified_count)

    async def mark_node_offline(self, node: str, reason: str, now: datetime) -> list[Doc]:
        """Set every device this node had online offline; returns those devices."""
        docs = await self._call(
            "node_devices",
            lambda: self.devices.find({"node": node, "online": True}, {"_id": 0, "sn": 1, "type": 1}).to_list(None),
        )
        if docs:
            await self._call(
                "mark_node_offline",
                lambda: self.devices.update_many(
                    {"node": node, "online": True},
                    {"$set": {"online": False, "offline_reason": reason, "last_seen": now}},
                ),
            )
        return list(docs)

    # ---------------------------------------------------------------- status

    def insert_status_now(self, snapshots: list[Doc]) -> bool:
        """Embedded engine: store already-checked snapshots at once, without waiting; False when it cannot.

        In memory a write costs less than batching it would (a future, a task and a timer per report),
        so the monitor writes each report inline; on MongoDB it group-commits with insert_status."""
        if not (self.embedded and snapshots):
            return False
        return _write_status_embedded(self.status, self.devices, snapshots)

    async def insert_status(self, snapshots: list[Doc], *, checked: bool = False) -> None:
        """Store snapshots and move each device's latest status and last_seen forward.

        `checked=True`: the caller already ran check_storable on each snapshot (the monitor does, so one
        bad report fails alone, not its batch), and it is not run twice."""
        if not snapshots:
            return
        if not checked:
            for snap in snapshots:
                check_storable(snap, "extra")
        if self.insert_status_now(snapshots):
            return
        docs = [dict(s) for s in snapshots]
        await self._call("insert_status", lambda: self.status.insert_many(docs, ordered=False))
        ops = [
            ({"_id": sn}, {"$set": {"status": _latest_of(s), "last_seen": s["ts"]}})
            for sn, s in _latest_by_sn(snapshots).items()
        ]
        if self.embedded:
            # mongomock's bulk_write does not accept current pymongo operation objects.
            for flt, upd in ops:
                await self._update_one("update_latest", flt, upd)
        else:
            await self._call(
                "update_latest",
                lambda: self.devices.bulk_write([UpdateOne(f, u) for f, u in ops], ordered=False),
            )

    async def history(
        self, sn: str, since: datetime | None, until: datetime | None, limit: int
    ) -> list[Doc]:
        """Snapshots of one device, newest first."""
        query: Doc = {"sn": sn}
        span: Doc = {}
        if since is not None:
            span["$gte"] = since
        if until is not None:
            span["$lte"] = until
        if span:
            query["ts"] = span
        docs = await self._call(
            "history",
            lambda: self.status.find(query, {"_id": 0}).sort("ts", DESCENDING).limit(limit).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

    # ---------------------------------------------------------------- commands

    async def insert_command(self, doc: Doc) -> Doc | None:
        """Store a new command; on a duplicate command_id or idempotency key, return the existing one."""
        check_storable(doc, "args")
        try:
            await self._call("insert_command", lambda: self.commands.insert_one({"_id": doc["command_id"], **doc}))
            return None
        except DuplicateKeyError:
            existing = await self.get_command(doc["command_id"])
            if existing is None and doc.get("idempotency_key"):
                existing = await self.find_idempotent(doc["sn"], doc["idempotency_key"])
            return existing

    async def get_command(self, command_id: str) -> Doc | None:
        """One command, or None."""
        return _aware(
            await self._call("get_command", lambda: self.commands.find_one({"_id": command_id}, {"_id": 0}))
        )

    async def find_idempotent(self, sn: str, key: str) -> Doc | None:
        """The command created for this device with this idempotency key, or None."""
        return _aware(
            await self._call(
                "find_idempotent",
                lambda: self.commands.find_one({"sn": sn, "idempotency_key": key}, {"_id": 0}),
            )
        )

    async def release_idempotency_key(self, sn: str, key: str, before: datetime) -> None:
        """Forget an idempotency key older than the window, so the key can be used again."""
        await self._call(
            "release_key",
            lambda: self.commands.update_one(
                {"sn": sn, "idempotency_key": key, "created_at": {"$lt": before}},
                {"$unset": {"idempotency_key": ""}, "$set": {"released_key": key}},
            ),
        )

    async def transition(
        self, command_id: str, from_states: tuple[str, ...], fields: Mapping[str, Any], inc_attempts: bool = False
    ) -> Doc | None:
        """Atomically move a command out of one of `from_states`; None when it was not in one."""
        update: Doc = {"$set": dict(fields)}
        if inc_attempts:
            update["$inc"] = {"attempts": 1}
        # ReturnDocument.BEFORE, then the update applied here: mongomock's AFTER re-reads the document
        # with the original filter, so a move out of `from_states` came back as None although it was applied.
        before = _aware(
            await self._call(
                "transition",
                lambda: self.commands.find_one_and_update(
                    {"_id": command_id, "state": {"$in": list(from_states)}},
                    update,
                    projection={"_id": 0},
                    return_document=ReturnDocument.BEFORE,
                ),
            )
        )
        if before is None:
            return None
        after = dict(before)
        after.update(_aware(dict(fields)) or {})
        if inc_attempts:
            after["attempts"] = int(before.get("attempts") or 0) + 1
        return after

    async def list_commands(self, sn: str | None, state: str | None, limit: int = 500) -> list[Doc]:
        """Commands, newest first."""
        query: Doc = {}
        if sn is not None:
            query["sn"] = sn
        if state is not None:
            query["state"] = state
        docs = await self._call(
            "list_commands",
            lambda: self.commands.find(query, {"_id": 0}).sort("created_at", DESCENDING).limit(limit).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

    async def open_commands(self, sn: str, now: datetime) -> list[Doc]:
        """Unexpired pending or sent commands of one device, oldest first."""
        docs = await self._call(
            "open_commands",
            lambda: self.commands.find(
                {"sn": sn, "state": {"$in": list(OPEN_STATES)}, "expires_at": {"$gt": now}}, {"_id": 0}
            ).sort("created_at", ASCENDING).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

    async def due_commands(self, now: datetime, limit: int = 1000) -> list[Doc]:
        """Sent commands whose resend time has come, oldest first."""
        docs = await self._call(
            "due_commands",
            lambda: self.commands.find(
                {"state": "sent", "next_attempt_at": {"$lte": now}, "expires_at": {"$gt": now}}, {"_id": 0}
            ).sort("next_attempt_at", ASCENDING).limit(limit).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

    async def expired_commands(self, now: datetime, limit: int = 1000) -> list[Doc]:
        """Open commands whose expiry has passed."""
        docs = await self._call(
            "expired_commands",
            lambda: self.commands.find(
                {"state": {"$in": list(OPEN_STATES)}, "expires_at": {"$lte": now}}, {"_id": 0}
            ).limit(limit).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

    async def count_commands(self) -> dict[str, int]:
        """How many commands are in each state."""
        out: dict[str, int] = {}
        for state in (*OPEN_STATES, *FINAL_STATES):
            out[state] = await self._count({"state": state})
        return out

    # ---------------------------------------------------------------- audit

    async def insert_audit(self, event: Doc) -> None:
        """Append one audit event."""
        await self._call("insert_audit", lambda: self.audit_log.insert_one(dict(event)))

    async def list_audit(
        self, since: datetime | None, actor: str | None, action: str | None, limit: int = 1000
    ) -> list[Doc]:
        """Audit events, newest first."""
        query: Doc = {}
        if since is not None:
            query["ts"] = {"$gte": since}
        if actor is not None:
            query["actor"] = actor
        if action is not None:
            query["action"] = action
        docs = await self._call(
            "list_audit",
            lambda: self.audit_log.find(query, {"_id": 0}).sort("ts", DESCENDING).limit(limit).to_list(None),
        )
        return [d for d in (_aware(doc) for doc in docs) if d is not None]

