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
from collections.abc import Callable
from types import FrameType

from .config import ConfigError, load_settings

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via an http_proxy


def _wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes], cancelled: Callable[[], bool]) -> bool:
    # Polls a child's health endpoint: the child is another process, so there is nothing to await.
    while time.monotonic() < deadline and not cancelled():
        if proc.poll() is not None:
            return False
        try:
            with _DIRECT.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _stop(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> list[str]:
    """Stop the children; the names of those that did not exit cleanly (non-zero, or killed)."""
    # Reverse start order: the fleet first, then the dashboard, then the core (which closes with 1001).
    for _, p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 8
    unclean: list[str] = []
    for name, p in reversed(procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"fleetpush up: {name} did not stop in time; killing pid {p.pid}", file=sys.stderr)
            p.kill()
            p.wait()
        if p.returncode != 0:
            unclean.append(f"{name} (exit {p.returncode})")
    return unclean


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

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    py = sys.executable
    # Each child gets its own process group: a terminal's Ctrl-C then reaches only this process, and
    # _stop sends each child exactly one SIGINT. A second SIGINT, arriving while a child is already
    # shutting down, can land after it has restored the default handler and kill it mid-cleanup.
    try:
        core = subprocess.Popen([py, "-m", "core", "serve", "--port", str(port), "--host", "127.0.0.1"], env=env,
                                process_group=0)
        procs.append(("core", core))
        if not _wait_http(f"{core_url}/readyz", time.monotonic() + 30, core, lambda: stopping):
            if stopping:
                return 0
            print("fleetpush up: the core did not become ready; see its log above", file=sys.stderr)
            return 1
        from dashboard.launch import command, environment

        dash_env = environment(core_url, base=env)
        dash_env["FLEETPUSH_DASHBOARD_REFRESH_S"] = str(s.dashboard.refresh_s)
        dash = subprocess.Popen(command(core_url, dash_port, s.dashboard.host), env=dash_env,
                                stdout=subprocess.DEVNULL, process_group=0)
        procs.append(("dashboard", dash))
        if devices > 0:
            sim = subprocess.Popen(
                [py, "-m", "core", "simulate", "--url", f"ws://127.0.0.1:{port}/ws", "--devices", str(devices),
                 "--interval", str(s.simulator.interval_s)],
                env=env, process_group=0,
            )
            procs.append(("simulator", sim))
        dash_url = f"http://{s.dashboard.host}:{dash_port}"
        ready = _wait_http(f"{dash_url}/_stcore/health", time.monotonic() + 60, dash, lambda: stopping)
        if stopping:
            return 0
        if dash.poll() is not None:
            print(f"fleetpush up: the dashboard exited with {dash.returncode} (is port {dash_port} in use?); "
                  "see its log above", file=sys.stderr)
            return 1
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
    finally:
        unclean = _stop(procs)
    if unclean:
        print(f"fleetpush up: not a clean stop: {', '.join(unclean)}", file=sys.stderr)
        return 1
    return 0
