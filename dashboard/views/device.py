"""One robot: its latest status, its status history as charts, and its recent commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.client import STATUS_CODE_FIELDS, Device
from dashboard.common import api, client, code_style, fmt_time, require_user, severity_styler

WINDOWS: dict[str, timedelta | None] = {
    "Last 15 minutes": timedelta(minutes=15),
    "Last hour": timedelta(hours=1),
    "Last 6 hours": timedelta(hours=6),
    "Last 24 hours": timedelta(hours=24),
    "Everything (up to the limit)": None,
}


def latest(device: Device) -> None:
    """Presence, battery and the latest codes of one device."""
    status = device.status
    a, b, c, d = st.columns(4)
    a.metric("State", "online" if device.online else "offline")
    b.metric("Battery", "—" if status.battery is None else f"{status.battery:.0f} %")
    c.metric("Last seen", "—" if device.last_seen is None else f"{device.last_seen:%H:%M:%S} UTC")
    d.metric("Type", device.type)
    rows = [
        {
            "field": field.removesuffix("_code"),
            "code": getattr(status, field),
            "message": getattr(status, field.replace("_code", "_msg")) or "",
        }
        for field in STATUS_CODE_FIELDS
    ]
    codes = pd.DataFrame(rows).astype({"code": "Int64"})
    st.dataframe(codes.style.map(code_style, subset=["code"]).format(na_rep="—"), hide_index=True, width="stretch")
    st.caption(f"Status received {fmt_time(status.ts)}" + (f" · name: {device.name}" if device.name else ""))


def battery_chart(history: pd.DataFrame) -> None:
    """Battery over time as a line."""
    points = history.dropna(subset=["battery"])
    if points.empty:
        st.caption("No battery readings in this window.")
        return
    figure = go.Figure(go.Scatter(x=points["ts"], y=points["battery"], mode="lines+markers", name="battery"))
    figure.add_hline(y=20, line_dash="dot", line_color="#c62828", annotation_text="low")
    figure.update_layout(
        title={"text": "Battery", "x": 0, "font": {"size": 15}},
        height=280,
        margin={"t": 40, "b": 10},
        yaxis={"range": [0, 100], "title": "%"},
    )
    st.plotly_chart(figure, width="stretch")


def codes_chart(history: pd.DataFrame) -> None:
    """Each status code over time as a step line (a code holds until the next report changes it)."""
    figure = go.Figure()
    for field in STATUS_CODE_FIELDS:
        points = history.dropna(subset=[field])
        if points.empty:
            continue
        figure.add_trace(
            go.Scatter(
                x=points["ts"],
                y=points[field].astype(float),
                mode="lines+markers",
                line_shape="hv",
                name=field.removesuffix("_code"),
            )
        )
    if not figure.data:
        st.caption("No status codes in this window.")
        return
    top = max(float(max(trace.y, default=0)) for trace in figure.data)
    figure.update_yaxes(dtick=max(1, int(-(-top // 5))))  # codes are whole numbers: no 0.2 ticks
    figure.update_layout(
        title={"text": "Status codes", "x": 0, "font": {"size": 15}},
        height=280,
        margin={"t": 40, "b": 10},
        yaxis={"title": "code (0 = ok)", "rangemode": "tozero"},
    )
    st.plotly_chart(figure, width="stretch")


def render() -> None:
    """The device page."""
    require_user()
    st.title("Device")
    devices = api(lambda: client().devices(), "load the device list")
    if devices is None:
        return
    if not devices:
        st.info("No devices are registered yet.")
        return
    sns = sorted(device.sn for device in devices)
    wanted = st.query_params.get("sn")
    if isinstance(wanted, str) and wanted in sns and "device_sn" not in st.session_state:
        st.session_state["device_sn"] = wanted
    online = [device.sn for device in sorted(devices, key=lambda d: d.sn) if device.online]
    first = sns.index(online[0]) if online else 0  # open on a live robot: its charts move
    sn = st.selectbox("Robot", sns, index=first, key="device_sn")
    if sn is None:
        return
    device = api(lambda: client().device(sn), f"load device {sn}")
    if device is None:
        return
    latest(device)

    st.subheader("History")
    left, right = st.columns([2, 1])
    window = left.selectbox("Window", list(WINDOWS), index=1, key="device_window")
    limit = int(right.number_input("At most", min_value=1, max_value=10000, value=500, key="device_limit"))
    span = WINDOWS[window]
    since = datetime.now(UTC) - span if span is not None else None
    history = api(lambda: client().history_frame(sn, since=since, limit=limit), f"load the history of {sn}")
    if history is not None:
        if history.empty:
            st.caption("No status reports in this window.")
        else:
            battery_chart(history)
            codes_chart(history)
            with st.expander(f"{len(history)} snapshots"):
                st.dataframe(severity_styler(history.drop(columns=["extra"])), hide_index=True)

    st.subheader("Recent commands")
    commands = api(lambda: client().commands_frame(sn=sn), f"load the commands of {sn}")
    if commands is not None:
        if commands.empty:
            st.caption("No commands for this robot.")
        else:
            shown = commands.head(20)[["command_id", "command", "state", "created_at", "acked_at", "attempts"]]
            st.dataframe(shown, hide_index=True, width="stretch")


render()
