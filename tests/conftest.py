"""Shared fixtures: settings for tests and a live core on 127.0.0.1 in the test's event loop."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fleetkit import ADMIN_PASSWORD, FLEET_SECRET, Client

from core.app import FleetApp, Overrides, make_app
from core.clock import SystemClock
from core.config import Settings, load_settings
from core.store import Store

# One conftest.py only: test modules import helpers with `from conftest import ...`, and a second
# conftest.py in a subfolder would shadow this module under the same name.
pytest_plugins = ["livecore"]

TEST_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {"host": "127.0.0.1", "port": 0, "node_id": "test-node", "shutdown_grace_s": 2},
    "auth": {
        "device_secret": FLEET_SECRET,
        "admin_password": ADMIN_PASSWORD,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
    },
    "heartbeat": {"sweep_interval_s": 0.02},
    "commands": {"sweep_interval_s": 0.05},
}


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Test settings: TEST_DEFAULTS merged with per-test section overrides."""
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in TEST_DEFAULTS.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return load_settings(**merged)


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    """Build settings with overrides: settings_factory(limits={"rate_burst": 5})."""
    return make_settings


@dataclass
class Core:
    """A running core node for a test."""

    app: FleetApp
    port: int

    @property
    def ws_url(self) -> str:
        """The /ws URL."""
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        """The HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def client(self, **kw: Any) -> Client:
        """A new WebSocket client."""
        return await Client.connect(self.ws_url, **kw)

    async def device(self, sn: str, type_: str = "retail") -> Client:
        """A new client logged in as a device."""
        c = await self.client()
        reply = await c.login_device(sn, type_)
        assert reply["code"] == 0, reply
        return c

    async def ops(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> Client:
        """A new client logged in as an ops user."""
        c = await self.client()
        reply = await c.login_ops(username, password)
        assert reply["code"] == 0, reply
        return c


async def start_core(settings: Settings, **overrides: Any) -> Core:
    """Start a core on an ephemeral port and wait until its store is initialised."""
    app = make_app(settings, Overrides(**overrides))
    port = await app.start(port=0, address="127.0.0.1")
    await app.store_ready.wait()
    return Core(app, port)


@pytest.fixture
async def core_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start cores with custom settings; all are stopped at the end of the test."""
    started: list[Core] = []

    async def factory(settings: Settings | None = None, **overrides: Any) -> Core:
        c = await start_core(settings or make_settings(), **overrides)
        started.append(c)
        return c

    yield factory
    for c in started:
        await c.app.stop()


@pytest.fixture
async def core(core_factory: Callable[..., Any]) -> Core:
    """A core with test settings and the system clock."""
    return await core_factory()  # type: ignore[no-any-return]


def mongo_store_settings() -> list[Any]:
    """Store backends to run the store tests on: embedded always, MongoDB when configured."""
    params: list[Any] = [pytest.param("embedded", id="embedded")]
    url = os.environ.get("FLEETPUSH_TEST_MONGO_URL")
    params.append(
        pytest.param(
            url or "", id="mongodb", marks=pytest.mark.skipif(not url, reason="FLEETPUSH_TEST_MONGO_URL not set")
        )
    )
    return params


__all__ = ["Core", "Store", "SystemClock", "make_settings", "start_core"]
