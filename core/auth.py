"""Device HMAC tokens and replay protection, ops passwords (argon2id, off the loop), sessions, roles."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .clock import Clock, utc
from .config import Settings
from .errors import ServiceError
from .metrics import Metrics
from .store import Store

log = logging.getLogger("fleetpush.auth")

ROLES = ("viewer", "operator", "admin")
_RANK = {"viewer": 1, "operator": 2, "admin": 3}
# Compared against when the sn is unknown, so an unknown sn costs the same as a wrong token.
_DUMMY_KEY = secrets.token_bytes(32)


def role_allows(role: str | None, needed: str) -> bool:
    """True when `role` is at least the `needed` ops role."""
    return role is not None and _RANK.get(role, 0) >= _RANK.get(needed, 99)


def device_token(secret: str, sn: str, timestamp: int) -> str:
    """The token a device sends: lowercase hex HMAC-SHA256 of "{sn}:{timestamp}"."""
    return hmac.new(secret.encode("utf-8"), f"{sn}:{timestamp}".encode(), hashlib.sha256).hexdigest()


def token_matches(secret: str | None, sn: str, timestamp: int, token: str) -> bool:
    """Constant-time check of a device token; an unknown device is checked against a dummy key."""
    key = secret.encode("utf-8") if secret else _DUMMY_KEY
    expected = hmac.new(key, f"{sn}:{timestamp}".encode(), hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected.encode(), token.encode("utf-8", "replace"))
    return ok and secret is not None


def new_secret() -> str:
    """A fresh per-device secret."""
    return secrets.token_hex(32)


def new_session_token() -> str:
    """A fresh ops session token."""
    return "fps_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps instead of a session token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class Principal:
    """Who an ops token belongs to."""

    username: str
    role: str
    expires_at: datetime | None
    api_key: bool = False


@dataclass(slots=True)
class DeviceIdentity:
    """A device that passed login."""

    sn: str
    type: str
    registered: bool


class LoginThrottle:
    """Counts failed logins per username within a sliding minute."""

    def __init__(self, clock: Clock, limit: int, window_s: float = 60.0) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window_s
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, username: str) -> deque[float]:
        now = self._clock.monotonic()
        q = self._failures.setdefault(username, deque())
        while q and now - q[0] >= self._window:
            q.popleft()
        return q

    def blocked(self, username: str) -> bool:
        """True when the username has used up its failures for this minute."""
        q = self._recent(username)
        if not q:
            self._failures.pop(username, None)
        return len(q) >= self._limit

    def failed(self, username: str) -> None:
        """Record one failure."""
        self._recent(username).append(self._clock.monotonic())
        if len(self._failures) > 100_000:
            # Bound memory under a spray of random usernames: forget the oldest entries.
            for key in list(self._failures)[:50_000]:
                del self._failures[key]


class Authenticator:
    """Verifies devices and ops users and issues session tokens."""

    def __init__(self, settings: Settings, store: Store, clock: Clock, executor: Executor, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.executor = executor
        self.metrics = metrics
        a = settings.auth
        self._hasher = PasswordHasher(
            time_cost=a.argon2_time_cost, memory_cost=a.argon2_memory_kib, parallelism=a.argon2_parallelism
        )
        self.throttle = LoginThrottle(clock, a.max_login_failures)
        self._dummy_hash: str | None = None
        self._keys = {k.key: k for k in settings.api.keys}

    async def hash_password(self, password: str) -> str:
        """argon2id hash, computed on the executor so the event loop keeps serving."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._hasher.hash, password)

    async def _verify(self, stored: str, password: str) -> bool:
        def check() -> bool:
            try:
                return self._hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return False

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, check)

    async def ensure_admin(self) -> str | None:
        """Create the `admin` user on first start; returns a generated password to print once."""
        if await self.store.get_user("admin") is not None:
            return None
        password = self.settings.auth.admin_password
        generated = None
        if not password:
            password = generated = secrets.token_urlsafe(12)
        created = await self.store.create_user("admin", await self.hash_password(password), "admin", self._now())
        return generated if created else None

    async def ensure_users(self) -> int:
        """Create the ops users listed in auth.users that do not exist yet; returns how many."""
        made = 0
        for u in self.settings.auth.users:
            if await self.store.get_user(u.username) is None and await self.create_user(u.username, u.password, u.role):
                made += 1
        return made

    async def create_user(self, username: str, password: str, role: str) -> bool:
        """Add an ops user; False when the name is taken."""
        if role not in ROLES:
            raise ServiceError(400, f"unknown role {role!r}")
        return await self.store.create_user(username, await self.hash_password(password), role, self._now())

    def _now(self) -> datetime:
        return utc(self.clock.time())

    async def login_ops(self, username: str, password: str) -> tuple[str, Principal]:
        """Check a username and password; returns a new session token, or raises 401/429."""
        if self.throttle.blocked(username):
            self.metrics.logins.labels("ops", "throttled").inc()
            raise ServiceError(429, "too many failed logins; try again in a minute")
        user = await self.store.get_user(username)
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash_password(secrets.token_hex(8))
        # An unknown user still costs one hash verification, so timing does not reveal names.
        ok = await self._verify(user["password_hash"] if user else self._dummy_hash, password)
        if not ok or user is None:
            self.throttle.failed(username)
            self.metrics.logins.labels("ops", "failed").inc()
            raise ServiceError(401, "invalid username or password")
        token = new_session_token()
        expires = self._now() + timedelta(seconds=self.settings.auth.session_ttl_s)
        await self.store.create_session(token_hash(token), username, user["role"], expires)
        self.metrics.logins.labels("ops", "ok").inc()
        return token, Principal(username, user["role"], expires)

    async def resolve_token(self, token: str) -> Principal | None:
        """The principal behind a bearer token (session or API key), or None when invalid or expired."""
        key = self._keys.get(token)
        if key is not None:
            return Principal(f"key:{key.name}", key.role, None, api_key=True)
        if not token.startswith("fps_"):
            return None
        doc = await self.store.get_session(token_hash(token))
        if doc is None or doc["expires_at"] <= self._now():
            return None
        return Principal(doc["username"], doc["role"], doc["expires_at"])

    async def login_device(self, sn: str, timestamp: int, token: str, type_: str) -> DeviceIdentity:
        """Verify a device token and claim it against replays; raises 401 on any failure."""
        now = self.clock.time()
        window = self.settings.auth.token_window_s
        if abs(now - timestamp) > window:
            self.metrics.logins.labels("device", "clock_skew").inc()
            raise ServiceError(
                401, "timestamp outside the accepted window; resync the clock", values={"server_time": int(now)}
            )
        device = await self.store.get_device(sn)
        secret = device.get("secret") if device else None
        fleet = self.settings.auth.device_secret
        registered = device is not None
        if not secret and fleet:
            secret = fleet
        if not token_matches(secret, sn, timestamp, token):
            self.metrics.logins.labels("device", "failed").inc()
            raise ServiceError(401, "login failed")
        expires = utc(now + self.settings.auth.replay_ttl_s)
        if not await self.store.claim_token(sn, timestamp, expires):
            self.metrics.logins.labels("device", "replay").inc()
            raise ServiceError(401, "login failed: token already used")
        if device is None:
            if type_ not in self.settings.devices.types:
                raise ServiceError(400, f"unknown device type {type_!r}")
            await self.store.create_device(sn, type_, sn, None, utc(now))
        self.metrics.logins.labels("device", "ok").inc()
        dtype = device["type"] if device else type_
        return DeviceIdentity(sn, dtype, registered)
