"""The core's health: readiness, push success and failure, counters and live connections."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from core.client import FleetAPIError
from dashboard.common import api, client, fmt_time, now_utc, refresh_seconds, require_user


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested counters into dotted names (``devices_online.retail``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def readiness() -> None:
    """Readiness of the core (its store)."""
    try:
        ready = client().readyz()
    except FleetAPIError as exc:
        st.error(f"Core unreachable: {exc.msg}")
        return
    if ready:
        st.success("Core ready: the store answers.")
    else:
        st.error("Core not ready: the store does not answer (/readyz is 503).")


def pushes() -> None:
    """Push success and failure counts from /metrics."""
    totals = api(lambda: client().push_totals(), "read /metrics")
    if totals is None:
        return
    a, b = st.columns(2)
    a.metric("Pushes delivered", f"{totals.success:.0f}")
    b.metric("Pushes failed", f"{totals.failure:.0f}")
    services = sorted({*totals.success_by_service, *totals.failure_by_service})
    if services:
        rows = [
            {
                "service": name or "(none)",
                "delivered": totals.success_by_service.get(name, 0.0),
                "failed": totals.failure_by_service.get(name, 0.0),
            }
            for name in services
        ]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    if totals.failure_by_error_type:
        st.caption(
            "Failures by cause: "
            + ", ".join(f"{kind or '(none)'} {count:.0f}" for kind, count in totals.failure_by_error_type.items())
        )


def stats() -> None:
    """The core's counters from /api/v1/stats."""
    result = api(lambda: client().stats(), "load the stats")
    if result is None:
        return
    flat = flatten(result.as_dict())
    numbers = {
        name: value for name, value in flat.items() if isinstance(value, int | float) and not isinstance(value, bool)
    }
    if numbers:
        st.dataframe(
            pd.DataFrame({"counter": list(numbers), "value": list(numbers.values())}),
            hide_index=True,
            width="stretch",
        )
    others = {name: value for name, value in flat.items() if name not in numbers}
    if others:
        st.caption(" · ".join(f"{name}: {value}" for name, value in others.items()))


def connections(is_admin: bool) -> None:
    """Live connections with their queue depths (admin only)."""
    if not is_admin:
        st.info("Live connections are shown to admins only.")
        return
    frame = api(lambda: client().connections_frame(), "load the connections")
    if frame is None:
        return
    if frame.empty:
        st.caption("No live connections.")
        return
    table = frame.sort_values("queue_depth", ascending=False).copy()
    table["connected_at"] = table["connected_at"].map(fmt_time)
    for column in ("sn", "username", "type"):  # a device has no username, an ops user no sn
        if column in table.columns:
            table[column] = table[column].astype(object).where(table[column].notna(), "—")
    st.dataframe(table, hide_index=True, width="stretch")


def render() -> None:
    """The connections & health page; it refreshes itself."""
    user = require_user()
    st.title("Connections & health")
    interval = refresh_seconds()

    @st.fragment(run_every=interval)
    def live() -> None:
        readiness()
        st.subheader("Pushes")
        pushes()
        st.subheader("Live connections")
        connections(user.is_admin)
        st.subheader("Counters")
        stats()
        st.caption(f"Updated {now_utc()} · refreshes every {interval:g} s")

    live()


render()
