"""What every dashboard page shares: the core URL, the logged-in user, the API client, errors, colours.

The dashboard talks to the core only through :mod:`core.client`. Settings come from the environment:

- ``FLEETPUSH_CORE_URL``: base URL of the core's HTTP API (default ``http://127.0.0.1:8765``);
  ``streamlit run dashboard/app.py -- --core-url URL`` overrides it.
- ``FLEETPUSH_DASHBOARD_REFRESH_S``: seconds between automatic refreshes of live views (default 3).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from core.client import STATUS_CODE_FIELDS, FleetAPIError, FleetAuthError, FleetClient, LoginInfo
from dashboard.launch import ENV_CORE_URL

ENV_REFRESH_S = "FLEETPUSH_DASHBOARD_REFRESH_S"
DEFAULT_CORE_URL = "http://127.0.0.1:8765"
DEFAULT_REFRESH_S = 3.0
LOW_BATTERY = 20.0

_USER_KEY = "fleetpush_user"
_CLIENT_KEY = "fleetpush_client"
_FLASH_KEY = "fleetpush_flash"
CORE_URL_KEY = "fleetpush_core_url"

T = TypeVar("T")

OK_STYLE = "background-color: #d4edda; color: #155724"
BAD_STYLE = "background-color: #f8d7da; color: #721c24"


@dataclass(frozen=True)
class User:
    """The ops user this browser session is logged in as."""

    username: str
    role: str
    token: str
    expires_at: datetime | None

    @property
    def can_operate(self) -> bool:
        """Operators and admins may send commands and broadcasts; viewers only read."""
        return self.role in ("operator", "admin")

    @property
    def is_admin(self) -> bool:
        """Admins may see connections and target broadcasts by username or role."""
        return self.role == "admin"


def _core_url_from_argv(argv: list[str]) -> str | None:
    """The value of ``--core-url`` among the script arguments, if given."""
    for index, arg in enumerate(argv):
        if arg == "--core-url" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--core-url="):
            return arg.split("=", 1)[1]
    return None


def core_url() -> str:
    """The core's base URL: session override, then ``--core-url``, then the environment, then the default."""
    override = st.session_state.get(CORE_URL_KEY)
    if isinstance(override, str) and override:
        return override
    return _core_url_from_argv(sys.argv[1:]) or os.environ.get(ENV_CORE_URL) or DEFAULT_CORE_URL


def refresh_seconds() -> float:
    """Seconds between live refreshes: ``FLEETPUSH_DASHBOARD_REFRESH_S``, default 3, at least 0.5."""
    raw = os.environ.get(ENV_REFRESH_S, "")
    try:
        value = float(raw) if raw else DEFAULT_REFRESH_S
    except ValueError:
        return DEFAULT_REFRESH_S
    return max(value, 0.5) if value == value else DEFAULT_REFRESH_S  # NaN check


def current_user() -> User | None:
    """The logged-in user of this session, or None."""
    user = st.session_state.get(_USER_KEY)
    if not isinstance(user, User):
        return None
    if user.expires_at is not None and user.expires_at <= datetime.now(UTC):
        logout("Your session expired. Please log in again.")
        return None
    return user


def require_user() -> User:
    """The logged-in user; stops the page with a note when there is none."""
    user = current_user()
    if user is None:
        st.info("Please log in first.")
        st.stop()
    return user


def remember_login(info: LoginInfo) -> User:
    """Keep a successful login in the session."""
    user = User(username=info.username, role=info.role, token=info.token, expires_at=info.expires_at)
    st.session_state[_USER_KEY] = user
    st.session_state.pop(_CLIENT_KEY, None)
    return user


def logout(reason: str | None = None) -> None:
    """Forget the login (and the client); ``reason`` is shown on the login page."""
    st.session_state.pop(_USER_KEY, None)
    client = st.session_state.pop(_CLIENT_KEY, None)
    if isinstance(client, FleetClient):
        client.close()
    if reason:
        st.session_state[_FLASH_KEY] = reason


def pop_flash() -> str | None:
    """The message left by the last logout, once."""
    value = st.session_state.pop(_FLASH_KEY, None)
    return value if isinstance(value, str) else None


def client() -> FleetClient:
    """The API client for this session, carrying the user's token."""
    user = current_user()
    url = core_url()
    token = user.token if user else None
    existing = st.session_state.get(_CLIENT_KEY)
    if isinstance(existing, FleetClient) and existing.base_url == url.rstrip("/") and existing.token == token:
        return existing
    if isinstance(existing, FleetClient):
        existing.close()
    fresh = FleetClient(url, token=token)
    st.session_state[_CLIENT_KEY] = fresh
    return fresh


def api(call: Callable[[], T], what: str) -> T | None:
    """Run one API call; on failure show what went wrong in words (``st.error``) and return None."""
    try:
        return call()
    except FleetAuthError as exc:
        if current_user() is not None:
            logout(f"Your session ended ({exc.msg}). Please log in again.")
            st.error(f"Could not {what}: your session ended ({exc.msg}). Please log in again.")
            if st.button("Go to login", key=f"relogin-{what}"):
                st.rerun()
        else:
            st.error(f"Could not {what}: {exc.msg}")
    except FleetAPIError as exc:
        st.error(f"Could not {what}: {exc.msg}")
    return None


def fmt_time(value: Any) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM:SS UTC``, or an em dash when missing."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "—"
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize(UTC)
    return f"{stamp.tz_convert(UTC):%Y-%m-%d %H:%M:%S} UTC"


def now_utc() -> str:
    """The current time, for 'updated at' captions."""
    return f"{datetime.now(UTC):%H:%M:%S} UTC"


def code_style(value: Any) -> str:
    """Colour of one status code cell: 0 is ok (green), anything else a warning (red)."""
    if value is None or pd.isna(value):
        return ""
    return OK_STYLE if value == 0 else BAD_STYLE


def battery_style(value: Any) -> str:
    """Colour of a battery cell: red below 20 %."""
    if value is None or pd.isna(value):
        return ""
    return BAD_STYLE if float(value) < LOW_BATTERY else OK_STYLE


def severity_styler(frame: pd.DataFrame) -> Any:
    """A pandas Styler that colours status codes and battery by severity."""
    codes = [column for column in STATUS_CODE_FIELDS if column in frame.columns]
    styler = frame.style.map(code_style, subset=codes)
    if "battery" in frame.columns:
        styler = styler.map(battery_style, subset=["battery"])
    styler = styler.format(na_rep="—")
    if "battery" in frame.columns:
        styler = styler.format(precision=1, na_rep="—", subset=["battery"])
    return styler
