"""Typed settings: config.yaml plus FLEETPUSH_<SECTION>__<KEY> environment overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Role = Literal["viewer", "operator", "admin"]
ENV_PREFIX = "FLEETPUSH_"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


class Section(BaseModel):
    """Base of every section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ServerSettings(Section):
    host: str = "0.0.0.0"
    port: int = Field(8765, ge=0, le=65535)
    allowed_origins: list[str] = []
    node_id: str = ""
    public_url: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True
    shutdown_grace_s: float = Field(3.0, ge=0, le=30)
    idle_timeout_s: float = Field(30, gt=0)


class OpsUser(Section):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=8, max_length=1024)
    role: Role = "viewer"


class AuthSettings(Section):
    device_secret: str = ""
    admin_password: str = ""
    users: list[OpsUser] = []
    token_window_s: int = Field(300, ge=1)
    login_timeout_s: float = Field(10, gt=0)
    session_ttl_s: int = Field(43200, ge=1)
    max_login_failures: int = Field(5, ge=1)
    replay_ttl_s: int = Field(900, ge=1)
    argon2_time_cost: int = Field(2, ge=1)
    argon2_memory_kib: int = Field(19456, ge=8)
    argon2_parallelism: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _replay_covers_window(self) -> AuthSettings:
        # A replay cache shorter than the token window would let an old token be reused.
        if self.replay_ttl_s < 2 * self.token_window_s:
            raise ValueError("auth.replay_ttl_s must be at least 2 * auth.token_window_s")
        return self


class HeartbeatSettings(Section):
    interval_s: float = Field(20, gt=0)
    timeout_s: float = Field(60, gt=0)
    sweep_interval_s: float = Field(1.0, gt=0)


class LimitsSettings(Section):
    max_message_bytes: int = Field(65536, ge=256)
    outbound_queue: int = Field(1000, ge=1)
    write_timeout_s: float = Field(10, gt=0)
    handler_timeout_s: float = Field(5, gt=0)
    rate_per_s: float = Field(50, gt=0)
    rate_burst: int = Field(100, ge=1)
    rate_abuse_replies: int = Field(50, ge=1)
    max_connections: int = Field(20000, ge=1)
    max_json_depth: int = Field(32, ge=2)
    max_int_digits: int = Field(64, ge=1)


class DevicesSettings(Section):
    types: list[str] = ["retail", "dance_robot", "dance_dog", "rubbish"]


class StoreSettings(Section):
    mongo_url: str = ""
    database: str = "fleetpush"
    server_selection_timeout_s: float = Field(2.0, gt=0)
    op_timeout_s: float = Field(3.0, gt=0)
    status_retention_days: int = Field(30, ge=1)
    batch_max: int = Field(500, ge=1)


class CommandsSettings(Section):
    ack_timeout_s: float = Field(10, gt=0)
    max_backoff_s: float = Field(300, gt=0)
    default_ttl_s: int = Field(300, ge=1)
    max_ttl_s: int = Field(604800, ge=1)
    sweep_interval_s: float = Field(1.0, gt=0)
    idempotency_window_s: int = Field(86400, ge=1)


class BrokerSettings(Section):
    redis_url: str = ""
    node_timeout_s: float = Field(15, gt=0)
    channel_prefix: str = "fleetpush"


class ApiKey(Section):
    name: str
    key: str = Field(min_length=16)
    role: Role = "viewer"


class ApiSettings(Section):
    keys: list[ApiKey] = []
    max_body_bytes: int = Field(1048576, ge=1024)


class DashboardSettings(Section):
    port: int = Field(8501, ge=0, le=65535)
    host: str = "127.0.0.1"
    core_url: str = "http://127.0.0.1:8765"
    refresh_s: float = Field(3, gt=0)


class SimulatorSettings(Section):
    devices: int = Field(20, ge=0)
    interval_s: float = Field(2.0, gt=0)


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file; lowest priority after environment variables."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """Every fleetpush setting; see config.yaml for the meaning of each key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    limits: LimitsSettings = LimitsSettings()
    devices: DevicesSettings = DevicesSettings()
    store: StoreSettings = StoreSettings()
    commands: CommandsSettings = CommandsSettings()
    broker: BrokerSettings = BrokerSettings()
    api: ApiSettings = ApiSettings()
    dashboard: DashboardSettings = DashboardSettings()
    simulator: SimulatorSettings = SimulatorSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_data: dict[str, Any] = getattr(_yaml_holder, "data", {})
        return init_settings, env_settings, _YamlSource(settings_cls, yaml_data)


class _Holder:
    data: dict[str, Any]


_yaml_holder = _Holder()


class ConfigError(Exception):
    """The configuration is invalid; the message names every offending key."""


def _known_env(environ: dict[str, str]) -> None:
    # Reject FLEETPUSH_SECTION__KEY variables that name no section, since a typo would
    # otherwise be silently ignored. Variables without "__" belong to tools, not the core.
    sections = set(Settings.model_fields)
    for name in environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and "__" in upper:
            section = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
            if section not in sections:
                raise ConfigError(f"unknown configuration section in environment variable {name}")


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load config.yaml (or `path`), apply FLEETPUSH_* env overrides, validate strictly."""
    file = Path(path) if path else Path(os.environ.get("FLEETPUSH_CONFIG", "") or REPO_CONFIG)
    data: dict[str, Any] = {}
    if path or file.exists():
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read configuration file {file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        data = loaded
    _known_env(dict(os.environ))
    _yaml_holder.data = data
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({file}): {problems}") from exc
    finally:
        _yaml_holder.data = {}
