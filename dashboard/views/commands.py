"""Send commands to one robot or several, see their states, cancel the ones not yet final."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from core.client import FINAL_COMMAND_STATES, FleetAPIError
from dashboard.common import api, client, fmt_time, refresh_seconds, require_user

_OUTCOME_KEY = "cmd_cancel_outcome"
_WATCH_KEY = "cmd_watch"
STATES = ["pending", "sent", "acked", "failed", "expired", "canceled"]
#: Badge colour of each state in the "just sent" list (Streamlit markdown badge colours).
STATE_COLOURS = {
    "pending": "orange", "sent": "blue", "acked": "green", "failed": "red", "expired": "gray", "canceled": "gray",
}
WATCH_MAX = 20


def parse_args(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse the args box: empty means ``{}``; else a JSON object, or an error message in words."""
    if not text.strip():
        return {}, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"Arguments are not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
    if not isinstance(value, dict):
        return None, f'Arguments must be a JSON object like {{"speed": 2}}, not {type(value).__name__}.'
    return value, None


def send_form(sns: list[str]) -> None:
    """The form that sends one command to the chosen robots."""
    with st.form("send_command"):
        targets = st.multiselect("Robots", sns, key="cmd_targets")
        command = st.text_input("Command", key="cmd_name", placeholder="e.g. dance")
        args_text = st.text_area("Arguments (JSON object)", value="{}", key="cmd_args", height=100)
        ttl = st.number_input("Time to live (s)", min_value=1, max_value=86400, value=300, step=30, key="cmd_ttl")
        submitted = st.form_submit_button("Send command", type="primary")
    if not submitted:
        return
    args, problem = parse_args(args_text)
    if problem is not None or args is None:
        st.error(problem)
        return
    if not targets:
        st.error("Choose at least one robot.")
        return
    if not command.strip():
        st.error("Enter a command name.")
        return
    fleet = client()
    sent: list[str] = []
    watched: list[str] = list(st.session_state.get(_WATCH_KEY, []))
    for sn in targets:
        try:
            receipt = fleet.send_command(sn, command.strip(), args=args, ttl_s=int(ttl))
        except FleetAPIError as exc:
            st.error(f"Could not send {command.strip()!r} to {sn}: {exc.msg}")
            continue
        sent.append(f"{sn}: {receipt.command_id} ({receipt.state})")
        watched.insert(0, receipt.command_id)
    st.session_state[_WATCH_KEY] = watched[:WATCH_MAX]
    if sent:
        st.success(f"Sent {command.strip()!r} to {len(sent)} robot(s): " + "; ".join(sent))


def watch() -> None:
    """The commands sent from this session, newest first, with their current state."""
    watched = [str(cid) for cid in st.session_state.get(_WATCH_KEY, [])]
    if not watched:
        return
    st.subheader("Sent from here")
    fleet = client()
    with st.container(key="sent_from_here"):
        for cid in watched:
            try:
                cmd = fleet.command(cid)
            except FleetAPIError as exc:
                st.markdown(f"`{cid}` · could not load its state: {_escape(exc.msg)}")
                continue
            colour = STATE_COLOURS.get(cmd.state, "gray")
            tries = f" · {cmd.attempts} attempt(s)" if cmd.attempts else ""
            why = cmd.result.get("msg") if isinstance(cmd.result, dict) and cmd.state == "failed" else None
            because = f" · the robot said: {_escape(str(why))}" if why else ""
            what = f"**{_escape(cmd.sn)}** · {_escape(cmd.command)}"
            st.markdown(f"`{cid}` · {what} · :{colour}-badge[{cmd.state}]{tries}{because}")


def _escape(text: str) -> str:
    """Text from a robot shown literally in markdown (no links, emphasis or badges of its own)."""
    return "".join(f"\\{c}" if c in "\\`*_[]<>:|~$" else c for c in text[:200])


def recent(sns: list[str]) -> None:
    """The table of recent commands and the cancel control."""
    st.subheader("Recent commands")
    show_cancel_outcome()
    left, right = st.columns(2)
    sn = left.selectbox("Robot", ["All robots", *sns], key="cmd_filter_sn")
    state = right.selectbox("State", ["All states", *STATES], key="cmd_filter_state")
    frame = api(
        lambda: client().commands_frame(
            sn=None if sn == "All robots" else sn, state=None if state == "All states" else state
        ),
        "load the commands",
    )
    if frame is None:
        return
    if frame.empty:
        st.caption("No commands match.")
        return
    columns = [
        "command_id",
        "sn",
        "command",
        "args",
        "state",
        "created_at",
        "expires_at",
        "attempts",
        "result",
        "issued_by",
    ]
    table = frame.head(200)[columns].copy()
    for column in ("args", "result"):
        table[column] = table[column].map(lambda value: "" if value is None else json.dumps(value, sort_keys=True))
    for column in ("created_at", "expires_at"):
        table[column] = table[column].map(fmt_time)
    st.dataframe(table, hide_index=True, width="stretch")

    open_ids = [
        str(cid)
        for cid, st_ in zip(frame["command_id"], frame["state"], strict=True)
        if st_ not in FINAL_COMMAND_STATES
    ]
    if not open_ids:
        st.caption("Every listed command is final; none can be canceled.")
        return
    with st.form("cancel_command"):
        st.selectbox("Command to cancel (not final)", open_ids, key="cmd_cancel_id")
        # The cancel runs in the click callback, before the rerun reloads the list: a command that
        # became final meanwhile then answers 409 in words instead of silently leaving the list.
        st.form_submit_button("Cancel command", on_click=_cancel_selected)


def _cancel_selected() -> None:
    """Cancel the command chosen in the cancel form; the outcome is shown on the next run."""
    target = st.session_state.get("cmd_cancel_id")
    if not isinstance(target, str) or not target:
        return
    try:
        result = client().cancel_command(target)
    except FleetAPIError as exc:
        st.session_state[_OUTCOME_KEY] = ("error", f"Could not cancel {target}: {exc.msg}")
        return
    st.session_state[_OUTCOME_KEY] = ("success", f"Command {result.command_id} is now {result.state}.")


def show_cancel_outcome() -> None:
    """Show, once, how the last cancel went."""
    outcome = st.session_state.pop(_OUTCOME_KEY, None)
    if outcome is None:
        return
    kind, text = outcome
    if kind == "error":
        st.error(text)
    else:
        st.success(text)


def render() -> None:
    """The commands page (operators and admins)."""
    user = require_user()
    st.title("Commands")
    if not user.can_operate:
        st.info("Your role is viewer: you can read commands but not send or cancel them.")
        return
    devices = api(lambda: client().devices(), "load the device list")
    sns = sorted(device.sn for device in devices or [])
    send_form(sns)
    interval = refresh_seconds()

    @st.fragment(run_every=interval)
    def live() -> None:
        # States change on their own (sent, acked, expired): this part refreshes itself.
        watch()
        recent(sns)

    live()


render()
