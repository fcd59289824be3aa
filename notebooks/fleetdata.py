"""Shared loading and shaping helpers for the analyst notebooks.

Everything goes through the typed HTTP client (``core.client``), so the notebooks work against any
running core, the embedded in-memory store included. Only ``core.client``, pandas and plotly are used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import plotly.io as pio

try:
    from core.client import STATUS_CODE_FIELDS, FleetClient
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from core.client import STATUS_CODE_FIELDS, FleetClient

__all__ = [
    "COMMAND_STATES",
    "FAULT_FIELDS",
    "NoData",
    "Window",
    "command_frame",
    "connect",
    "drain_rates",
    "fault_episodes",
    "human",
    "load_commands",
    "load_devices",
    "load_history",
    "online_ratio",
    "percentiles",
    "require_rows",
    "robust_z",
    "setup_plotly",
    "time_bucket",
]

#: The final and open states of a command, in the order the notebooks show them.
COMMAND_STATES: tuple[str, ...] = ("acked", "failed", "expired", "canceled", "sent", "pending")
#: Status code fields whose non-zero values are faults (PROTOCOL §3), with a short label.
FAULT_FIELDS: dict[str, str] = {
    "location_code": "localization",
    "inspection_code": "inspection route",
    "rubbish_code": "rubbish bin",
    "electricity_code": "battery",
}
# The API caps one command listing at 500 rows (FleetClient.commands() sends no limit).
_COMMANDS_PAGE = 500
_HISTORY_LIMIT = 10_000


def setup_plotly(renderer: str = "plotly_mimetype+notebook_connected") -> None:
    """Pick a renderer that JupyterLab, VS Code and nbviewer show, and keep figures small."""
    pio.renderers.default = renderer
    pio.templates.default = "plotly_white"


def connect(url: str, username: str, password: str) -> FleetClient:
    """Log in to the core's HTTP API; the error says how to set the password when it is missing."""
    if not password:
        raise RuntimeError(
            "no password: set FLEETPUSH_PASSWORD (the admin password the core printed at start) "
            "or pass PASSWORD as a papermill parameter"
        )
    return FleetClient.connect(url, username, password, timeout=30.0)


class Window:
    """The analysed time window: ``[since, until]`` in UTC."""

    def __init__(self, since: str = "", until: str = "", hours: float = 24.0) -> None:
        self.until = _parse_time(until) if until else datetime.now(UTC)
        self.since = _parse_time(since) if since else self.until - timedelta(hours=float(hours))
        if self.since >= self.until:
            raise ValueError(f"empty window: since {self.since} is not before until {self.until}")

    def __repr__(self) -> str:
        """The window as two ISO times."""
        return f"Window({self.since.isoformat(timespec='seconds')} .. {self.until.isoformat(timespec='seconds')})"

    def contains(self, times: pd.Series) -> pd.Series:
        """A boolean mask: which of ``times`` fall inside the window."""
        return (times >= pd.Timestamp(self.since)) & (times <= pd.Timestamp(self.until))


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class NoData(LookupError):
    """The window holds nothing to analyse."""


def require_rows(frame: pd.DataFrame, what: str, window: Window) -> None:
    """Stop the notebook with a clear message when ``frame`` is empty, rather than fail in a figure."""
    if frame.empty:
        raise NoData(
            f"no {what} between {window.since:%Y-%m-%d %H:%M:%S} and {window.until:%Y-%m-%d %H:%M:%S} UTC: "
            "widen WINDOW_HOURS or set SINCE/UNTIL, and check that robots report to this core"
        )


def load_devices(client: FleetClient) -> pd.DataFrame:
    """Every device: identity, presence and latest status."""
    return client.devices_frame()


def load_history(client: FleetClient, devices: pd.DataFrame, window: Window) -> pd.DataFrame:
    """Status snapshots of every device within the window, oldest first, with ``type`` and ``mode``.

    One request per device (the API serves history per device), at most 10000 snapshots each; a
    device that hit the cap keeps its newest 10000 and is listed in ``frame.attrs["truncated"]``.
    """
    frames: list[pd.DataFrame] = []
    truncated: list[str] = []
    for sn, device_type in zip(devices["sn"], devices["type"], strict=True):
        frame = client.history_frame(sn, since=window.since, until=window.until, limit=_HISTORY_LIMIT)
        if frame.empty:
            continue
        if len(frame) >= _HISTORY_LIMIT:
            truncated.append(sn)
        frame["type"] = device_type
        frames.append(frame)
    if not frames:
        columns = ["ts", "sn", "type", "battery", "mode", *STATUS_CODE_FIELDS]
        history = pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
        history["ts"] = pd.to_datetime(history["ts"], utc=True)
    else:
        history = pd.concat(frames, ignore_index=True)
        history["mode"] = history["extra"].map(lambda e: e.get("mode") if isinstance(e, dict) else None)
        for name in STATUS_CODE_FIELDS:
            history[name] = pd.to_numeric(history[name], errors="coerce").fillna(0).astype(int)
        history["battery"] = pd.to_numeric(history["battery"], errors="coerce")
        history = history.sort_values(["sn", "ts"], kind="stable").reset_index(drop=True)
    history.attrs["truncated"] = truncated
    return history


def load_commands(client: FleetClient, devices: pd.DataFrame, window: Window) -> pd.DataFrame:
    """Every command created within the window, with its robot's ``type``, latencies and outcome.

    The API lists at most 500 commands per request, so this asks per state and, for a state that
    fills a page, per device and state.
    """
    frames: list[pd.DataFrame] = []
    for state in COMMAND_STATES:
        frame = client.commands_frame(state=state)
        if len(frame) >= _COMMANDS_PAGE:
            frame = pd.concat([client.commands_frame(sn=sn, state=state) for sn in devices["sn"]],
                              ignore_index=True)
        frames.append(frame)
    commands = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
    commands = commands.drop_duplicates("command_id")
    commands = commands[window.contains(commands["created_at"])]
    return command_frame(commands, devices)


def command_frame(commands: pd.DataFrame, devices: pd.DataFrame) -> pd.DataFrame:
    """Add ``type``, ``latency_s`` (issue to ack, acked and failed only), ``delivery_s`` and ``retried``."""
    out = commands.merge(devices[["sn", "type"]], on="sn", how="left")
    out["type"] = out["type"].fillna("unknown")
    answered = out["state"].isin(["acked", "failed"])
    out["latency_s"] = (out["acked_at"] - out["created_at"]).dt.total_seconds().where(answered)
    out["delivery_s"] = (out["sent_at"] - out["created_at"]).dt.total_seconds()
    out["attempts"] = pd.to_numeric(out["attempts"], errors="coerce").fillna(0).astype(int)
    out["retried"] = out["attempts"] > 1
    out["never_sent"] = out["sent_at"].isna()
    out["failure_msg"] = out["result"].map(_failure_msg)
    out["state"] = pd.Categorical(out["state"], categories=list(COMMAND_STATES))
    return out.sort_values("created_at", kind="stable").reset_index(drop=True)


def _failure_msg(result: object) -> str | None:
    if isinstance(result, dict) and result.get("ok") is False:
        msg = str(result.get("msg") or f"code {result.get('code')}")
        # "simulated actuator fault while running 'x'" and "battery too low (12%)" group by their stem
        return msg.split(" (")[0].split(" while ")[0]
    return None


def human(span: pd.Timedelta | float) -> str:
    """A duration for prose: ``2 s``, ``5 min``, ``1.5 h``."""
    seconds = span.total_seconds() if isinstance(span, pd.Timedelta) else float(span)
    if seconds < 120:
        return f"{round(seconds, 1):g} s"
    if seconds < 7200:
        return f"{round(seconds / 60, 1):g} min"
    return f"{round(seconds / 3600, 1):g} h"


def percentiles(values: pd.Series, qs: Iterable[float] = (0.5, 0.95, 0.99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of a numeric series (NaN when empty)."""
    clean = pd.to_numeric(values, errors="coerce").dropna()
    return {f"p{round(q * 100)}": (float(clean.quantile(q)) if len(clean) else float("nan")) for q in qs}


def time_bucket(history: pd.DataFrame, target_buckets: int = 40) -> pd.Timedelta:
    """A round bucket width that cuts the history's time span into about ``target_buckets`` pieces."""
    if history.empty:
        return pd.Timedelta(minutes=1)
    span = history["ts"].max() - history["ts"].min()
    raw = max(span / max(target_buckets, 1), pd.Timedelta(seconds=1))
    for step in ("1s", "2s", "5s", "10s", "15s", "30s", "1min", "2min", "5min", "10min", "15min", "30min",
                 "1h", "2h", "3h", "6h", "12h", "1D"):
        if pd.Timedelta(step) >= raw:
            return pd.Timedelta(step)
    return pd.Timedelta("1D")


def online_ratio(history: pd.DataFrame, devices: pd.DataFrame, bucket: pd.Timedelta) -> pd.DataFrame:
    """Per time bucket and type: the share of that type's robots that reported at least once.

    The store keeps no presence log, only status reports; a robot that reports every few seconds
    and sent nothing in a whole bucket was offline for it.
    """
    fleet = devices.groupby("type")["sn"].nunique().rename("robots")
    seen = history.assign(bucket=history["ts"].dt.floor(bucket)).groupby(["bucket", "type"])["sn"].nunique()
    grid = pd.MultiIndex.from_product(
        [sorted(seen.index.get_level_values("bucket").unique()), sorted(fleet.index)], names=["bucket", "type"]
    )
    frame = seen.reindex(grid, fill_value=0).rename("online").reset_index()
    # Buckets cut by the start or end of the data are partial and would show a dip that is not there.
    inside = (frame["bucket"] >= history["ts"].min()) & (frame["bucket"] + bucket <= history["ts"].max())
    if inside.any():
        frame = frame[inside]
    frame = frame.merge(fleet.reset_index(), on="type")
    frame["ratio"] = frame["online"] / frame["robots"]
    return frame


def fault_episodes(history: pd.DataFrame) -> pd.DataFrame:
    """Contiguous runs of a non-zero status code per robot and field, with start, end and duration.

    An episode ends at the first report that no longer carries the code; one still open at the end
    of the data ends at the robot's last report (``open`` is True).
    """
    rows: list[dict[str, object]] = []
    for sn, frame in history.groupby("sn", sort=True):
        ts = frame["ts"].to_numpy()
        device_type = frame["type"].iloc[0]
        battery = frame["battery"].to_numpy()
        for field, label in FAULT_FIELDS.items():
            codes = frame[field].to_numpy()
            msgs = frame[field.replace("_code", "_msg")].to_numpy()
            start: int | None = None
            for i in range(len(codes) + 1):
                code = codes[i] if i < len(codes) else 0
                if start is not None and (code != codes[start] or i == len(codes)):
                    end = i if i < len(codes) else len(codes) - 1
                    rows.append({
                        "sn": sn, "type": device_type, "field": field, "fault": f"{label} {codes[start]}",
                        "code": int(codes[start]), "msg": _msg_stem(msgs[start]), "start": ts[start],
                        "end": ts[end], "battery_at_start": battery[start], "open": i == len(codes),
                    })
                    start = None
                if start is None and i < len(codes) and code != 0:
                    start = i
    columns = ["sn", "type", "field", "fault", "code", "msg", "start", "end", "battery_at_start", "open"]
    episodes = pd.DataFrame(rows, columns=columns)
    if episodes.empty:
        episodes["duration_s"] = pd.Series(dtype=float)
        return episodes
    episodes["start"] = pd.to_datetime(episodes["start"], utc=True)
    episodes["end"] = pd.to_datetime(episodes["end"], utc=True)
    episodes["duration_s"] = (episodes["end"] - episodes["start"]).dt.total_seconds()
    return episodes


def _msg_stem(msg: object) -> str:
    text = str(msg or "")
    for cut in (" at ", ": ", " ("):
        text = text.split(cut)[0]
    return text


def drain_rates(history: pd.DataFrame) -> pd.DataFrame:
    """Battery change between consecutive reports of each robot, in percent per minute.

    ``phase`` is ``charge`` when the robot reports mode ``charging`` and the level rose, ``drain``
    when it is not charging and the level fell, else ``flat`` (idle, full, or a gap).
    """
    frame = history[["sn", "type", "ts", "battery", "mode"]].dropna(subset=["battery"]).copy()
    frame = frame.sort_values(["sn", "ts"], kind="stable")
    grouped = frame.groupby("sn")
    frame["dt_min"] = grouped["ts"].diff().dt.total_seconds() / 60.0
    frame["d_battery"] = grouped["battery"].diff()
    frame = frame[(frame["dt_min"] > 0) & frame["d_battery"].notna()].copy()
    frame["rate_pct_min"] = frame["d_battery"] / frame["dt_min"]
    charging = frame["mode"].eq("charging")
    frame["phase"] = "flat"
    frame.loc[charging & (frame["d_battery"] > 0), "phase"] = "charge"
    frame.loc[~charging & (frame["d_battery"] < 0), "phase"] = "drain"
    return frame


def robust_z(values: pd.Series, groups: pd.Series) -> pd.Series:
    """The modified z-score of each value within its group: 0.6745 * (x - median) / MAD.

    Median and MAD are not moved by the outliers they are meant to find; |z| > 3.5 is the usual cut.
    A group whose MAD is zero uses the mean absolute deviation instead.
    """
    frame = pd.DataFrame({"x": values, "g": groups})
    median = frame.groupby("g")["x"].transform("median")
    dev = (frame["x"] - median).abs()
    mad = dev.groupby(frame["g"]).transform("median")
    mean_ad = dev.groupby(frame["g"]).transform("mean")
    scale = mad.where(mad > 0, mean_ad * 1.2533 / 0.6745)  # keep the 0.6745 factor consistent
    return (0.6745 * (frame["x"] - median) / scale.where(scale > 0)).fillna(0.0)
