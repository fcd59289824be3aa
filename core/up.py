"""`fleetpush up`: the core on the embedded store, the dashboard and a simulated fleet, as one command."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

from .config import ConfigError, load_settings


def _wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes]) -> bool:
    # Polls a child's health endpoint: the child is another process, so there is nothing to await.
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _stop(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    # Reverse start order: the fleet first, then the dashboard, then the core (which closes with 1001).
    for _, p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 8
    for name, p in reversed(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"fleetpush up: {name} did not stop in time; killing pid {p.pid}", file=sys.stderr)
            p.kill()
            p.wait()


def run_up(args: argparse.Namespace) -> int:
    """Start the three processes, print where to look, stop them all on Ctrl-C."""
    try:
        s = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"fleetpush: {exc}", file=sys.stderr)
        return 2
    port = args.port or s.server.port
    dash_port = args.dashboard_port or s.dashboard.port
    devices = s.simulator.devices if args.devices is None else args.devices
    password = s.auth.admin_password or secrets.token_urlsafe(12)
    fleet_secret = s.auth.device_secret or secrets.token_hex(24)
    core_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update({
        "FLEETPUSH_STORE__MONGO_URL": s.store.mongo_url,
        "FLEETPUSH_AUTH__ADMIN_PASSWORD": password,
        "FLEETPUSH_AUTH__DEVICE_SECRET": fleet_secret,
        "FLEETPUSH_SERVER__HOST": "127.0.0.1",
        "FLEETPUSH_SERVER__PORT": str(port),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    })
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    py = sys.executable
    try:
        core = subprocess.Popen([py, "-m", "core", "serve", "--port", str(port), "--host", "127.0.0.1"], env=env)
        procs.append(("core", core))
        if not _wait_http(f"{core_url}/readyz", time.monotonic() + 30, core):
            print("fleetpush up: the core did not become ready; see its log above", file=sys.stderr)
            return 1
        from dashboard.launch import command

        dash_env = dict(env, FLEETPUSH_CORE_URL=core_url)
        dash = subprocess.Popen(command(core_url, dash_port, s.dashboard.host), env=dash_env,
                                stdout=subprocess.DEVNULL)
        procs.append(("dashboard", dash))
        if devices > 0:
            sim = subprocess.Popen(
                [py, "-m", "core", "simulate", "--url", f"ws://127.0.0.1:{port}/ws", "--devices", str(devices),
                 "--interval", str(s.simulator.interval_s)],
                env=env,
            )
            procs.append(("simulator", sim))
        dash_url = f"http://{s.dashboard.host}:{dash_port}"
        ready = _wait_http(f"{dash_url}/_stcore/health", time.monotonic() + 60, dash)
        print(
            "\n"
            "  fleetpush is up\n"
            f"    dashboard : {dash_url}{'' if ready else '  (still starting)'}\n"
            f"    core      : {core_url}  (WebSocket ws://127.0.0.1:{port}/ws, metrics {core_url}/metrics)\n"
            f"    login     : admin / {password}\n"
            f"    fleet     : {devices} simulated robots\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"fleetpush up: {name} exited with {p.returncode}; stopping", file=sys.stderr)
                    stopping = True
                    break
            if not stopping:
                time.sleep(0.3)
        failed = any(p.poll() not in (None, 0) for _, p in procs)
        return 1 if failed else 0
    finally:
        _stop(procs)
