"""The command outbox: stored before sent; pending -> sent -> acked | failed | expired | canceled."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from .audit import Audit
from .broker import Target
from .clock import Clock, iso, utc
from .config import Settings
from .errors import ServiceError, StoreUnavailable
from .hub import Hub
from .metrics import Metrics
from .push import Pusher
from .store import FINAL_STATES, OPEN_STATES, Store, check_storable

log = logging.getLogger("fleetpush.commands")


def command_json(doc: dict[str, Any]) -> dict[str, Any]:
    """A command as the wire and the HTTP API show it."""
    return {
        "command_id": doc["command_id"],
        "sn": doc["sn"],
        "device_type": doc.get("device_type"),
        "command": doc["command"],
        "args": doc.get("args") or {},
        "state": doc["state"],
        "created_at": iso(doc.get("created_at")),
        "sent_at": iso(doc.get("sent_at")),
        "acked_at": iso(doc.get("acked_at")),
        "expires_at": iso(doc.get("expires_at")),
        "attempts": doc.get("attempts", 0),
        "result": doc.get("result"),
        "issued_by": doc.get("issued_by"),
        "idempotency_key": doc.get("idempotency_key") or doc.get("released_key"),
    }


class CommandOutbox:
    """Creates, delivers, retries, expires, cancels and acknowledges commands."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        hub: Hub,
        push: Pusher,
        audit: Audit,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self.cfg = settings.commands
        self.store = store
        self.hub = hub
        self.push = push
        self.audit = audit
        self.clock = clock
        self.metrics = metrics

    def _now(self) -> datetime:
        return utc(self.clock.time())

    def _backoff(self, attempts: int) -> float:
        # attempts counts deliveries so far: wait ack_timeout, then 2x, 4x ... up to the cap.
        return float(min(self.cfg.max_backoff_s, self.cfg.ack_timeout_s * (2 ** max(0, attempts - 1))))

    async def _changed(self, doc: dict[str, Any]) -> None:
        self.metrics.commands.labels(doc["state"]).inc()
        device_type = ""
        conn = self.hub.device(doc["sn"])
        if conn is not None and conn.device_type:
            device_type = conn.device_type
        elif "device_type" in doc:
            device_type = doc["device_type"]
        await self.push.to_subscribers(doc["sn"], device_type, "command_update", command_json(doc))

    async def create(
        self,
        sn: str,
        command: str,
        args: dict[str, Any] | None,
        ttl_s: int | None,
        idempotency_key: str | None,
        issued_by: str,
    ) -> dict[str, Any]:
        """Store a new command (or return the one with the same idempotency key), then try to deliver it."""
        device = await self.store.get_device(sn)
        if device is None:
            raise ServiceError(404, f"unknown device {sn}")
        now = self._now()
        if idempotency_key:
            existing = await self.store.find_idempotent(sn, idempotency_key)
            if existing is not None:
                window = timedelta(seconds=self.cfg.idempotency_window_s)
                if existing["created_at"] > now - window:
                    return existing
                await self.store.release_idempotency_key(sn, idempotency_key, now - window)
        ttl = ttl_s if ttl_s is not None else self.cfg.default_ttl_s
        if not 1 <= ttl <= self.cfg.max_ttl_s:
            raise ServiceError(400, f"ttl_s must be between 1 and {self.cfg.max_ttl_s}",
                               errors=[{"field": "ttl_s", "msg": "out of range"}])
        doc: dict[str, Any] = {
            "command_id": "c-" + uuid.uuid4().hex,
            "sn": sn,
            "device_type": device.get("type"),
            "command": command,
            "args": args or {},
            "state": "pending",
            "created_at": now,
            "sent_at": None,
            "acked_at": None,
            "expires_at": now + timedelta(seconds=ttl),
            "attempts": 0,
            "next_attempt_at": None,
            "result": None,
            "issued_by": issued_by,
        }
        if idempotency_key:
            doc["idempotency_key"] = idempotency_key
        existing = await self.store.insert_command(doc)
        if existing is not None:
            # A concurrent create with the same key (or a retried id) won: answer with that one.
            return existing
        await self.audit.record(issued_by, "command.issued", sn, "ok",
                                {"command_id": doc["command_id"], "command": command})
        await self._changed(doc)
        sent = await self.deliver(doc)
        return sent or doc

    async def deliver(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Push a command to its device if connected; mark it sent. Returns the updated command."""
        values = {
            "command_id": doc["command_id"],
            "command": doc["command"],
            "args": doc.get("args") or {},
            "issued_at": iso(doc["created_at"]),
            "expires_at": iso(doc["expires_at"]),
        }
        result = await self.push.publish(Target(kind="device", sns=(doc["sn"],)), "device_command", values)
        if not result.queued:
            return None
        now = self._now()
        attempts = doc.get("attempts", 0) + 1
        fields: dict[str, Any] = {
            "state": "sent",
            "next_attempt_at": now + timedelta(seconds=self._backoff(attempts)),
        }
        if doc.get("sent_at") is None:
            fields["sent_at"] = now
        updated = await self.store.transition(doc["command_id"], OPEN_STATES, fields, inc_attempts=True)
        if updated is not None and doc["state"] == "pending":
            await self._changed(updated)
        return updated

    async def redeliver(self, sn: str) -> int:
        """On device login: every unexpired pending or sent command again, oldest first."""
        count = 0
        for doc in await self.store.open_commands(sn, self._now()):
            if await self.deliver(doc) is not None:
                count += 1
        return count

    async def ack(self, sn: str, command_id: str, ok: bool, code: int, msg: str, values: Any) -> dict[str, Any]:
        """A device's ack: acked or failed; 404 for another device's command, 409 when already final."""
        doc = await self.store.get_command(command_id)
        if doc is None or doc["sn"] != sn:
            raise ServiceError(404, f"unknown command {command_id}")
        if doc["state"] in FINAL_STATES:
            raise ServiceError(409, f"command {command_id} is already {doc['state']}",
                               values={"command_id": command_id, "state": doc["state"]})
        state = "acked" if ok else "failed"
        result = {"ok": ok, "code": code, "msg": msg, "values": values}
        check_storable(result, "values")
        updated = await self.store.transition(
            command_id, OPEN_STATES, {"state": state, "acked_at": self._now(), "result": result}
        )
        if updated is None:
            current = await self.store.get_command(command_id)
            final = current["state"] if current else "unknown"
            raise ServiceError(409, f"command {command_id} is already {final}",
                               values={"command_id": command_id, "state": final})
        await self.audit.record(f"device:{sn}", f"command.{state}", sn, state, {"command_id": command_id})
        await self._changed(updated)
        return updated

    async def cancel(self, command_id: str, actor: str) -> dict[str, Any]:
        """Cancel a command that is not final; 404 unknown, 409 final."""
        doc = await self.store.get_command(command_id)
        if doc is None:
            raise ServiceError(404, f"unknown command {command_id}")
        updated = await self.store.transition(command_id, OPEN_STATES, {"state": "canceled"})
        if updated is None:
            current = await self.store.get_command(command_id)
            state = current["state"] if current else doc["state"]
            raise ServiceError(409, f"command {command_id} is already {state}",
                               values={"command_id": command_id, "state": state})
        await self.audit.record(actor, "command.canceled", doc["sn"], "ok", {"command_id": command_id})
        await self.push.publish(Target(kind="device", sns=(doc["sn"],)), "command_canceled",
                                {"command_id": command_id})
        await self._changed(updated)
        return updated

    async def sweep(self) -> None:
        """Expire what is past its expiry, resend what waited too long for an ack."""
        now = self._now()
        for doc in await self.store.expired_commands(now):
            updated = await self.store.transition(doc["command_id"], OPEN_STATES, {"state": "expired"})
            if updated is not None:
                await self.audit.record("system", "command.expired", doc["sn"], "expired",
                                        {"command_id": doc["command_id"]})
                await self._changed(updated)
        for doc in await self.store.due_commands(now):
            if self.hub.device(doc["sn"]) is not None:
                await self.deliver(doc)

    async def safe_sweep(self) -> None:
        """sweep(), with store outages logged rather than raised (the next sweep retries)."""
        try:
            await self.sweep()
        except StoreUnavailable:
            log.warning("command sweep skipped: store unavailable")
