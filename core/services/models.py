"""Values models shared by the WebSocket services and the HTTP API, so both validate alike."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def _to_utc(v: datetime) -> datetime:
    # A time without an offset is taken as UTC, so naive and aware inputs compare alike.
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc)]

SN = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
RESERVED_PUSHES = frozenset(
    {"device_status", "device_online", "device_offline", "command_update", "device_command", "command_canceled"}
)


class Args(BaseModel):
    """Base of every values model: unknown fields are an error the sender hears about."""

    model_config = ConfigDict(extra="forbid", str_max_length=4096)


class NoArgs(Args):
    """A service that takes no values."""


class DeviceLogin(Args):
    sn: str = SN
    timestamp: int = Field(ge=0, le=2**40)
    token: str = Field(min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=64)
    firmware: str | None = Field(None, max_length=64)


class StatusReport(Args):
    sn: str | None = Field(None, max_length=64, description="optional; must be the logged-in device's sn")
    location_code: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    location_msg: str | None = Field(None, max_length=256)
    inspection_code: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    inspection_msg: str | None = Field(None, max_length=256)
    rubbish_code: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    rubbish_msg: str | None = Field(None, max_length=256)
    electricity_code: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    electricity_msg: str | None = Field(None, max_length=256)
    battery: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    extra: dict[str, Any] | None = None

    @field_validator("extra")
    @classmethod
    def _extra_small(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and len(json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()) > 4096:
            raise ValueError("extra must be at most 4096 bytes as JSON")
        return v

    @model_validator(mode="after")
    def _at_least_one(self) -> StatusReport:
        if not self.fields():
            raise ValueError("at least one status field is required")
        return self

    def fields(self) -> dict[str, Any]:
        """The status fields that were given."""
        return self.model_dump(exclude_none=True, exclude={"sn"})


class CommandAck(Args):
    command_id: str = Field(min_length=1, max_length=64)
    ok: bool
    code: int = Field(0, ge=-(2**31), le=2**31 - 1)
    msg: str = Field("", max_length=1024)
    values: dict[str, Any] = {}


class OpsLogin(Args):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class DeviceListQuery(Args):
    type: str | None = Field(None, max_length=64)
    online: bool | None = None


class HistoryQuery(Args):
    sn: str = SN
    since: UtcDatetime | None = None
    until: UtcDatetime | None = None
    limit: int = Field(500, ge=1, le=10000)


class SubscribeArgs(Args):
    sns: list[str] = Field(default_factory=list, max_length=10000)
    types: list[str] = Field(default_factory=list, max_length=64)


class CommandCreate(Args):
    command: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] = {}
    ttl_s: int | None = Field(None, ge=1)
    idempotency_key: str | None = Field(None, min_length=1, max_length=128)


class DeviceCommand(CommandCreate):
    sn: str = SN


class BroadcastTarget(Args):
    type: str | None = Field(None, max_length=64)
    sns: list[str] | None = Field(None, max_length=10000)
    username: str | None = Field(None, max_length=64)
    role: str | None = Field(None, max_length=16)


class Broadcast(Args):
    service: str = Field("broadcast", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_./-]+$")
    message: Any = None
    target: BroadcastTarget | None = None

    @field_validator("service")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        # A broadcast must never look like a command or a status push to firmware.
        if v in RESERVED_PUSHES:
            raise ValueError(f"{v} is reserved for the server's own pushes")
        return v


class DeviceCreate(Args):
    sn: str = SN
    type: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, max_length=128)
