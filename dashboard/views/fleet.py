"""The whole fleet at a glance: online counts by type and every robot's latest codes."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from core.client import STATUS_CODE_FIELDS
from dashboard.common import api, client, fmt_time, now_utc, refresh_seconds, require_user, severity_styler

#: The default device types of PROTOCOL §3; types the core reports are added as they appear.
DEVICE_TYPES = ("retail", "dance_robot", "dance_dog", "rubbish")
TABLE_COLUMNS = ["sn", "name", "type", "online", *STATUS_CODE_FIELDS, "battery", "last_seen", "status_ts"]
#: Short headers so the whole row fits on a laptop screen; the data keeps the API's field names.
COLUMN_LABELS = {
    **{field: field.removesuffix("_code") for field in STATUS_CODE_FIELDS},
    "battery": "battery %",
    "last_seen": "last seen",
}


def filter_fleet(frame: pd.DataFrame, types: list[str], online: str, search: str) -> pd.DataFrame:
    """Apply the page's filters: types (none = all), online state and a text search on sn or name."""
    out = frame
    if types:
        out = out[out["type"].isin(types)]
    if online == "Online":
        out = out[out["online"].astype(bool)]
    elif online == "Offline":
        out = out[~out["online"].astype(bool)]
    needle = search.strip().lower()
    if needle:
        names = out["name"].fillna("").astype(str).str.lower()
        out = out[
            out["sn"].astype(str).str.lower().str.contains(needle, regex=False)
            | names.str.contains(needle, regex=False)
        ]
    return out


def online_chart(frame: pd.DataFrame) -> None:
    """A bar chart of online and offline robots per type."""
    if frame.empty:
        return
    counts = (
        frame.assign(state=frame["online"].map({True: "online", False: "offline"}))
        .groupby(["type", "state"])
        .size()
        .reset_index(name="robots")
    )
    figure = px.bar(
        counts,
        x="type",
        y="robots",
        color="state",
        barmode="group",
        color_discrete_map={"online": "#2e7d32", "offline": "#9e9e9e"},
        category_orders={"state": ["online", "offline"]},
    )
    figure.update_layout(height=300, margin={"t": 10, "b": 10}, legend_title_text="")
    # Robot counts are whole numbers: no 0.5 ticks on a small fleet.
    top = int(counts["robots"].max())
    figure.update_yaxes(dtick=max(1, -(-top // 5)), rangemode="tozero")
    st.plotly_chart(figure, width="stretch")


def render() -> None:
    """The fleet page; the data part refreshes itself every few seconds."""
    require_user()
    st.title("Fleet")
    left, middle, right = st.columns([2, 1, 2])
    known_types = sorted({*DEVICE_TYPES, *st.session_state.get("fleet_known_types", [])})
    types = left.multiselect("Type", options=known_types, key="fleet_types")
    online = middle.selectbox("State", ["All", "Online", "Offline"], key="fleet_online")
    search = right.text_input("Search sn or name", key="fleet_search")
    interval = refresh_seconds()

    @st.fragment(run_every=interval)
    def live() -> None:
        frame = api(lambda: client().devices_frame(), "load the fleet")
        if frame is None:
            return
        found_types = sorted(str(t) for t in frame["type"].dropna().unique())
        if found_types != st.session_state.get("fleet_known_types"):
            st.session_state["fleet_known_types"] = found_types
        total, up = len(frame), int(frame["online"].astype(bool).sum())
        a, b, c = st.columns(3)
        a.metric("Robots", total)
        b.metric("Online", up)
        c.metric("Offline", total - up)
        online_chart(frame if not types else frame[frame["type"].isin(types)])
        shown = filter_fleet(frame, types, online, search)
        table = shown[TABLE_COLUMNS].copy()
        for column in ("last_seen", "status_ts"):
            table[column] = table[column].map(fmt_time)
        table = table.rename(columns={"status_ts": "status at"}).reset_index(drop=True)
        st.dataframe(
            severity_styler(table),
            hide_index=True,
            width="stretch",
            height=min(35 * (len(table) + 1) + 3, 720),
            column_config=COLUMN_LABELS,
        )
        st.caption(f"{len(shown)} of {total} robots shown · updated {now_utc()} · refreshes every {interval:g} s")

    live()


render()
