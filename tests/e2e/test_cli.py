"""The `fleetpush` CLI as a user runs it: serve logs its URL, serves devices and admins, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fleetkit import FLEET_SECRET, Client

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_line_matching(stream: asyncio.StreamReader, pattern: str, timeout: float = 30) -> re.Match[str]:
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before printing {pattern!r}")
            m = re.search(pattern, line)
            if m:
                return m


async def test_serve_logs_url_serves_and_exits_0_on_sigterm_with_1001() -> None:
    port = free_port()
    env = dict(os.environ, FLEETPUSH_AUTH__DEVICE_SECRET=FLEET_SECRET, FLEETPUSH_AUTH__ADMIN_PASSWORD="",
               FLEETPUSH_SERVER__HOST="127.0.0.1", FLEETPUSH_AUTH__ARGON2_TIME_COST="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core", "serve", "--port", str(port), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        m = await read_line_matching(proc.stdout, r"listening on (http://\S+)")
        assert m.group(1) == f"http://127.0.0.1:{port}"
        pw = (await read_line_matching(proc.stdout, r"generated password: (\S+)")).group(1)
        dev = await Client.connect(f"ws://127.0.0.1:{port}/ws")
        assert (await dev.login_device("CLI-1", "retail"))["code"] == 0
        admin = await Client.connect(f"ws://127.0.0.1:{port}/ws")
        r = await admin.login_ops("admin", pw)
        assert r["code"] == 0 and r["values"]["role"] == "admin"
        devices = await admin.request("/admin/device/list", {})
        assert [d["sn"] for d in devices["values"]["devices"]] == ["CLI-1"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await dev.close_code() == 1001
        assert await admin.close_code() == 1001
        rc = await asyncio.wait_for(proc.wait(), 5)
        assert rc == 0 and time.monotonic() - started < 5
        err = (await proc.stderr.read()).decode()
        assert pw not in err  # the generated password is printed once on stdout, never logged
        assert "embedded in-memory" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_unknown_config_key_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  prot: 1\n")
    out = subprocess.run([sys.executable, "-m", "core", "serve", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "server.prot" in out.stderr and "Traceback" not in out.stderr
