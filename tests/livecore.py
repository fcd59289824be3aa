"""End-to-end fixtures (loaded by tests/conftest.py): a real `fleetpush serve` process and a simulated fleet."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fleetkit import ADMIN_PASSWORD, FLEET_SECRET

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: object, timeout: float, what: str) -> None:
    """Poll another process's state until `check()` is truthy (nothing can be awaited across processes)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """SIGINT, then kill if it does not exit in time; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@dataclass
class LiveCore:
    """A core process on 127.0.0.1 with known accounts."""

    port: int
    proc: subprocess.Popen[bytes]
    admin_username: str = "admin"
    admin_password: str = ADMIN_PASSWORD
    operator_username: str = "oscar"
    operator_password: str = "oscar-password-1"
    viewer_username: str = "vera"
    viewer_password: str = "vera-password-1"
    fleet_secret: str = FLEET_SECRET

    @property
    def http_url(self) -> str:
        """HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """WebSocket URL."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self) -> str:
        """An admin bearer token."""
        r = httpx.post(f"{self.http_url}/api/v1/auth/login",
                       json={"username": self.admin_username, "password": self.admin_password}, timeout=10)
        r.raise_for_status()
        return str(r.json()["token"])


def core_env(port: int) -> dict[str, str]:
    """Environment for a core process used by end-to-end tests."""
    users = [
        {"username": "oscar", "password": "oscar-password-1", "role": "operator"},
        {"username": "vera", "password": "vera-password-1", "role": "viewer"},
    ]
    return dict(
        os.environ,
        FLEETPUSH_SERVER__HOST="127.0.0.1",
        FLEETPUSH_SERVER__PORT=str(port),
        FLEETPUSH_AUTH__ADMIN_PASSWORD=ADMIN_PASSWORD,
        FLEETPUSH_AUTH__DEVICE_SECRET=FLEET_SECRET,
        FLEETPUSH_AUTH__USERS=json.dumps(users),
        FLEETPUSH_AUTH__ARGON2_TIME_COST="1",
        FLEETPUSH_AUTH__ARGON2_MEMORY_KIB="1024",
        FLEETPUSH_COMMANDS__ACK_TIMEOUT_S="2",
        FLEETPUSH_SERVER__ACCESS_LOG="false",
    )


def start_live_core() -> LiveCore:
    """Start `fleetpush serve` and wait until it is ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core", "serve"], cwd=ROOT, env=core_env(port),
                            stdout=subprocess.DEVNULL)
    core = LiveCore(port, proc)
    wait_until(lambda: proc.poll() is None and httpx.get(f"{core.http_url}/readyz", timeout=1).status_code == 200,
               30, "the core to be ready")
    return core


@pytest.fixture(scope="session")
def live_core() -> Iterator[LiveCore]:
    """One core process for the end-to-end tests of a session."""
    core = start_live_core()
    yield core
    assert stop_process(core.proc) == 0


@dataclass
class SeededFleet:
    """A simulator process whose robots are online."""

    sns: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None


@pytest.fixture(scope="session")
def seeded_fleet(live_core: LiveCore) -> Iterator[SeededFleet]:
    """Eight simulated robots (two of each type) reporting every second to the live core."""
    n = 8
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "simulate", "--url", live_core.ws_url, "--devices", str(n),
         "--interval", "1", "--seed", "7", "--sn-prefix", "E2E", "--ack-failure-rate", "0", "--slow-ack-rate", "0"],
        cwd=ROOT, env=dict(os.environ, FLEETPUSH_AUTH__DEVICE_SECRET=live_core.fleet_secret),
        stdout=subprocess.DEVNULL,
    )
    headers = {"Authorization": f"Bearer {live_core.token()}"}
    online: list[str] = []

    def all_online() -> bool:
        nonlocal online
        devs = httpx.get(f"{live_core.http_url}/api/v1/devices", params={"online": "true"}, headers=headers,
                         timeout=2).json()["devices"]
        online = sorted(d["sn"] for d in devs if d["sn"].startswith("E2E") and d["status"].get("battery") is not None)
        return len(online) >= n

    wait_until(all_online, 30, f"{n} simulated robots online with a status")
    yield SeededFleet(online, proc)
    stop_process(proc)
