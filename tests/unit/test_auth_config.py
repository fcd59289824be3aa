"""Auth primitives and configuration loading."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
import yaml

from core.auth import LoginThrottle, device_token, role_allows, token_matches
from core.clock import ManualClock
from core.config import ConfigError, Settings, load_settings


def test_device_token_is_hmac_sha256_hex() -> None:
    expected = hmac.new(b"s3cret", b"DOG-0001:1795000000", hashlib.sha256).hexdigest()
    assert device_token("s3cret", "DOG-0001", 1795000000) == expected
    assert token_matches("s3cret", "DOG-0001", 1795000000, expected)
    assert not token_matches("s3cret", "DOG-0001", 1795000001, expected)
    assert not token_matches("other", "DOG-0001", 1795000000, expected)
    assert not token_matches("s3cret", "DOG-0001", 1795000000, expected[:-2])
    assert not token_matches("s3cret", "DOG-0001", 1795000000, "zz" * 32)
    assert not token_matches("s3cret", "DOG-0001", 1795000000, "é" * 10)
    # An unknown device (no secret) never matches, even with a token made from an empty key.
    assert not token_matches(None, "DOG-0001", 1795000000, device_token("", "DOG-0001", 1795000000))


def test_roles_are_ordered() -> None:
    assert role_allows("admin", "operator") and role_allows("operator", "viewer")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")
    assert not role_allows(None, "viewer") and not role_allows("root", "viewer")


def test_login_throttle_counts_a_sliding_minute() -> None:
    clock = ManualClock()
    t = LoginThrottle(clock, limit=5)
    for _ in range(5):
        assert not t.blocked("alice")
        t.failed("alice")
    assert t.blocked("alice") and not t.blocked("bob")
    clock.advance(59)
    assert t.blocked("alice")
    clock.advance(1.5)
    assert not t.blocked("alice")


def test_config_yaml_lists_every_setting_with_its_default() -> None:
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "config.yaml").read_text())
    defaults = Settings().model_dump()
    assert set(data) == set(defaults)
    for section, values in defaults.items():
        assert set(data[section]) == set(values), section
        for key, value in values.items():
            assert data[section][key] == value, f"{section}.{key}: config.yaml says {data[section][key]!r}"


def test_env_overrides_and_unknown_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEETPUSH_SERVER__PORT", "9000")
    monkeypatch.setenv("FLEETPUSH_AUTH__DEVICE_SECRET", "abc")
    s = load_settings()
    assert s.server.port == 9000 and s.auth.device_secret == "abc"
    monkeypatch.setenv("FLEETPUSH_SERVER__PROT", "1")
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_settings()
    monkeypatch.delenv("FLEETPUSH_SERVER__PROT")
    monkeypatch.setenv("FLEETPUSH_SERVR__PORT", "1")
    with pytest.raises(ConfigError, match="FLEETPUSH_SERVR__PORT"):
        load_settings()
    monkeypatch.delenv("FLEETPUSH_SERVR__PORT")
    bad = tmp_path / "c.yaml"
    bad.write_text("server:\n  port: 1\n  colour: blue\n")
    with pytest.raises(ConfigError, match="colour"):
        load_settings(bad)
    bad.write_text("limits:\n  outbound_queue: -1\n")
    with pytest.raises(ConfigError, match="outbound_queue"):
        load_settings(bad)
    # Variables without a section (tools' own settings) are left alone.
    monkeypatch.setenv("FLEETPUSH_TEST_MONGO_URL", "mongodb://x")
    assert load_settings().server.port == 9000
