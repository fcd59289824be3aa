"""Device monitoring: presence (online/offline, last_seen), status ingest with group commit, change pushes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .clock import Clock, iso, utc
from .config import Settings
from .connection import Connection
from .errors import StoreUnavailable
from .metrics import Metrics
from .push import Pusher
from .store import Store, check_storable

log = logging.getLogger("fleetpush.monitor")

STATUS_FIELDS = (
    "location_code", "location_msg", "inspection_code", "inspection_msg",
    "rubbish_code", "rubbish_msg", "electricity_code", "electricity_msg", "battery", "extra",
)


def snapshot_json(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored snapshot as the wire shows it (ts as ISO 8601)."""
    out = {k: v for k, v in doc.items() if k != "_id"}
    out["ts"] = iso(doc.get("ts"))
    return out


def device_json(doc: dict[str, Any]) -> dict[str, Any]:
    """A device document as the wire shows it; never the secret."""
    status = dict(doc.get("status") or {})
    if "ts" in status:
        status["ts"] = iso(status["ts"])
    return {
        "sn": doc["sn"],
        "type": doc.get("type"),
        "name": doc.get("name") or doc["sn"],
        "online": bool(doc.get("online")),
        "last_seen": iso(doc.get("last_seen")),
        "connected_at": iso(doc.get("connected_at")),
        "node": doc.get("node"),
        "firmware": doc.get("firmware"),
        "offline_reason": doc.get("offline_reason"),
        "status": status,
    }


class Monitor:
    """Keeps the store's view of each device in step with its connection and reports."""

    def __init__(
        self, settings: Settings, store: Store, push: Pusher, clock: Clock, metrics: Metrics, node_id: str
    ) -> None:
        self.store = store
        self.push = push
        self.clock = clock
        self.metrics = metrics
        self.node_id = node_id
        self._batch_max = settings.store.batch_max
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- presence

    async def online(self, conn: Connection, firmware: str | None) -> None:
        """A device logged in on this node."""
        assert conn.sn is not None and conn.device_type is not None
        now = utc(self.clock.time())
        await self.store.mark_online(conn.sn, conn.device_type, self.node_id, now, firmware)
        await self.push.to_subscribers(
            conn.sn, conn.device_type, "device_online", {"sn": conn.sn, "type": conn.device_type, "ts": iso(now)}
        )

    async def offline(self, sn: str, type_: str, reason: str, *, force_push: bool = False) -> None:
        """A device's connection on this node ended; push device_offline once."""
        now = utc(self.clock.time())
        try:
            changed = await self.store.mark_offline(sn, self.node_id, reason, now)
        except StoreUnavailable:
            changed = True  # still tell the operators; the store catches up on the next login or restart
        if changed or force_push:
            await self.push.to_subscribers(
                sn, type_, "device_offline", {"sn": sn, "type": type_, "ts": iso(now), "reason": reason}
            )

    async def recover(self) -> int:
        """At start: devices this node had left online are set offline with reason `restart`."""
        return await self.release_node(self.node_id, "restart")

    async def release_node(self, node: str, reason: str) -> int:
        """Every device a node had online goes offline with `reason` (`restart`, `node_lost`); pushed once each."""
        now = utc(self.clock.time())
        docs = await self.store.mark_node_offline(node, reason, now)
        for d in docs:
            await self.push.to_subscribers(
                d["sn"], d.get("type", ""), "device_offline",
                {"sn": d["sn"], "type": d.get("type"), "ts": iso(now), "reason": reason},
            )
        return len(docs)

    # ---------------------------------------------------------------- status ingest

    async def ingest(self, conn: Connection, fields: dict[str, Any]) -> str:
        """Store one status report (in memory at once, on MongoDB group-committed with concurrent ones), then
        push it; returns its ts."""
        assert conn.sn is not None
        ts = utc(self.clock.time())
        doc: dict[str, Any] = {"sn": conn.sn, "type": conn.device_type, "ts": ts, **fields}
        # Checked here, alone: one report BSON cannot hold would otherwise fail its whole batch.
        check_storable(doc, "extra")
        if not self.store.insert_status_now([doc]):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending.append((doc, fut))
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush())
            await fut
        self.metrics.status_reports.inc()
        values = snapshot_json(doc)
        await self.push.to_subscribers(conn.sn, conn.device_type or "", "device_status", values)
        return str(values["ts"])

    async def _flush(self) -> None:
        # One writer: reports that arrive while a batch is being written form the next batch.
        await asyncio.sleep(0)
        while self._pending:
            batch = self._pending[: self._batch_max]
            del self._pending[: self._batch_max]
            try:
                await self.store.insert_status([d for d, _ in batch], checked=True)
            except Exception as exc:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc if isinstance(exc, StoreUnavailable) else StoreUnavailable())
                continue
            for _, f in batch:
                if not f.done():
                    f.set_result(None)

    async def drain(self) -> None:
        """Wait for reports already accepted into a batch to be written."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
