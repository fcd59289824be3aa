"""A fleet of simulated robots that speak the fleetpush wire protocol (PROTOCOL.md §1-§5).

The simulator is a *client* of the wire contract and deliberately imports nothing else from ``core``.

Layers, from the bottom up:

- ``RobotModel``: the pure, seeded state model of one robot; ``step(dt)`` returns a status report.
- ``SimDevice``: one robot = a model plus its connection loop (connect, login, report, acks, reconnect).
- ``Fleet``: many ``SimDevice`` tasks on one event loop, with shared counters.
- ``add_arguments`` / ``main``: the ``fleetpush simulate`` command line.

Reconnect policy (documented here because the protocol leaves it to the device):

- Any drop, refused connect or failed login: exponential backoff with full jitter,
  ``uniform(0, min(max_backoff_s, base * 2**attempt))``; the attempt counter resets once a session
  has logged in and had a report acknowledged.
- 4401 (no login in time, session revoked, secret rotated): treated like a failed login, normal backoff;
  the operator may fix the secret, so the device keeps trying at the capped rate.
- 4409 (replaced: another instance logged in with the same serial number): back off long,
  ``uniform(max_backoff_s / 2, max_backoff_s)``; after ``max_replaced`` consecutive replacements the
  device gives up, so two simulators sharing serial numbers converge instead of evicting each other forever.
- Login timestamps are strictly increasing per device, so a fast reconnect never replays ``(sn, timestamp)``.
- A slow server is not a dead one: with ``MAX_REPORTS_IN_FLIGHT`` status reports unanswered, a device skips
  its beat (counted as ``reports_skipped``) rather than piling up requests. Only when requests are
  unanswered *and* nothing at all has arrived for ``request_timeout_s`` does it close (1000) and reconnect.

Command handling (PROTOCOL §5, at-least-once delivery):

- A command is executed at most once per ``command_id``. Its ack is remembered; a redelivery is ignored
  once the server has confirmed the ack (or while the ack is in flight on the same connection), and the
  remembered ack is sent again only when it was never confirmed before the link dropped.
- A slow ack is a task that sleeps ``slow_ack_s`` and then executes and acks; ``command_canceled`` or a
  dropped link cancels it, and nothing has been executed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

DEVICE_TYPES: Final[tuple[str, ...]] = ("retail", "dance_robot", "dance_dog", "rubbish")
SECRET_ENV: Final = "FLEETPUSH_AUTH__DEVICE_SECRET"
MAX_MSG_CHARS: Final = 256
MAX_EXTRA_BYTES: Final = 4096
REMEMBERED_COMMANDS: Final = 1024
MAX_REPORTS_IN_FLIGHT: Final = 2  # unanswered status reports per device before it skips a beat

# Status codes the simulator reports (0 is always "ok"); messages stay well under 256 characters.
LOC_LOST: Final = 1
INSPECTION_BLOCKED: Final = 1
RUBBISH_FULL: Final = 1
BATTERY_LOW: Final = 1
BATTERY_CRITICAL: Final = 2

# Ack codes the simulator sends in /api/command/ack (device-level, not envelope codes).
ACK_UNKNOWN: Final = 404
ACK_REFUSED: Final = 409
ACK_FAILED: Final = 500

_SN_TAGS: Final = {"retail": "RTL", "dance_robot": "DNC", "dance_dog": "DOG", "rubbish": "RUB"}
_FIRMWARE: Final = {"retail": "3.2.0", "dance_robot": "1.8.4", "dance_dog": "2.4.1", "rubbish": "1.3.7"}
# Battery drain in percent per second while working; idle robots drain a tenth of it.
_DRAIN: Final = {"retail": 0.05, "dance_robot": 0.12, "dance_dog": 0.15, "rubbish": 0.08}
_SPEED: Final = {"retail": 0.8, "dance_robot": 0.5, "dance_dog": 1.5, "rubbish": 0.6}
_WORK_MODE: Final = {"retail": "guiding", "dance_robot": "performing", "dance_dog": "patrolling",
                     "rubbish": "collecting"}
_CHARGE_RATE: Final = 0.6  # percent per second at the dock
_LOW: Final = 20.0
_CRITICAL: Final = 5.0
_FULL: Final = 95.0
_AREA: Final = 30.0  # metres; the dock is at (0, 0)
# Fault hazards per second while the robot moves, and how long a fault lasts (seconds).
_LOC_HAZARD: Final = 0.002
_LOC_DURATION: Final = (5.0, 30.0)
_ROUTE_HAZARD: Final = 0.002
_ROUTE_DURATION: Final = (10.0, 60.0)
_BIN_FILL: Final = 0.4  # percent of the bin per second while collecting


def login_token(secret: str, sn: str, timestamp: int) -> str:
    """Lowercase hex HMAC-SHA256 of ``"{sn}:{timestamp}"`` keyed by the device secret (PROTOCOL §3)."""
    return hmac.new(secret.encode(), f"{sn}:{timestamp}".encode(), hashlib.sha256).hexdigest()


def backoff_delay(attempt: int, rng: random.Random, *, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempt))."""
    ceiling = min(cap_s, base_s * math.pow(2.0, min(attempt, 62)))
    return rng.uniform(0.0, ceiling)


def replaced_delay(rng: random.Random, *, cap_s: float = 30.0) -> float:
    """The long backoff after a 4409 close: uniform(cap / 2, cap)."""
    return rng.uniform(cap_s / 2.0, cap_s)


def make_sn(prefix: str, device_type: str, index: int) -> str:
    """Serial number of the index-th simulated device, e.g. ``SIM-DOG-0003``."""
    return f"{prefix}-{_SN_TAGS.get(device_type, 'DEV')}-{index + 1:04d}"


@dataclass
class SimClock:
    """Injectable time: ``time_fn`` gives unix seconds, ``sleep_fn`` waits; tests replace both."""

    time_fn: Callable[[], float] = time.time
    sleep_fn: Callable[[float], Awaitable[None]] = asyncio.sleep


@dataclass
class SimConfig:
    """Settings of a simulated fleet."""

    url: str
    devices: int = 20
    types: list[str] = field(default_factory=lambda: list(DEVICE_TYPES))
    interval_s: float = 2.0
    secret: str = field(default="", repr=False)
    sn_prefix: str = "SIM"
    seed: int | None = None
    ack_failure_rate: float = 0.1
    slow_ack_rate: float = 0.1
    slow_ack_s: float = 3.0
    max_backoff_s: float = 30.0
    secrets: dict[str, str] | None = field(default=None, repr=False)
    clock: SimClock = field(default_factory=SimClock)
    base_backoff_s: float = 0.5
    connect_rate_per_s: float = 200.0
    request_timeout_s: float = 30.0
    max_replaced: int = 3
    max_size: int = 4 * 2**20
    time_scale: float = 1.0  # model seconds per wall second (time-lapse for demos and notebooks)

    def secret_for(self, sn: str) -> str:
        """The per-device secret when one is known, else the fleet secret."""
        if self.secrets and sn in self.secrets:
            return self.secrets[sn]
        return self.secret


@dataclass
class Fault:
    """One active fault: its code, message and the model time at which it clears."""

    code: int
    msg: str
    until: float


@dataclass
class CommandResult:
    """What a command did to the model: the ack fields."""

    ok: bool
    code: int = 0
    msg: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class AckPlan:
    """How the device will answer one command: fail outright, or execute after ``delay_s``."""

    fail: CommandResult | None
    delay_s: float


class RobotModel:
    """The state of one robot; ``step(dt)`` advances it and returns a PROTOCOL §3 status report."""

    def __init__(self, device_type: str, rng: random.Random) -> None:
        self.type = device_type
        self.rng = rng
        self.t = 0.0
        self.battery = rng.uniform(40.0, 100.0)
        self.x = rng.uniform(-_AREA, _AREA)
        self.y = rng.uniform(-_AREA, _AREA)
        self.heading = rng.uniform(0.0, 2 * math.pi)
        self.mode = _WORK_MODE[device_type]
        self.target: tuple[float, float] | None = None
        self.odometer_m = 0.0
        self.bin_level = rng.uniform(0.0, 60.0) if device_type == "rubbish" else 0.0
        self.location: Fault | None = None
        self.inspection: Fault | None = None
        self.dancing_until = 0.0

    @property
    def work_mode(self) -> str:
        """The mode this robot type is in while doing its job."""
        return _WORK_MODE[self.type]

    @property
    def at_dock(self) -> bool:
        """Whether the robot stands on its charging dock."""
        return math.hypot(self.x, self.y) < 0.5

    def step(self, dt: float) -> dict[str, Any]:
        """Advance the model by ``dt`` seconds and return the status report."""
        dt = max(0.0, dt)
        self.t += dt
        self._clear_faults()
        moving = self.mode in (self.work_mode, "returning", "moving") and self.location is None
        if self.mode == "dancing" and self.t >= self.dancing_until:
            self.mode = self.work_mode
        if moving:
            self._move(dt)
            self._maybe_fault(dt)
        if self.mode == "charging":
            self.battery = min(100.0, self.battery + _CHARGE_RATE * dt)
            if self.type == "rubbish":
                self.bin_level = 0.0
            if self.battery >= _FULL:
                self.mode = self.work_mode
        else:
            working = self.mode in (self.work_mode, "dancing", "returning", "moving")
            rate = _DRAIN[self.type] * (1.0 if working else 0.1) * (1.5 if self.mode == "dancing" else 1.0)
            self.battery = max(0.0, self.battery - rate * dt)
        if self.type == "rubbish" and self.mode == self.work_mode:
            self.bin_level = min(100.0, self.bin_level + _BIN_FILL * dt * self.rng.uniform(0.5, 1.5))
        if self.mode not in ("charging", "returning", "stopped") and (
            self.battery < _LOW or self.bin_level >= 100.0
        ):
            self.go_dock()
        return self.report()

    def go_dock(self) -> None:
        """Head for the dock (and charge there)."""
        self.target = None
        self.mode = "charging" if self.at_dock else "returning"

    def _move(self, dt: float) -> None:
        """Move towards the dock, a commanded target, or wander inside the area."""
        speed = _SPEED[self.type]
        dest: tuple[float, float] | None = (0.0, 0.0) if self.mode == "returning" else self.target
        if dest is not None:
            dx, dy = dest[0] - self.x, dest[1] - self.y
            dist = math.hypot(dx, dy)
            travel = min(dist, speed * dt)
            if dist > 1e-9:
                self.heading = math.atan2(dy, dx)
                self.x += dx / dist * travel
                self.y += dy / dist * travel
            self.odometer_m += travel
            if dist - travel < 1e-6:
                if self.mode == "returning":
                    self.x, self.y = 0.0, 0.0
                    self.mode = "charging"
                else:
                    self.target = None
                    self.mode = self.work_mode
            return
        self.heading += self.rng.gauss(0.0, 0.3) * min(dt, 10.0)
        nx = self.x + math.cos(self.heading) * speed * dt
        ny = self.y + math.sin(self.heading) * speed * dt
        if abs(nx) > _AREA or abs(ny) > _AREA:
            self.heading += math.pi
            nx, ny = max(-_AREA, min(_AREA, nx)), max(-_AREA, min(_AREA, ny))
        self.odometer_m += math.hypot(nx - self.x, ny - self.y)
        self.x, self.y = nx, ny

    def _hazard(self, rate: float, dt: float) -> bool:
        """A Poisson event with ``rate`` per second happened within ``dt``."""
        return self.rng.random() < 1.0 - math.exp(-rate * dt)

    def _maybe_fault(self, dt: float) -> None:
        """Roll for new faults while moving."""
        if self.location is None and self._hazard(_LOC_HAZARD, dt):
            self.location = Fault(LOC_LOST, "localization lost: no lidar match near "
                                  f"({self.x:.1f}, {self.y:.1f})", self.t + self.rng.uniform(*_LOC_DURATION))
        if self.inspection is None and self._hazard(_ROUTE_HAZARD, dt):
            waypoint = self.rng.randint(1, 40)
            self.inspection = Fault(INSPECTION_BLOCKED, f"inspection route blocked at waypoint {waypoint}",
                                    self.t + self.rng.uniform(*_ROUTE_DURATION))

    def _clear_faults(self) -> None:
        """Clear faults whose time has come."""
        if self.location is not None and self.t >= self.location.until:
            self.location = None
        if self.inspection is not None and self.t >= self.inspection.until:
            self.inspection = None

    def electricity(self) -> tuple[int, str]:
        """The battery code and message."""
        if self.battery < _CRITICAL:
            return BATTERY_CRITICAL, f"battery critical ({self.battery:.0f}%)"
        if self.battery < _LOW:
            return BATTERY_LOW, f"battery low ({self.battery:.0f}%)"
        return 0, "charging" if self.mode == "charging" else ""

    def report(self) -> dict[str, Any]:
        """The current status report (PROTOCOL §3 ``/api/device/status`` values)."""
        e_code, e_msg = self.electricity()
        full = self.type == "rubbish" and self.bin_level >= 100.0
        extra: dict[str, Any] = {
            "x": round(self.x, 2),
            "y": round(self.y, 2),
            "heading_deg": round(math.degrees(self.heading) % 360.0, 1),
            "mode": self.mode,
            "odometer_m": round(self.odometer_m, 1),
            "firmware": _FIRMWARE[self.type],
        }
        if self.type == "rubbish":
            extra["bin_level"] = round(self.bin_level, 1)
        return {
            "battery": round(self.battery, 1),
            "location_code": self.location.code if self.location else 0,
            "location_msg": self.location.msg if self.location else "",
            "inspection_code": self.inspection.code if self.inspection else 0,
            "inspection_msg": self.inspection.msg if self.inspection else "",
            "rubbish_code": RUBBISH_FULL if full else 0,
            "rubbish_msg": "rubbish bin full" if full else "",
            "electricity_code": e_code,
            "electricity_msg": e_msg,
            "extra": extra,
        }

    def apply_command(self, command: str, args: dict[str, Any]) -> CommandResult:
        """Execute one command on the model; unknown or impossible commands fail with a message."""
        if command in ("dock", "charge"):
            self.go_dock()
            return CommandResult(True, values={"mode": self.mode})
        if command == "stop":
            self.mode, self.target = "stopped", None
            return CommandResult(True, values={"mode": self.mode})
        if command in ("start", "resume"):
            if self.battery < _LOW:
                return CommandResult(False, ACK_REFUSED, f"battery too low to resume ({self.battery:.0f}%)")
            self.mode, self.target = self.work_mode, None
            return CommandResult(True, values={"mode": self.mode})
        if command == "dance":
            if self.type not in ("dance_robot", "dance_dog"):
                return CommandResult(False, ACK_REFUSED, f"a {self.type} robot cannot dance")
            if self.battery < _LOW:
                return CommandResult(False, ACK_REFUSED, f"battery too low to dance ({self.battery:.0f}%)")
            duration = _number(args.get("duration_s"), 30.0, 1.0, 600.0)
            self.mode, self.target, self.dancing_until = "dancing", None, self.t + duration
            return CommandResult(True, values={"mode": self.mode, "duration_s": duration})
        if command in ("move", "goto"):
            x = _number(args.get("x"), math.nan, -_AREA, _AREA)
            y = _number(args.get("y"), math.nan, -_AREA, _AREA)
            if math.isnan(x) or math.isnan(y):
                return CommandResult(False, ACK_REFUSED, "move needs numeric args x and y")
            self.mode, self.target = "moving", (x, y)
            return CommandResult(True, values={"mode": self.mode, "x": x, "y": y})
        if command in ("relocalize", "locate"):
            self.location = None
            return CommandResult(True, values={"x": round(self.x, 2), "y": round(self.y, 2)})
        if command == "empty_bin":
            if self.type != "rubbish":
                return CommandResult(False, ACK_REFUSED, f"a {self.type} robot has no bin")
            self.bin_level = 0.0
            return CommandResult(True, values={"bin_level": 0.0})
        if command in ("ping", "status"):
            return CommandResult(True, values=self.report())
        return CommandResult(False, ACK_UNKNOWN, f"unknown command {command[:64]!r}")


def _number(value: Any, default: float, lo: float, hi: float) -> float:
    """A finite number clamped to [lo, hi], or ``default`` when ``value`` is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return max(lo, min(hi, float(value)))


@dataclass
class SimStats:
    """Counters shared by every device of a fleet (one event loop, so no locking)."""

    # errors: non-zero reply codes by code (-1: a reply that matched no request_id);
    # closes: how sessions ended, by close code (1006: the link dropped without a close frame).

    connected: int = 0
    logins: int = 0
    login_failures: int = 0
    reports_sent: int = 0
    reports_acked: int = 0
    reports_skipped: int = 0
    commands_received: int = 0
    commands_duplicate: int = 0
    commands_canceled: int = 0
    acks_sent: int = 0
    acks_failed: int = 0
    acks_slow: int = 0
    acks_resent: int = 0
    acks_confirmed: int = 0
    pushes_other: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    reply_timeouts: int = 0
    gave_up: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    _changed: asyncio.Event | None = field(default=None, repr=False, compare=False)

    def notify(self) -> None:
        """Wake everyone waiting for a change."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def changed(self) -> asyncio.Event:
        """An event set at the next change of the counters that matter to waiters."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-able data."""
        data = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        data["errors"] = {str(k): v for k, v in sorted(self.errors.items())}
        data["closes"] = {str(k): v for k, v in sorted(self.closes.items())}
        return data

    def summary(self) -> str:
        """One line for a terminal."""
        errors = ",".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "-"
        closes = ",".join(f"{k}:{v}" for k, v in sorted(self.closes.items())) or "-"
        return (f"connected={self.connected} logins={self.logins} login_failures={self.login_failures} "
                f"reports={self.reports_sent}/{self.reports_acked} skipped={self.reports_skipped} "
                f"commands={self.commands_received} "
                f"dup={self.commands_duplicate} acks={self.acks_sent} failed_acks={self.acks_failed} "
                f"reconnects={self.reconnects} errors={errors} closes={closes}")


@dataclass
class _AckRecord:
    """A remembered ack: what was sent, whether the server confirmed it, and on which session."""

    values: dict[str, Any] | None
    confirmed: bool
    session: int


class _SessionEnd(Exception):
    """Raised inside a session to end it with a known reason."""


class SimDevice:
    """One simulated robot: its state model and its connection loop."""

    def __init__(self, config: SimConfig, index: int, device_type: str, *,
                 stats: SimStats | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.index = index
        self.type = device_type
        self.sn = make_sn(config.sn_prefix, device_type, index)
        seed = None if config.seed is None else f"{config.seed}:{self.sn}"
        self.rng = rng if rng is not None else random.Random(seed)
        self.model = RobotModel(device_type, self.rng)
        self.stats = stats if stats is not None else SimStats()
        self.clock = config.clock
        self.session = 0
        self.logged_in = False
        self.stopped = False
        self.replaced_in_a_row = 0
        self._attempt = 0
        self._last_ts = 0
        self._req = 0
        self._ws: ClientConnection | None = None
        self._inflight: dict[str, tuple[str, float, str | None, asyncio.Future[dict[str, Any]] | None]] = {}
        self._acks: OrderedDict[str, _AckRecord] = OrderedDict()
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._session_acked_report = False
        self._last_step: float | None = None
        self._last_rx = 0.0

    # ---- pure parts (unit-tested without sockets) ----

    def step(self, dt: float) -> dict[str, Any]:
        """Advance the state model by ``dt`` wall seconds (times ``time_scale``) and return the report."""
        return self.model.step(dt * self.config.time_scale)

    def login_values(self) -> dict[str, Any]:
        """The ``/api/user/login`` values, with a timestamp never reused by this device."""
        ts = max(int(self.clock.time_fn()), self._last_ts + 1)
        self._last_ts = ts
        secret = self.config.secret_for(self.sn)
        return {"sn": self.sn, "timestamp": ts, "token": login_token(secret, self.sn, ts),
                "type": self.type, "firmware": _FIRMWARE[self.type]}

    def next_delay(self, close_code: int | None) -> float | None:
        """Seconds to wait before reconnecting after a session ended with ``close_code``; None = give up."""
        cap = self.config.max_backoff_s
        if close_code == 4409:
            self.replaced_in_a_row += 1
            if self.replaced_in_a_row >= self.config.max_replaced:
                return None
            return replaced_delay(self.rng, cap_s=cap)
        delay = backoff_delay(self._attempt, self.rng, base_s=self.config.base_backoff_s, cap_s=cap)
        self._attempt += 1
        return delay

    def plan_ack(self, command: str) -> AckPlan:
        """Decide, with the device RNG, whether a command fails at random and whether its ack is slow."""
        fail_roll, slow_roll = self.rng.random(), self.rng.random()
        if fail_roll < self.config.ack_failure_rate:
            msg = f"simulated actuator fault while running {command[:64]!r}"
            return AckPlan(CommandResult(False, ACK_FAILED, msg), 0.0)
        delay = self.config.slow_ack_s if slow_roll < self.config.slow_ack_rate else 0.0
        return AckPlan(None, delay)

    def on_command(self, values: dict[str, Any]) -> tuple[str, dict[str, Any] | None, float]:
        """Classify a ``device_command`` push: ("ignore"|"resend"|"ack", ack values, delay before acking)."""
        cid = values.get("command_id")
        if not isinstance(cid, str) or not cid:
            self.stats.errors[400] += 1
            return "ignore", None, 0.0
        self.stats.commands_received += 1
        if cid in self._pending:
            self.stats.commands_duplicate += 1
            return "ignore", None, 0.0
        rec = self._acks.get(cid)
        if rec is not None:
            if rec.confirmed or rec.session == self.session or rec.values is None:
                self.stats.commands_duplicate += 1
                return "ignore", None, 0.0
            return "resend", rec.values, 0.0
        command = values.get("command")
        command = command if isinstance(command, str) else ""
        plan = self.plan_ack(command)
        if plan.fail is not None:
            return "ack", self._ack_values(cid, plan.fail), 0.0
        return "ack", None, plan.delay_s

    def execute(self, values: dict[str, Any]) -> dict[str, Any]:
        """Run a command on the model and build its ack values."""
        cid = str(values.get("command_id"))
        command = values.get("command")
        args = values.get("args")
        if not isinstance(command, str):
            result = CommandResult(False, ACK_REFUSED, "command must be a string")
        else:
            result = self.model.apply_command(command, args if isinstance(args, dict) else {})
        return self._ack_values(cid, result)

    def on_canceled(self, command_id: str) -> bool:
        """Drop a pending slow ack for a canceled command; True when one was dropped."""
        task = self._pending.pop(command_id, None)
        self._remember(command_id, _AckRecord(None, True, self.session))
        if task is None:
            return False
        task.cancel()
        self.stats.commands_canceled += 1
        return True

    def record_ack(self, cid: str, ack: dict[str, Any]) -> None:
        """Remember an ack about to be sent on the current session."""
        self._remember(cid, _AckRecord(ack, False, self.session))

    def ack_replied(self, cid: str, code: int) -> None:
        """Note the server's reply to an ack: taken (0), or final already (404/409), or to be resent."""
        rec = self._acks.get(cid)
        if rec is None:
            return
        if code in (0, 404, 409):
            rec.confirmed = True
            if code == 0:
                self.stats.acks_confirmed += 1
        else:
            rec.session = -1  # not taken (429, 5xx): a redelivery gets the remembered ack again

    def _ack_values(self, cid: str, result: CommandResult) -> dict[str, Any]:
        """The ``/api/command/ack`` values for a result."""
        return {"command_id": cid, "ok": result.ok, "code": result.code, "msg": result.msg[:MAX_MSG_CHARS],
                "values": result.values}

    def _remember(self, cid: str, rec: _AckRecord) -> None:
        """Remember an ack, forgetting the oldest beyond the bound."""
        self._acks[cid] = rec
        self._acks.move_to_end(cid)
        while len(self._acks) > REMEMBERED_COMMANDS:
            self._acks.popitem(last=False)

    # ---- the connection loop ----

    async def run(self, initial_delay_s: float = 0.0) -> None:
        """Connect, log in, report and answer commands until stopped; reconnect with backoff."""
        if initial_delay_s > 0:
            await self.clock.sleep_fn(initial_delay_s)
        while not self.stopped:
            code = await self._session()
            if self.stopped:
                break
            if self._session_acked_report:
                self._attempt = 0
                if code != 4409:
                    self.replaced_in_a_row = 0
            delay = self.next_delay(code)
            if delay is None:
                self.stopped = True
                self.stats.gave_up += 1
                break
            self.stats.reconnects += 1
            await self.clock.sleep_fn(delay)

    async def stop(self) -> None:
        """Stop reconnecting and close the socket with 1000."""
        self.stopped = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, "simulator stopping")

    async def _session(self) -> int | None:
        """One connection from connect to close; returns the close code (None when it never opened)."""
        self.session += 1
        self._session_acked_report = False
        try:
            ws = await connect(self.config.url, max_size=self.config.max_size, compression=None, proxy=None,
                               ping_interval=None, open_timeout=10, close_timeout=3,
                               user_agent_header="fleetpush-sim/0.1")
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI):
            self.stats.connect_failures += 1
            return None
        self._ws = ws
        self._last_rx = asyncio.get_running_loop().time()
        reader = asyncio.create_task(self._read_loop(ws))
        reporter: asyncio.Task[None] | None = None
        code: int | None = None
        try:
            if self.stopped:
                return 1000
            if not await self._login(ws):
                self.stats.login_failures += 1
                code = 4401  # a refused login backs off like a revoked session
                return code
            self.logged_in = True
            self.stats.logins += 1
            self.stats.connected += 1
            self.stats.notify()
            reporter = asyncio.create_task(self._report_loop(ws))
            await reader
        except (ConnectionClosed, _SessionEnd):
            pass
        finally:
            if self.logged_in:
                self.logged_in = False
                self.stats.connected -= 1
            for task in (reporter, reader, *self._pending.values()):
                if task is not None:
                    task.cancel()
            self._pending.clear()
            self._fail_inflight()
            if ws.close_code is None:
                with contextlib.suppress(Exception):
                    await ws.close(1000, "login failed" if code == 4401 else "session ended")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if reporter is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reporter
            self._ws = None
            self.stats.closes[ws.close_code if ws.close_code is not None else 1006] += 1
            self.stats.notify()
        return ws.close_code

    def _fail_inflight(self) -> None:
        """Forget every unanswered request; a waiting login learns that the session ended."""
        for _, _, _, fut in self._inflight.values():
            if fut is not None and not fut.done():
                fut.set_exception(_SessionEnd())
        self._inflight.clear()

    async def _login(self, ws: ClientConnection) -> bool:
        """Send the login and wait for its reply."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self._send(ws, "/api/user/login", self.login_values(), future=fut)
        try:
            reply = await asyncio.wait_for(fut, self.config.request_timeout_s)
        except TimeoutError:
            self.stats.reply_timeouts += 1
            return False
        return reply.get("code") == 0

    async def _send(
        self,
        ws: ClientConnection,
        service: str,
        values: dict[str, Any],
        *,
        command_id: str | None = None,
        future: asyncio.Future[dict[str, Any]] | None = None,
    ) -> None:
        """Send one request and remember it by ``request_id`` until its reply arrives."""
        self._req += 1
        rid = f"{self.sn}-{self._req}"
        self._inflight[rid] = (service, asyncio.get_running_loop().time(), command_id, future)
        frame = json.dumps({"op": "galbot_request", "service": service, "request_id": rid, "values": values},
                           separators=(",", ":"))
        await ws.send(frame)

    async def _report_loop(self, ws: ClientConnection) -> None:
        """Report status every ``interval_s`` (with ±20% jitter); close the link when replies stop."""
        with contextlib.suppress(ConnectionClosed):
            await self._report_forever(ws)

    async def _report_forever(self, ws: ClientConnection) -> None:
        """The body of the report loop."""
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock.time_fn()
            dt = 0.0 if self._last_step is None else min(60.0, max(0.0, now - self._last_step))
            self._last_step = now
            report = self.step(dt)
            waiting = [sent for service, sent, _, _ in self._inflight.values() if service == "/api/device/status"]
            limit_s = self.config.request_timeout_s
            if waiting and loop.time() - self._last_rx > limit_s and loop.time() - min(waiting) > limit_s:
                # Requests unanswered and nothing at all received for a while: the link is dead.
                self.stats.reply_timeouts += 1
                self.stats.notify()
                await ws.close(1000, "reply timeout")
                return
            if len(waiting) >= MAX_REPORTS_IN_FLIGHT:
                # The server is slow, not dead (replies still trickle in): let it catch up.
                self.stats.reports_skipped += 1
            else:
                await self._send(ws, "/api/device/status", report)
                self.stats.reports_sent += 1
            self.stats.notify()
            await self.clock.sleep_fn(self.config.interval_s * self.rng.uniform(0.8, 1.2))

    async def _read_loop(self, ws: ClientConnection) -> None:
        """Read frames until the connection closes, dispatching replies and pushes."""
        try:
            await self._read_frames(ws)
        except ConnectionClosed:
            pass
        finally:
            self._fail_inflight()

    async def _read_frames(self, ws: ClientConnection) -> None:
        """The body of the read loop."""
        loop = asyncio.get_running_loop()
        async for raw in ws:
            self._last_rx = loop.time()
            try:
                msg = json.loads(raw)
            except ValueError:
                self.stats.errors[400] += 1
                continue
            if not isinstance(msg, dict):
                self.stats.errors[400] += 1
                continue
            if msg.get("op") == "galbot_push":
                await self._on_push(ws, msg)
            else:
                self._on_reply(msg)

    def _on_reply(self, msg: dict[str, Any]) -> None:
        """Match a reply to its request and count non-zero codes."""
        entry = self._inflight.pop(str(msg.get("request_id")), None)
        if entry is None:
            self.stats.errors[-1] += 1  # a reply to nothing we sent
            return
        service, _, command_id, fut = entry
        code = msg.get("code")
        code = code if isinstance(code, int) else -1
        if code != 0:
            self.stats.errors[code] += 1
        if fut is not None and not fut.done():
            fut.set_result(msg)
        if service == "/api/device/status" and code == 0:
            self.stats.reports_acked += 1
            self._session_acked_report = True
        elif service == "/api/command/ack" and command_id is not None:
            self.ack_replied(command_id, code)
        self.stats.notify()

    async def _on_push(self, ws: ClientConnection, msg: dict[str, Any]) -> None:
        """Handle ``device_command`` and ``command_canceled``; count anything else."""
        service = msg.get("service")
        values = msg.get("values")
        values = values if isinstance(values, dict) else {}
        if service == "device_command":
            action, ack, delay = self.on_command(values)
            cid = str(values.get("command_id"))
            if action == "resend" and ack is not None:
                self.stats.acks_resent += 1
                await self._ack(ws, cid, ack)
            elif action == "ack" and ack is not None:
                await self._ack(ws, cid, ack)
            elif action == "ack" and delay > 0:
                self.stats.acks_slow += 1
                self._pending[cid] = asyncio.create_task(self._slow_ack(ws, cid, values, delay))
            elif action == "ack":
                await self._ack(ws, cid, self.execute(values))
            self.stats.notify()
        elif service == "command_canceled":
            canceled = values.get("command_id")
            if isinstance(canceled, str):
                self.on_canceled(canceled)
            self.stats.notify()
        else:
            self.stats.pushes_other += 1

    async def _slow_ack(self, ws: ClientConnection, cid: str, values: dict[str, Any], delay: float) -> None:
        """Wait, then execute and ack (unless canceled meanwhile)."""
        await self.clock.sleep_fn(delay)
        if self._pending.pop(cid, None) is None:
            return
        with contextlib.suppress(ConnectionClosed):
            await self._ack(ws, cid, self.execute(values))
        self.stats.notify()

    async def _ack(self, ws: ClientConnection, cid: str, ack: dict[str, Any]) -> None:
        """Send an ack and remember it for de-duplication."""
        self.record_ack(cid, ack)
        self.stats.acks_sent += 1
        if not ack["ok"]:
            self.stats.acks_failed += 1
        await self._send(ws, "/api/command/ack", ack, command_id=cid)


class Fleet:
    """Many simulated devices on one event loop."""

    def __init__(self, config: SimConfig) -> None:
        unknown = [t for t in config.types if t not in DEVICE_TYPES]
        if unknown or not config.types:
            raise ValueError(f"unknown device types {unknown}; expected some of {list(DEVICE_TYPES)}")
        self.config = config
        self.stats_ = SimStats()
        self.devices = [SimDevice(config, i, config.types[i % len(config.types)], stats=self.stats_)
                        for i in range(config.devices)]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every device, staggering the first connects at ``connect_rate_per_s``."""
        rate = max(self.config.connect_rate_per_s, 1e-3)
        spread = random.Random(self.config.seed)
        for i, device in enumerate(self.devices):
            delay = i / rate + spread.uniform(0.0, min(self.config.interval_s, 1.0) / 10.0)
            self._tasks.append(asyncio.create_task(device.run(delay), name=f"sim-{device.sn}"))

    async def stop(self) -> None:
        """Close every socket with 1000 and wait for the devices to finish."""
        for device in self.devices:
            device.stopped = True
        await asyncio.gather(*(d.stop() for d in self.devices), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def stats(self) -> SimStats:
        """The fleet's counters (live object; call ``as_dict()`` for a snapshot)."""
        return self.stats_

    async def wait_until(self, predicate: Callable[[SimStats], bool], timeout: float) -> bool:
        """Wait until ``predicate(stats)`` holds or ``timeout`` passes; True when it held."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.stats_):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stats_.changed().wait(), remaining)
        return True

    async def wait_connected(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` devices are logged in; False on timeout."""
        return await self.wait_until(lambda s: s.connected >= n, timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fleetpush simulate`` options to a parser."""
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="core WebSocket URL (ws://HOST:PORT/ws)")
    parser.add_argument("--devices", type=int, default=20, help="number of simulated robots")
    parser.add_argument("--types", nargs="+", choices=DEVICE_TYPES, default=list(DEVICE_TYPES),
                        metavar="T", help=f"device types, assigned round-robin ({', '.join(DEVICE_TYPES)})")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between status reports")
    parser.add_argument("--secret", default=None,
                        help=f"fleet device secret (default: ${SECRET_ENV}; never printed)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible fleets")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after S seconds (default: run until Ctrl-C)")
    parser.add_argument("--sn-prefix", default="SIM", help="serial number prefix")
    parser.add_argument("--ack-failure-rate", type=float, default=0.1,
                        help="share of commands acked with ok=false")
    parser.add_argument("--slow-ack-rate", type=float, default=0.1, help="share of commands acked late")
    parser.add_argument("--slow-ack", type=float, default=3.0, help="seconds a slow ack waits")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulated seconds per real second (e.g. 20 to watch batteries drain)")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build a SimConfig from parsed ``add_arguments`` options."""
    secret = args.secret if args.secret is not None else os.environ.get(SECRET_ENV, "")
    return SimConfig(url=args.url, devices=args.devices, types=list(args.types), interval_s=args.interval,
                     secret=secret, sn_prefix=args.sn_prefix, seed=args.seed,
                     ack_failure_rate=args.ack_failure_rate, slow_ack_rate=args.slow_ack_rate,
                     slow_ack_s=args.slow_ack, time_scale=args.time_scale)


async def run_fleet(config: SimConfig, duration_s: float | None = None, *, summary_every_s: float = 10.0,
                    out: Callable[[str], None] = print, stop_event: asyncio.Event | None = None) -> SimStats:
    """Run a fleet until ``stop_event`` is set or ``duration_s`` passes, printing a summary periodically."""
    stop = stop_event if stop_event is not None else asyncio.Event()
    fleet = Fleet(config)
    loop = asyncio.get_running_loop()
    deadline = None if duration_s is None else loop.time() + duration_s
    await fleet.start()
    try:
        while not stop.is_set():
            wait = summary_every_s if deadline is None else min(summary_every_s, deadline - loop.time())
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if not stop.is_set():
                out(f"simulate: {fleet.stats().summary()}")
    finally:
        await fleet.stop()
    out(f"simulate: final {fleet.stats().summary()}")
    return fleet.stats()


def main(args: argparse.Namespace) -> int:
    """Run ``fleetpush simulate`` until SIGINT/SIGTERM or ``--duration``; returns the exit code."""
    config = config_from_args(args)
    if not config.secret:
        print(f"simulate: no device secret: pass --secret or set {SECRET_ENV}", file=sys.stderr)
        return 2
    if config.devices < 0:
        print("simulate: --devices must be >= 0", file=sys.stderr)
        return 2

    async def _amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError):
                pass  # not the main thread (tests) or no signal support
        try:
            await run_fleet(config, args.duration, stop_event=stop, out=lambda line: print(line, flush=True))
        finally:
            # Keep swallowing signals until asyncio.run has finished: a second Ctrl-C during the
            # shutdown must not turn into a KeyboardInterrupt traceback and exit -2.
            for sig in installed:
                loop.add_signal_handler(sig, lambda: None)

    print(f"simulate: {config.devices} devices of {','.join(config.types)} -> {config.url}", flush=True)
    asyncio.run(_amain())
    return 0
