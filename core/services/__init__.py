"""The ServerRules table: every WebSocket service, its handler, its values model and who may call it."""

from __future__ import annotations

from ..registry import Rule
from . import device, ops

# Adding a service is one handler function plus one line in its module's RULES.
SERVICE_TABLE: list[Rule] = [*device.RULES, *ops.RULES]
