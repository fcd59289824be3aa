"""Push modes: reply, to one connection, broadcast, by type, by sn list, to a user, by condition."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import protocol
from .broker import Broker, Delivery, Target
from .connection import Connection
from .hub import Hub
from .metrics import Metrics

log = logging.getLogger("fleetpush.push")


class Pusher:
    """Encodes each push once and queues the same frame bytes on every target."""

    def __init__(self, hub: Hub, broker: Broker, metrics: Metrics, clock_mono: Callable[[], float]) -> None:
        self.hub = hub
        self.broker = broker
        self.metrics = metrics
        self._mono = clock_mono
        self._success = metrics.push_success
        self._latency = metrics.push_latency
        broker.bind(self.deliver_local)

    def deliver_local(self, target: Target, service: str, frame: bytes) -> Delivery:
        """Queue an already framed push on this node's matching connections."""
        conns = self.hub.select(target)
        return self._fan_out(conns, service, frame)

    def _fan_out(self, conns: list[Connection], service: str, frame: bytes) -> Delivery:
        queued = 0
        for conn in conns:
            if conn.send(frame):
                queued += 1
        failed = len(conns) - queued
        if queued:
            self._success.labels(service).inc(queued)
        if failed:
            self.metrics.push_failure.labels(service, "queue_full_or_closed").inc(failed)
        return Delivery(matched=len(conns), queued=queued)

    @staticmethod
    def frame(service: str, values: Any) -> bytes:
        """One push, encoded and framed once for every receiver."""
        return protocol.text_frame(protocol.push(service, values))

    def reply(self, conn: Connection, payload: bytes) -> bool:
        """Send a reply to the connection that asked."""
        return conn.send(protocol.text_frame(payload))

    def to_connection(self, conn: Connection, service: str, values: Any) -> bool:
        """Push to one local connection."""
        ok = conn.send(self.frame(service, values))
        (self._success.labels(service) if ok else self.metrics.push_failure.labels(service, "closed")).inc()
        return ok

    async def publish(self, target: Target, service: str, values: Any, counts: bool = True) -> Delivery:
        """Push to every connection on every node that `target` selects; `counts=False` does not wait for tallies."""
        start = self._mono()
        frame = self.frame(service, values)
        try:
            return await self.broker.publish(target, service, frame, counts)
        finally:
            self._latency.labels(service).observe(max(0.0, self._mono() - start))

    async def broadcast(self, service: str, values: Any) -> Delivery:
        """Every authenticated connection."""
        return await self.publish(Target(), service, values)

    async def to_type(self, device_type: str, service: str, values: Any) -> Delivery:
        """Every device of one type."""
        return await self.publish(Target(kind="device", types=(device_type,)), service, values)

    async def to_devices(self, sns: list[str], service: str, values: Any) -> Delivery:
        """The devices in an sn list."""
        return await self.publish(Target(kind="device", sns=tuple(sns)), service, values)

    async def to_user(self, username: str, service: str, values: Any) -> Delivery:
        """Every connection of one user (BroadcastToUser)."""
        return await self.publish(Target(usernames=(username,)), service, values)

    async def to_subscribers(self, sn: str, device_type: str, service: str, values: Any) -> Delivery:
        """Ops connections subscribed to a device."""
        return await self.publish(Target(kind="ops", subscribers_of=(sn, device_type)), service, values, counts=False)

    def by_condition(self, predicate: Callable[[Connection], bool], service: str, values: Any) -> Delivery:
        """Local connections whose session satisfies `predicate` (BroadcastByCondition)."""
        start = self._mono()
        result = self._fan_out(self.hub.where(predicate), service, self.frame(service, values))
        self._latency.labels(service).observe(max(0.0, self._mono() - start))
        return result
