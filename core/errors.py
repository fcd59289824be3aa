"""The two ways a request can fail: a reply error, or closing the connection."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A failure that becomes one error reply; the connection stays open."""

    def __init__(
        self,
        code: int,
        msg: str,
        errors: list[dict[str, Any]] | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.errors = errors
        self.values = values

    def reply_values(self) -> dict[str, Any] | None:
        """The `values` of the error reply: per-field errors, extra values, or null."""
        if self.errors is None and self.values is None:
            return None
        out: dict[str, Any] = dict(self.values or {})
        if self.errors is not None:
            out["errors"] = self.errors
        return out


class StoreUnavailable(ServiceError):
    """The store did not answer in time or refused; replied as 503."""

    def __init__(self, msg: str = "storage unavailable") -> None:
        super().__init__(503, msg)


class Disconnect(Exception):
    """Close the connection with a WebSocket close code (after any reply already queued)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


# Close codes of PROTOCOL §1.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_UNAUTHORIZED = 4401
CLOSE_HEARTBEAT = 4408
CLOSE_REPLACED = 4409
CLOSE_RATE_LIMIT = 4429
CLOSE_SLOW_CONSUMER = 4503
