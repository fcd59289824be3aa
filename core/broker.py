"""Every push goes through a broker: in-process now, Redis pub/sub when several nodes run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Target:
    """Who a push is for: every field set must match (AND); nothing set = every authenticated connection."""

    kind: str | None = None  # "device" | "ops"
    conn_ids: tuple[str, ...] | None = None
    sns: tuple[str, ...] | None = None
    types: tuple[str, ...] | None = None
    usernames: tuple[str, ...] | None = None
    roles: tuple[str, ...] | None = None
    # Ops connections subscribed to this device: (sn, type).
    subscribers_of: tuple[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form for another node."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        """The inverse of to_json."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


@dataclass(slots=True)
class Delivery:
    """How many connections a push matched, and how many frames were queued."""

    matched: int = 0
    queued: int = 0

    def add(self, other: Delivery) -> None:
        """Sum another node's counts into this one."""
        self.matched += other.matched
        self.queued += other.queued


# Delivers one encoded frame to the local connections a target selects.
LocalDeliver = Callable[[Target, str, bytes], Delivery]


class Broker(Protocol):
    """The push fabric between nodes."""

    degraded: bool

    def bind(self, deliver: LocalDeliver) -> None:
        """Set the function that delivers to this node's connections."""
        ...

    async def publish(self, target: Target, service: str, frame: bytes, counts: bool = True) -> Delivery:
        """Deliver to every node's matching connections; with `counts`, wait for every node's tally."""
        ...

    async def send_control(self, kind: str, data: dict[str, Any]) -> bool:
        """Tell every other node something; False when it could not be sent."""
        ...

    async def start(self) -> None:
        """Connect."""
        ...

    async def stop(self) -> None:
        """Disconnect."""
        ...


class LocalBroker:
    """The single-node broker: publishing is delivering."""

    degraded = False

    def __init__(self) -> None:
        self._deliver: LocalDeliver | None = None

    def bind(self, deliver: LocalDeliver) -> None:
        """Set the local delivery function."""
        self._deliver = deliver

    async def publish(self, target: Target, service: str, frame: bytes, counts: bool = True) -> Delivery:
        """Deliver on this node."""
        if self._deliver is None:
            return Delivery()
        return self._deliver(target, service, frame)

    async def send_control(self, kind: str, data: dict[str, Any]) -> bool:
        """There are no other nodes."""
        return True

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        """Nothing to disconnect."""
