"""ServerContext: what a handler may use — its connection, message, session and the app's parts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .clock import Clock, utc
from .connection import Connection
from .protocol import Request

if TYPE_CHECKING:
    from datetime import datetime

    from .audit import Audit
    from .auth import Authenticator
    from .commands import CommandOutbox
    from .config import Settings
    from .hub import Hub
    from .metrics import Metrics
    from .monitor import Monitor
    from .push import Pusher
    from .store import Store


@dataclass(slots=True)
class Deps:
    """The app's long-lived parts, built once by app.py and shared by every request."""

    settings: Settings
    clock: Clock
    store: Store
    hub: Hub
    push: Pusher
    auth: Authenticator
    monitor: Monitor
    commands: CommandOutbox
    audit: Audit
    metrics: Metrics
    node_id: str
    # Set once start-up's store work is done (indexes, the admin user, presence recovery): until
    # then /readyz answers 503, so nothing is routed to a node that cannot log its users in yet.
    initialised: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class ServerContext:
    """One request's view of the server."""

    conn: Connection
    request: Request
    deps: Deps
    # Work to run after the reply is queued (e.g. redelivering commands after a login reply).
    after: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def store(self) -> Store:
        """The store."""
        return self.deps.store

    @property
    def hub(self) -> Hub:
        """The connection hub (read it; only transport and login handlers change it)."""
        return self.deps.hub

    @property
    def push(self) -> Pusher:
        """The push modes."""
        return self.deps.push

    @property
    def clock(self) -> Clock:
        """The injected clock."""
        return self.deps.clock

    def now(self) -> datetime:
        """The clock's time as an aware UTC datetime."""
        return utc(self.deps.clock.time())

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail."""
        c = self.conn
        return c.username or (f"device:{c.sn}" if c.sn else f"conn:{c.id}")
