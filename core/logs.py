"""Logging: text or JSON lines, with request fields, and a last-line filter that masks secrets."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_FIELDS = ("request_id", "service", "sn", "username", "latency_ms", "code", "conn", "method", "path", "status")
# Defence in depth: anything shaped like a credential is masked even if some code logs it by mistake.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(\"?(?:token|password|secret|authorization|api_key|key)\"?\s*[:=]\s*\"?)([^\s\",}]+)"),
    re.compile(r"(?i)(bearer\s+)(\S+)"),
    re.compile(r"(fps_)[A-Za-z0-9_\-]{8,}"),
]


def redact(text: str) -> str:
    """Mask credential-shaped substrings."""
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: m.group(1) + "***", text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask and keep the record."""
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the request fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as text."""
        base = super().format(record)
        extras = " ".join(f"{k}={getattr(record, k)}" for k in _FIELDS if getattr(record, k, None) is not None)
        if record.exc_info and extras:
            head, _, rest = base.partition("\n")
            return redact(f"{head} [{extras}]\n{rest}")
        return redact(f"{base} [{extras}]" if extras else base)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger once: stderr, chosen format, redaction."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_fleetpush", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    handler._fleetpush = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("tornado.access").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
