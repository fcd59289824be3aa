"""`fleetpush up` as a newcomer runs it: one command brings up the core, the dashboard and a fleet;
Ctrl-C (SIGINT) stops all three and leaves nothing behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    """Whether anything accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def children(pid: int) -> list[psutil.Process]:
    """Every descendant of a process (its children and theirs)."""
    return psutil.Process(pid).children(recursive=True)


def gone(proc: psutil.Process) -> bool:
    """The process has exited and been reaped (or at least exited)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("ctrl_c", ["to-up", "to-group"])
def test_up_starts_core_dashboard_and_fleet_and_sigint_stops_them_all(tmp_path: Path, ctrl_c: str) -> None:
    """``to-up``: SIGINT to the `up` process alone (``kill -INT``); ``to-group``: to its whole process
    group at once, as a terminal's Ctrl-C does."""
    port, dash_port = free_port(), free_port()
    # Run as a newcomer would: no FLEETPUSH_* settings from the test environment, so the admin
    # password is generated and printed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPUSH_")}
    env["FLEETPUSH_AUTH__ARGON2_TIME_COST"] = "1"  # keeps the core's start fast; not what is checked
    env["FLEETPUSH_AUTH__ARGON2_MEMORY_KIB"] = "1024"
    stderr_path = tmp_path / "up.stderr"
    with stderr_path.open("wb") as stderr:
        up = subprocess.Popen(
            [sys.executable, "-m", "core", "up", "--port", str(port), "--dashboard-port", str(dash_port),
             "--devices", str(DEVICES)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1,
            start_new_session=True,  # its own process group, like a shell job
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []

    def log() -> str:
        return "stdout:\n" + "".join(seen) + "\nstderr:\n" + stderr_path.read_text(errors="replace")[-4000:]

    try:
        # 1. It prints where the dashboard is and the admin password.
        password = dashboard_url = None
        deadline = time.monotonic() + 60
        while password is None or dashboard_url is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"`fleetpush up` printed no dashboard URL and login within 60 s\n{log()}"
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"`fleetpush up` closed its stdout (exit {up.poll()})\n{log()}"
            seen.append(line)
            if m := re.search(r"dashboard\s*:\s*(http://\S+)", line):
                dashboard_url = m[1]
            if m := re.search(r"login\s*:\s*admin\s*/\s*(\S+)", line):
                password = m[1]
        assert dashboard_url == f"http://127.0.0.1:{dash_port}"
        assert "still starting" not in "".join(seen)

        # 2. The dashboard answers, and the core has the simulated robots online.
        with httpx.Client(trust_env=False, timeout=2) as http:
            assert http.get(f"{dashboard_url}/_stcore/health").status_code == 200
            core = f"http://127.0.0.1:{port}"
            login = http.post(f"{core}/api/v1/auth/login", json={"username": "admin", "password": password})
            assert login.status_code == 200, f"the printed admin password does not log in: {login.text}"
            headers = {"Authorization": f"Bearer {login.json()['token']}"}
            online: list[str] = []
            deadline = time.monotonic() + 30
            while len(online) < DEVICES:
                assert up.poll() is None, f"`fleetpush up` exited with {up.returncode}\n{log()}"
                assert time.monotonic() < deadline, f"only {online} of {DEVICES} robots online after 30 s\n{log()}"
                devices = http.get(f"{core}/api/v1/devices", params={"online": "true"}, headers=headers).json()
                online = [d["sn"] for d in devices["devices"] if d["status"].get("battery") is not None]
                time.sleep(0.2)  # polling another process's HTTP API
            assert len(online) == DEVICES

        # 3. Its three children are running: the core, the dashboard and the simulator.
        kids = children(up.pid)
        commands = [" ".join(p.cmdline()) for p in kids]
        assert any("core serve" in c for c in commands), commands
        assert any("streamlit run" in c for c in commands), commands
        assert any("core simulate" in c for c in commands), commands

        # 4. Ctrl-C: `up` exits 0 and takes every child with it; nothing listens any more.
        if ctrl_c == "to-group":
            os.killpg(up.pid, signal.SIGINT)  # the group `up` leads: only processes this test started
        else:
            up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`fleetpush up` did not exit within 20 s of SIGINT\n{log()}") from None
        assert code == 0, log()
        _, alive = psutil.wait_procs(kids, timeout=5)
        still = [p for p in alive if not gone(p)]
        assert not still, f"children left running after `fleetpush up` exited: {still}"
        assert not listening(port), f"something still listens on the core's port {port}"
        assert not listening(dash_port), f"something still listens on the dashboard's port {dash_port}"
        assert "Traceback" not in stderr_path.read_text(errors="replace"), log()
    finally:
        if up.poll() is None:
            for kid in children(up.pid):
                kid.kill()
            up.kill()
            up.wait()
        reader.join(timeout=5)
