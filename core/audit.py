"""The audit trail: who did what to which target, when, and how it ended."""

from __future__ import annotations

import logging
from typing import Any

from .clock import Clock, iso, utc
from .errors import StoreUnavailable
from .store import Store

log = logging.getLogger("fleetpush.audit")


class Audit:
    """Appends audit events to the store."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def record(
        self, actor: str, action: str, target: str, outcome: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Append one event; a store outage is logged, never raised, so it cannot undo the action."""
        event = {
            "ts": utc(self.clock.time()),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail or {},
        }
        if self.store.just_failed():
            log.warning("audit event not stored (store unavailable): %s %s %s", actor, action, outcome)
            return
        try:
            await self.store.insert_audit(event)
        except StoreUnavailable:
            log.warning("audit event not stored (store unavailable): %s %s %s", actor, action, outcome)


def event_json(doc: dict[str, Any]) -> dict[str, Any]:
    """An audit event as the API returns it."""
    return {
        "ts": iso(doc.get("ts")),
        "actor": doc.get("actor"),
        "action": doc.get("action"),
        "target": doc.get("target"),
        "outcome": doc.get("outcome"),
        "detail": doc.get("detail") or {},
    }
