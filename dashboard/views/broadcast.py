"""Push a message to many connections at once: everyone, a device type, a list of sns or a user."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from dashboard.common import api, client, require_user

TARGETS = ["Every connection", "Device type", "List of sns", "Username (admin)"]


def parse_message(text: str, as_json: bool) -> tuple[Any, str | None]:
    """The message to send: parsed JSON, or the text as it is; an error message for invalid JSON."""
    if not as_json:
        return text, None
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"The message is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."


def render() -> None:
    """The broadcast page (operators and admins)."""
    user = require_user()
    st.title("Broadcast")
    if not user.can_operate:
        st.info("Your role is viewer: broadcasts need an operator or admin.")
        return
    kind = st.radio("Send to", TARGETS, horizontal=True, key="bc_kind")
    target: dict[str, Any] = {}
    with st.form("broadcast"):
        if kind == "Device type":
            target["type"] = st.text_input("Device type", key="bc_type", placeholder="retail").strip()
        elif kind == "List of sns":
            raw = st.text_area("Serial numbers (comma or newline separated)", key="bc_sns")
            target["sns"] = [part.strip() for part in raw.replace(",", "\n").splitlines() if part.strip()]
        elif kind == "Username (admin)":
            if not user.is_admin:
                st.caption("Only admins may target a username; the core will refuse it for you.")
            target["username"] = st.text_input("Username", key="bc_username").strip()
        service = st.text_input("Push service", value="broadcast", key="bc_service")
        fmt = st.radio("Message format", ["Text", "JSON"], horizontal=True, key="bc_format")
        text = st.text_area("Message", key="bc_message", height=120)
        submitted = st.form_submit_button("Broadcast", type="primary")
    if not submitted:
        return
    message, problem = parse_message(text, fmt == "JSON")
    if problem is not None:
        st.error(problem)
        return
    if kind != "Every connection" and not any(target.values()):
        st.error(f"Fill in the target ({kind.lower()}) or choose 'Every connection'.")
        return
    result = api(
        lambda: client().broadcast(message, service=service.strip() or "broadcast", target=target or None),
        "broadcast",
    )
    if result is not None:
        st.success(f"Matched {result.matched} connection(s), queued {result.queued} frame(s).")
        a, b = st.columns(2)
        a.metric("Matched", result.matched)
        b.metric("Queued", result.queued)


render()
