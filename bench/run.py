"""`fleetpush bench`: drive the fleetpush core and each peer server with the same C load generator.

For every server, connection count and repeat, the driver starts a fresh server pinned to CPU 0,
runs `bench/build/loadgen` pinned to CPU 1 through the phases idle -> broadcast -> reqresp ->
command -> ingest on the same logged-in device connections, stops the server by its PID, and
finally prints medians with ratios of fleetpush to each peer. With `crossnode` (default, when
redis-server is installed) it also measures the broadcast across two fleetpush nodes sharing a
throw-away Redis, next to the same-node broadcast of the same run. Results go to
`bench/results/latest.json` and `bench/results/latest.md`. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
PYLIB = BUILD / "pylib"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BUILD / "loadgen"
CEILING_SRC = BENCH / "ceiling.c"
CEILING = BUILD / "ceiling"
ALL_PHASES = "idle,broadcast,reqresp,command,ingest"
AIOHTTP_PIN = "aiohttp==3.14.5"
SERVERS = ("fleetpush", "node", "aiohttp", "websockets")
PEERS = SERVERS[1:]
CROSSNODE = "crossnode"  # fleetpush broadcast across two nodes over Redis; its own section of the output
CROSSNODE_TITLE = "cross-node broadcast (2 nodes over Redis)"
HOST = "127.0.0.1"
ADMIN_PASSWORD = "bench-admin-" + secrets.token_hex(6)
DEVICE_SECRET = "bench-fleet-" + secrets.token_hex(8)

# (scenario, metric key, label, unit, higher is better)
METRICS: list[tuple[str, str, str, str, bool]] = [
    ("broadcast", "deliveries_per_s", "broadcast deliveries/s", "1/s", True),
    ("broadcast", "latency_p50_ms", "broadcast send→last receipt p50", "ms", False),
    ("broadcast", "latency_p99_ms", "broadcast send→last receipt p99", "ms", False),
    ("reqresp", "replies_per_s", "request/response replies/s", "1/s", True),
    ("reqresp", "half_p50_ms", "request/response p50 at half rate", "ms", False),
    ("reqresp", "half_p99_ms", "request/response p99 at half rate", "ms", False),
    ("ingest", "latency_p50_ms", "ingest report→push p50", "ms", False),
    ("ingest", "latency_p99_ms", "ingest report→push p99", "ms", False),
    ("ingest", "stored_per_s", "ingest reports stored/s", "1/s", True),
    ("ingest", "dropped", "ingest reports not pushed within the drain", "", False),
    ("command", "latency_p50_ms", "command HTTP→device→ack p50", "ms", False),
    ("command", "latency_p99_ms", "command HTTP→device→ack p99", "ms", False),
    ("command", "ack_errors", "command acks answered with an error", "", False),
    ("idle", "rss_per_conn_kib", "RSS per idle connection", "KiB", False),
    ("idle", "conns_per_s", "connections opened/s (login incl.)", "1/s", True),
    ("idle", "devices_ready", "devices logged in", "", True),
]
SCENARIOS = ("broadcast", "reqresp", "ingest", "command", "idle")


@dataclass
class Profile:
    """Sizes and phase durations of one benchmark run."""

    sizes: list[int]
    repeats: int
    idle_s: float
    bcast_lat_s: float
    bcast_count: int
    bcast_sat_s: float
    req_s: float
    ingest_s: float
    cmd_s: float
    cmd_rate: int
    drain_s: float
    connect_cap_s: float
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Profile([1000, 5000, 10000], 3, 2.0, 6.0, 20, 5.0, 5.0, 5.0, 4.0, 100, 3.0, 60.0)
QUICK = Profile([300], 1, 0.5, 1.5, 5, 1.5, 1.5, 2.0, 1.5, 50, 2.0, 40.0)
CONCURRENCY = 64  # handshakes + logins in flight while connecting


def log(msg: str) -> None:
    """Progress goes to stderr; the table goes to stdout."""
    print(f"[bench {datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> None:
    """Child pre-exec: raise RLIMIT_NOFILE's soft limit to the hard limit (10k sockets + slack)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port(pair: bool = False) -> int:
    """A free loopback TCP port (and port+1 when `pair`)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        if not pair:
            return port
        with socket.socket() as s2:
            try:
                s2.bind((HOST, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port found")


# ---------------------------------------------------------------- preparation


def build_c(src: Path, binary: Path) -> Path:
    """Compile one C program into bench/build/ when the source is newer than the binary."""
    BUILD.mkdir(exist_ok=True)
    if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
        return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise RuntimeError("gcc not found: the load generator is C (apt-get install gcc)")
    cmd = [gcc, "-O2", "-Wall", "-o", str(binary), str(src)]
    log("building " + " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=120)
    return binary


def ensure_node_ws() -> str | None:
    """Install the pinned `ws` into bench/node_modules; returns why the Node peer can't run, or None."""
    if not shutil.which("node"):
        return "node not found"
    if (BENCH / "node_modules" / "ws" / "package.json").exists():
        return None
    npm = shutil.which("npm")
    if not npm:
        return "npm not found"
    log("npm ci (ws, pinned in bench/package-lock.json)")
    r = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        return f"npm ci failed: {r.stderr.strip()[-300:]}"
    return None


def ensure_aiohttp() -> tuple[str | None, dict[str, str]]:
    """aiohttp for the aiohttp peer: the venv's, else pip-installed into bench/build/pylib."""
    probe = [sys.executable, "-c", "import aiohttp; print(aiohttp.__version__)"]
    if subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
        return None, {}
    env = {"PYTHONPATH": str(PYLIB)}
    if subprocess.run(probe, capture_output=True, timeout=60, env={**os.environ, **env}).returncode == 0:
        return None, env
    log(f"pip install {AIOHTTP_PIN} into {PYLIB}")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
            str(PYLIB),
            AIOHTTP_PIN,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        return f"pip install {AIOHTTP_PIN} failed: {r.stderr.strip()[-300:]}", {}
    return None, env


def fleetpush_cmd() -> list[str] | None:
    """How to start the core: the venv's `fleetpush` script, else `python -m core`."""
    script = Path(sys.executable).parent / "fleetpush"
    if not (ROOT / "core" / "__main__.py").exists():
        return None
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "core", "serve"]


def core_snapshot(ref: str, dest: Path) -> tuple[Path, str]:
    """Export `core/` and `config.yaml` at git `ref` into `dest`, so edits in the work tree during a
    long run cannot change what is measured; returns the folder and the commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    if commit.returncode != 0:
        raise RuntimeError(f"--core-ref {ref}: {commit.stderr.strip()}")
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit.stdout.strip(), "core", "config.yaml"], cwd=ROOT, capture_output=True, timeout=60
    )
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {ref}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    return dest, commit.stdout.strip()


def versions() -> dict[str, str]:
    """Versions of what is measured."""
    out: dict[str, str] = {"python": platform.python_version()}
    with contextlib.suppress(Exception):
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    with contextlib.suppress(Exception):
        pkg = json.loads((BENCH / "node_modules" / "ws" / "package.json").read_text())
        out["ws"] = pkg["version"]
    for mod in ("fleetpush", "tornado", "websockets", "aiohttp"):
        code = f"import importlib.metadata as m; print(m.version({mod!r}))"
        with contextlib.suppress(Exception):
            r = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "PYTHONPATH": str(PYLIB)},
            )
            if r.returncode == 0:
                out[mod] = r.stdout.strip()
    return out


def loadavg() -> float | None:
    """1-minute load average: other work on this shared machine shows up here."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return None


def machine() -> dict[str, Any]:
    """nproc, CPU model and memory of this machine."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "loadavg_1m_at_start": loadavg(),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# ---------------------------------------------------------------- processes


class Proc:
    """A child process started in its own session, stopped by its PID."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logfile: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.logfile = logfile
        self._log = logfile.open("wb")
        self.popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; always by this process's PID."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""


_live: dict[int, Proc] = {}


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    """Keep `proc` in the live table while in use; stop it on the way out, also on error."""
    _live[proc.pid] = proc
    try:
        yield proc
    finally:
        proc.stop()
        _live.pop(proc.pid, None)


def stop_all() -> None:
    """Stop every child still running (Ctrl-C, errors)."""
    for proc in list(_live.values()):
        with contextlib.suppress(Exception):
            proc.stop(grace_s=3)
        _live.pop(proc.pid, None)


def pin(cpu: int, cmd: list[str], enabled: bool) -> list[str]:
    """Prefix `taskset -c CPU` when pinning is possible."""
    if enabled and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def wait_port(port: int, proc: Proc, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until the server accepts TCP on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout_s:.0f}s:\n{proc.tail()}")


def http_json(method: str, url: str, body: Any = None, token: str = "", timeout: float = 15.0) -> Any:
    """One JSON HTTP call on loopback."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


# ---------------------------------------------------------------- one run


@dataclass
class Target:
    """How to start one server and talk to it."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    http_port_offset: int = 0
    admin_login: bool = False
    phases: str = ALL_PHASES
    bcast_window: int = 4
    cwd: Path = ROOT


def targets(selected: list[str], core_dir: Path | None = None) -> tuple[list[Target], dict[str, str]]:
    """The servers that can run here, and why the others can't."""
    out: list[Target] = []
    skipped: dict[str, str] = {}
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPUSH_")}
    base["BENCH_DEVICE_SECRET"] = DEVICE_SECRET
    for name in selected:
        if name == "fleetpush":
            cmd = [sys.executable, "-m", "core", "serve"] if core_dir else fleetpush_cmd()
            if cmd is None:
                skipped[name] = "core/__main__.py not there yet (the core has not landed)"
                continue
            env = {
                **base,
                "FLEETPUSH_SERVER__HOST": HOST,
                "FLEETPUSH_AUTH__DEVICE_SECRET": DEVICE_SECRET,
                "FLEETPUSH_AUTH__ADMIN_PASSWORD": ADMIN_PASSWORD,
                "FLEETPUSH_SERVER__ACCESS_LOG": "false",
                # The limiter still runs on every request; a benchmark must not be throttled by it.
                "FLEETPUSH_LIMITS__RATE_PER_S": "1000000",
                "FLEETPUSH_LIMITS__RATE_BURST": "1000000",
            }
            if core_dir:
                env["PYTHONPATH"] = str(core_dir)
            out.append(Target(name, cmd, env, admin_login=True, cwd=core_dir or ROOT))
        elif name == "node":
            why = ensure_node_ws()
            if why:
                skipped[name] = why
                continue
            out.append(Target(name, ["node", str(BENCH / "peers" / "node_ws.js")], base))
        elif name == "aiohttp":
            why, extra = ensure_aiohttp()
            if why:
                skipped[name] = why
                continue
            out.append(Target(name, [sys.executable, str(BENCH / "peers" / "aiohttp_peer.py")], {**base, **extra}))
        elif name == "websockets":
            cmd = [sys.executable, str(BENCH / "peers" / "websockets_peer.py")]
            out.append(Target(name, cmd, base, http_port_offset=1))
        elif name == CROSSNODE:
            continue  # started by run_crossnode from the fleetpush target's settings
        else:
            raise SystemExit(f"unknown server {name!r}; choose from {', '.join((*SERVERS, CROSSNODE))}")
    return out, skipped


def write_logins(path: Path, n: int, prefix: str) -> None:
    """One device login frame per line: `sn<TAB>frame`, tokens per PROTOCOL §3 with the fleet secret."""
    ts = int(time.time())
    key = DEVICE_SECRET.encode()
    with path.open("w") as f:
        for i in range(n):
            sn = f"{prefix}-{i:05d}"
            token = hmac.new(key, f"{sn}:{ts}".encode(), hashlib.sha256).hexdigest()
            frame = {
                "op": "galbot_request",
                "service": "/api/user/login",
                "request_id": "login",
                "values": {
                    "sn": sn,
                    "timestamp": ts,
                    "token": token,
                    "type": "dance_dog",
                    "firmware": "bench",
                },
            }
            f.write(f"{sn}\t{json.dumps(frame, separators=(',', ':'))}\n")


def admin_token(port: int, proc: Proc, timeout_s: float = 20.0) -> str:
    """Bearer token of the admin user; the core may still be creating it right after it listens."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline and proc.alive():
        try:
            resp = http_json(
                "POST",
                f"http://{HOST}:{port}/api/v1/auth/login",
                {"username": "admin", "password": ADMIN_PASSWORD},
            )
            return str(resp["token"])
        except (OSError, ValueError, KeyError, TypeError) as e:  # HTTPError is an OSError
            last = str(e)
            time.sleep(0.3)
    raise RuntimeError(f"admin login on the core failed: {last}\n{proc.tail()}")


def run_once(t: Target, n: int, prof: Profile, workdir: Path, run_id: str, pin_cpus: bool) -> dict[str, Any]:
    """Start a fresh server, run every phase at `n` connections, stop the server."""
    port = free_port(pair=t.http_port_offset > 0)
    env = dict(t.env)
    cmd = [*t.cmd, "--port", str(port)] if t.name == "fleetpush" else [*t.cmd, str(port)]
    if t.name == "fleetpush":
        env["FLEETPUSH_SERVER__PORT"] = str(port)
    proc = Proc(t.name, pin(0, cmd, pin_cpus), env, workdir / f"{run_id}.server.log", cwd=t.cwd)
    with running(proc):
        wait_port(port, proc)
        token = ""
        if t.admin_login:
            token = admin_token(port, proc)
        raw = drive(t, n, prof, workdir, run_id, pin_cpus, proc, port, port + t.http_port_offset, token)
    return raw


def drive(
    t: Target,
    n: int,
    prof: Profile,
    workdir: Path,
    run_id: str,
    pin_cpus: bool,
    proc: Proc,
    port: int,
    http_port: int,
    token: str,
    control_port: int = 0,
) -> dict[str, Any]:
    """Run the load generator's phases `t.phases` against a running server (devices on `port`, the
    control connection on `control_port` when set, else on `port`); returns its JSON result."""
    logins = workdir / f"{run_id}.logins"
    write_logins(logins, n, run_id)
    control = {
        "op": "galbot_request",
        "service": "/admin/auth/login",
        "request_id": "control-login",
        "values": {"username": "admin", "password": ADMIN_PASSWORD},
    }
    budget = (
        prof.idle_s
        + prof.bcast_lat_s
        + prof.bcast_sat_s
        + 2 * prof.req_s
        + prof.ingest_s
        + prof.cmd_s
        + 6 * prof.drain_s
        + prof.connect_cap_s
        + 15
    )
    lg = [
        str(LOADGEN),
        "--port",
        str(port),
        "--conns",
        str(n),
        "--logins",
        str(logins),
        "--control-login",
        json.dumps(control, separators=(",", ":")),
        "--server-pid",
        str(proc.pid),
        "--http-port",
        str(http_port),
        "--http-auth",
        token,
        "--idle-s",
        str(prof.idle_s),
        "--bcast-lat-s",
        str(prof.bcast_lat_s),
        "--bcast-count",
        str(prof.bcast_count),
        "--bcast-sat-s",
        str(prof.bcast_sat_s),
        "--req-s",
        str(prof.req_s),
        "--ingest-s",
        str(prof.ingest_s),
        "--cmd-s",
        str(prof.cmd_s),
        "--cmd-rate",
        str(prof.cmd_rate),
        "--drain-s",
        str(prof.drain_s),
        "--max-s",
        f"{budget:.0f}",
        "--connect-s",
        str(prof.connect_cap_s),
        "--concurrency",
        str(CONCURRENCY),
        "--phases",
        t.phases,
        "--bcast-window",
        str(t.bcast_window),
    ]
    if control_port:
        lg += ["--control-port", str(control_port)]
    errlog = workdir / f"{run_id}.loadgen.log"
    with errlog.open("wb") as err:
        lgp = subprocess.Popen(
            pin(1, lg, pin_cpus),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile,
        )
        try:
            out, _ = lgp.communicate(timeout=budget + 30)
        except subprocess.TimeoutExpired:
            lgp.kill()
            out, _ = lgp.communicate(timeout=10)
        except BaseException:
            lgp.kill()
            lgp.wait(timeout=10)
            raise
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        tail = errlog.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"loadgen gave no result (rc {lgp.returncode}):\n{tail}\nserver:\n{proc.tail()}")
    raw = json.loads(lines[-1])
    raw["server_alive_at_end"] = proc.alive()
    raw["loadavg_1m_at_end"] = loadavg()
    return raw


# ---------------------------------------------------------------- cross-node broadcast


def redis_ping(port: int, timeout_s: float = 1.0) -> bool:
    """True when a Redis on 127.0.0.1:port answers PING."""
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=timeout_s) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


def wait_broker(port: int, proc: Proc, timeout_s: float = 20.0) -> None:
    """Wait (bounded) until the node's /readyz says its store answers and its broker is connected."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            last = http_json("GET", f"http://{HOST}:{port}/readyz", timeout=3.0)
            if isinstance(last, dict) and last.get("broker") == "ok":
                return
        except (OSError, ValueError) as e:  # 503 while the store starts is an HTTPError (OSError)
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name}: broker not connected within {timeout_s:.0f}s ({last}):\n{proc.tail()}")


def node_broker(port: int) -> str:
    """The node's broker state from /readyz (`ok`, `degraded`), or why it could not be read."""
    try:
        body = http_json("GET", f"http://{HOST}:{port}/readyz", timeout=3.0)
    except urllib.error.HTTPError as e:  # 503 while not ready still carries the JSON body
        with contextlib.suppress(OSError, ValueError):
            body = json.loads(e.read() or b"null")
            return f"{body.get('broker')} (HTTP {e.code})" if isinstance(body, dict) else f"HTTP {e.code}"
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    return str(body.get("broker")) if isinstance(body, dict) else repr(body)


def run_crossnode(base: Target, n: int, prof: Profile, workdir: Path, run_id: str, pin_cpus: bool) -> dict[str, Any]:
    """Cross-node broadcast: a throw-away redis-server and two fleetpush nodes sharing it as broker.

    The `n` devices log in on node A; the control (ops) connection logs in on node B and sends the
    broadcasts there, so every frame a device receives crossed Redis (B publishes, A's listener
    fans it out). Each node keeps its own embedded store: a broadcast needs no shared data.
    Redis and both nodes share CPU 0 (the server side gets one core, as for one node); the load
    generator is on CPU 1. Every process is stopped by its PID on the way out, also on error."""
    redis = shutil.which("redis-server")
    if redis is None:
        raise RuntimeError("redis-server not found")
    rport = free_port()
    rproc = Proc(
        "redis",
        pin(0, [redis, "--port", str(rport), "--bind", HOST, "--save", "", "--appendonly", "no"], pin_cpus),
        {k: v for k, v in os.environ.items() if not k.startswith("FLEETPUSH_")},
        workdir / f"{run_id}.redis.log",
    )
    with running(rproc):
        wait_port(rport, rproc)
        deadline = time.monotonic() + 10
        while not redis_ping(rport) and time.monotonic() < deadline:
            time.sleep(0.1)
        nodes: list[tuple[Proc, int]] = []
        with contextlib.ExitStack() as stack:
            for label in ("a", "b"):
                port = free_port()
                env = {
                    **base.env,
                    "FLEETPUSH_SERVER__PORT": str(port),
                    "FLEETPUSH_SERVER__NODE_ID": f"bench-{label}-{run_id}",
                    "FLEETPUSH_BROKER__REDIS_URL": f"redis://{HOST}:{rport}/0",
                    "FLEETPUSH_BROKER__CHANNEL_PREFIX": f"bench-{run_id}",
                }
                cmd = pin(0, [*base.cmd, "--port", str(port)], pin_cpus)
                proc = Proc(f"fleetpush-{label}", cmd, env, workdir / f"{run_id}.node-{label}.log", cwd=base.cwd)
                stack.enter_context(running(proc))
                nodes.append((proc, port))
            for proc, port in nodes:
                wait_port(port, proc)
                wait_broker(port, proc)
            (a, a_port), (b, b_port) = nodes
            t = dataclasses.replace(base, phases="broadcast")
            raw = drive(t, n, prof, workdir, run_id, pin_cpus, a, a_port, b_port, "", control_port=b_port)
            raw["node_b_alive_at_end"] = b.alive()
            # What each node thought of its broker when the load ended: a zero here is then
            # explained in the result (degraded broker, a node that died) instead of only counted.
            raw["brokers_at_end"] = {label: node_broker(port) for label, (_, port) in zip("ab", nodes, strict=True)}
            if not (raw.get("broadcast") or {}).get("deliveries_per_s"):
                raw["diagnostics"] = {
                    "loadgen": (workdir / f"{run_id}.loadgen.log").read_text(errors="replace")[-2000:],
                    **{f"node_{label}": proc.tail(25) for label, (proc, _) in zip("ab", nodes, strict=True)},
                    "redis": rproc.tail(10),
                }
    return raw


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Pick the table's metrics out of one load generator result."""

    def g(d: dict[str, Any] | None, *path: str) -> float | None:
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return float(d) if isinstance(d, int | float) and d >= 0 else None  # type: ignore[arg-type]

    b, r, i, c = (raw.get(k) for k in ("broadcast", "reqresp", "ingest", "command"))
    rss = g(raw, "rss_per_conn_kb")
    return {
        "broadcast": {
            "deliveries_per_s": g(b, "deliveries_per_s"),
            "latency_p50_ms": g(b, "latency", "p50_ms"),
            "latency_p99_ms": g(b, "latency", "p99_ms"),
        },
        "reqresp": {
            "replies_per_s": g(r, "replies_per_s"),
            "half_p50_ms": g(r, "half_latency", "p50_ms"),
            "half_p99_ms": g(r, "half_latency", "p99_ms"),
        },
        "ingest": {
            "latency_p50_ms": g(i, "latency", "p50_ms"),
            "latency_p99_ms": g(i, "latency", "p99_ms"),
            "stored_per_s": g(i, "stored_per_s"),
            "dropped": g(i, "dropped"),
        },
        "command": {
            "latency_p50_ms": g(c, "latency", "p50_ms"),
            "latency_p99_ms": g(c, "latency", "p99_ms"),
            "ack_errors": g(c, "ack_errors"),
        },
        "idle": {
            "rss_per_conn_kib": rss,
            "conns_per_s": g(raw, "conns_per_s"),
            "devices_ready": g(raw, "devices_ready"),
        },
    }


def summarize_crossnode(raw: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The cross-node run's broadcast metrics, plus how many devices were there to receive them."""
    b = summarize(raw)["broadcast"]
    ready = raw.get("devices_ready")
    b["devices_ready"] = float(ready) if isinstance(ready, int | float) else None
    return {"broadcast": b}


def median(vals: list[float | None]) -> float | None:
    got = [v for v in vals if v is not None]
    return statistics.median(got) if got else None


# ---------------------------------------------------------------- output


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def tables(result: dict[str, Any]) -> str:
    """Markdown: one table per connection count, a row per metric, a column per server and ratio."""
    servers = [s for s in SERVERS if s in result["servers"]]
    peers = [s for s in servers if s != "fleetpush"]
    med = result["medians"]
    out: list[str] = []
    for n in result["sizes"]:
        key = str(n)
        out.append(f"### {n:,} connections (median of {result['repeats']})\n")
        head = ["metric", *servers]
        if "fleetpush" in servers:
            head += [f"fleetpush ÷ {p}" for p in peers]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for scen, metric, label, unit, _hib in METRICS:
            vals = {s: med.get(s, {}).get(key, {}).get(scen, {}).get(metric) for s in servers}
            row = [label + (f" ({unit})" if unit else ""), *(fmt(vals[s]) for s in servers)]
            if "fleetpush" in servers:
                row += [ratio(vals["fleetpush"], vals[p]) for p in peers]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    if result.get("crossnode"):
        out += crossnode_table(result)
    if result.get("ceiling"):
        out.append("Load generator ceiling (against `bench/ceiling.c`, a trivial C server on CPU 0):\n")
        out.append("| connections | frames received/s | loadgen CPU-s per s | frames per loadgen CPU-s | replies/s |")
        out.append("|---|---|---|---|---|")
        for n, c in result["ceiling"].items():
            busy = (c["loadgen_cpu_s"] or 0) / (c["elapsed_s"] or 1)
            out.append(
                f"| {int(n):,} | {fmt(c['received_frames_per_s'])} | {busy:.2f} | "
                f"{fmt(c['frames_per_loadgen_cpu_s'])} | {fmt(c['replies_per_s'])} |"
            )
        out.append("")
    if result.get("skipped"):
        out.append("Not measured: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) + "\n")
    if result.get("errors"):
        out.append("Runs that failed: " + "; ".join(result["errors"][:10]) + "\n")
    return "\n".join(out)


def crossnode_table(result: dict[str, Any]) -> list[str]:
    """The cross-node broadcast next to the same-node fleetpush broadcast of the same run."""
    same = result["medians"].get("fleetpush", {})
    out = [
        f"### {CROSSNODE_TITLE} (median of {result['repeats']})\n",
        "Devices on node A, broadcasts sent to node B's ops connection, frames cross Redis pub/sub; "
        "same node = the fleetpush column above (same run, same connection count).\n",
        "| connections | metric | same node | cross-node | cross ÷ same |",
        "|---|---|---|---|---|",
    ]
    rows = [
        ("deliveries_per_s", "broadcast deliveries/s (1/s)"),
        ("latency_p50_ms", "broadcast send→last receipt p50 (ms)"),
        ("latency_p99_ms", "broadcast send→last receipt p99 (ms)"),
    ]
    for n, cell in result["crossnode"].items():
        sb = same.get(n, {}).get("broadcast", {})
        for key, label in rows:
            out.append(f"| {int(n):,} | {label} | {fmt(sb.get(key))} | {fmt(cell.get(key))} | "
                       f"{ratio(cell.get(key), sb.get(key))} |")
        ready = same.get(n, {}).get("idle", {}).get("devices_ready")
        out.append(f"| {int(n):,} | devices logged in | {fmt(ready)} | {fmt(cell.get('devices_ready'))} | – |")
    return [*out, ""]


def targets_check(result: dict[str, Any]) -> list[str]:
    """Issue 6's targets, judged at 5k connections (or the nearest size measured)."""
    med = result["medians"]
    if "fleetpush" not in med or not med["fleetpush"]:
        return []
    sizes = [int(k) for k in med["fleetpush"]]
    n = min(sizes, key=lambda k: abs(k - 5000))
    key = str(n)

    def val(server: str, scen: str, metric: str) -> float | None:
        got = med.get(server, {}).get(key, {}).get(scen, {}).get(metric)
        return float(got) if isinstance(got, int | float) else None

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**missed**")

    def cmp(a: float | None, b: float | None, higher: bool) -> bool | None:
        if a is None or b is None:
            return None
        return a >= b if higher else a <= b

    fp_b, nd_b = val("fleetpush", "broadcast", "deliveries_per_s"), val("node", "broadcast", "deliveries_per_s")
    fp_l, nd_l = val("fleetpush", "broadcast", "latency_p99_ms"), val("node", "broadcast", "latency_p99_ms")
    fp_r, ai_r = val("fleetpush", "reqresp", "replies_per_s"), val("aiohttp", "reqresp", "replies_per_s")
    rss = val("fleetpush", "idle", "rss_per_conn_kib")
    ing = val("fleetpush", "ingest", "latency_p99_ms")
    drop = val("fleetpush", "ingest", "dropped")
    ready = val("fleetpush", "idle", "devices_ready")
    ingest_ok = None if ing is None or drop is None else (ing < 100 and drop == 0 and ready == n)
    rows = [
        (
            "broadcast deliveries/s ≥ 1.0× Node ws",
            f"{fmt(fp_b)} vs {fmt(nd_b)} ({ratio(fp_b, nd_b)})",
            cmp(fp_b, nd_b, True),
        ),
        ("broadcast p99 ≤ Node ws", f"{fmt(fp_l)} ms vs {fmt(nd_l)} ms", cmp(fp_l, nd_l, False)),
        ("replies/s ≥ 1.0× aiohttp", f"{fmt(fp_r)} vs {fmt(ai_r)} ({ratio(fp_r, ai_r)})", cmp(fp_r, ai_r, True)),
        ("≤ 16 KiB RSS per idle connection", f"{fmt(rss)} KiB", None if rss is None else rss <= 16),
        (
            f"{n:,} devices at 1 report/s: p99 < 100 ms, nothing dropped",
            f"p99 {fmt(ing)} ms, {fmt(drop)} not pushed, {fmt(ready)} of {n:,} logged in",
            ingest_ok,
        ),
    ]
    out = [
        f"Issue 6 targets at {n:,} connections (fleetpush medians):\n",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    out += [f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in rows]
    return [*out, ""]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    v = result["versions"]
    lines = [
        "# fleetpush benchmark: latest results\n",
        f"Run {result['started']} ({'quick' if result['quick'] else 'full'}), "
        f"{m['nproc']} × {m['cpu_model']}, {m['mem_gib']} GiB, Linux {m['kernel']}; server on CPU 0, "
        f"load generator on CPU 1 ({'pinned' if result['pinned'] else 'NOT pinned'}); "
        f"1-minute load average {m.get('loadavg_1m_at_start')} at start, {m.get('loadavg_1m_at_end')} at end "
        "(the machine is shared: other work adds noise).",
        "Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + (f"; fleetpush core at {result['fleetpush_commit']}" if result.get("fleetpush_commit") else "")
        + ".",
        "Ratios are fleetpush ÷ peer: above 1 is better for rates, below 1 is better for latency and RSS.\n",
        tables(result),
        *targets_check(result),
        "Generated by `fleetpush bench`; method and limits in docs/PERFORMANCE.md.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    if argv and argv[0] == "--":  # `fleetpush bench -- --quick` hands the separator through
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="fleetpush bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 connections, ~2 s phases, one repeat (test suite)")
    every = ",".join((*SERVERS, CROSSNODE))
    p.add_argument("--servers", default=every, help=f"comma list of {every} (crossnode needs redis-server)")
    p.add_argument("--conns", default="", help="comma list of connection counts (default 1000,5000,10000)")
    p.add_argument("--repeats", type=int, default=0, help="repeats per point (default 3; quick 1)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every phase duration")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--out", default=str(RESULTS), help="directory for latest.json / latest.md")
    p.add_argument("--core-ref", default="", help="measure fleetpush's core/ at this git ref (default: work tree)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the load generator ceiling run")
    p.add_argument("--keep-logs", action="store_true", help="keep server and loadgen logs (path printed)")
    p.add_argument("--phases", default="", help=f"comma list of phases (default {ALL_PHASES})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fleetpush bench`; returns the process exit code."""
    args = parse_args(argv)
    prof = dataclasses.replace(QUICK if args.quick else FULL)
    if args.conns:
        prof.sizes = [int(x) for x in args.conns.split(",") if x]
    if args.repeats:
        prof.repeats = args.repeats
    if args.scale != 1.0:
        for f in ("idle_s", "bcast_lat_s", "bcast_sat_s", "req_s", "ingest_s", "cmd_s"):
            setattr(prof, f, getattr(prof, f) * args.scale)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    too_big = [n for n in prof.sizes if n + 64 > nofile]
    if too_big:
        log(f"open-file hard limit is {nofile}: {too_big} connections cannot be held; dropped")
        prof.sizes = [n for n in prof.sizes if n + 64 <= nofile]
    pin_cpus = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    selected = [s.strip() for s in args.servers.split(",") if s.strip()]
    old_int = signal.getsignal(signal.SIGINT)
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(_sig: int, _frm: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (a background job)
    workdir = Path(tempfile.mkdtemp(prefix="fleetpush-bench-"))
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "pinned": pin_cpus,
        "sizes": prof.sizes,
        "repeats": prof.repeats,
        "profile": prof.__dict__,
        "machine": machine(),
        "servers": [],
        "skipped": {},
        "errors": [],
        "runs": [],
        "medians": {},
        "rows": [],
        "ceiling": {},
        "crossnode": {},
    }
    try:
        build_c(LOADGEN_SRC, LOADGEN)
        core_dir = None
        if args.core_ref and "fleetpush" in selected:
            core_dir, result["fleetpush_commit"] = core_snapshot(args.core_ref, workdir / "core-snapshot")
            log(f"fleetpush measured at {args.core_ref} = {result['fleetpush_commit'][:12]}")
        else:
            with contextlib.suppress(Exception):
                head = subprocess.run(
                    ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
                )
                dirty = subprocess.run(
                    ["git", "status", "--porcelain", "--", "core", "config.yaml"],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                result["fleetpush_commit"] = head.stdout.strip() + (
                    " + work-tree changes" if dirty.stdout.strip() else ""
                )
        tgs, result["skipped"] = targets(selected, core_dir)
        if args.phases:
            tgs = [dataclasses.replace(t, phases=args.phases) for t in tgs]
        for name, why in result["skipped"].items():
            log(f"skipping {name}: {why}")
        result["servers"] = [t.name for t in tgs]
        xbase: Target | None = None
        if CROSSNODE in selected:
            xtg, xskip = targets(["fleetpush"], core_dir)
            if not xtg:
                result["skipped"][CROSSNODE] = xskip.get("fleetpush", "fleetpush cannot run")
            elif shutil.which("redis-server") is None:
                result["skipped"][CROSSNODE] = "redis-server not found (apt-get install redis-server)"
            else:
                xbase = xtg[0]
            if CROSSNODE in result["skipped"]:
                log(f"skipping {CROSSNODE}: {result['skipped'][CROSSNODE]}")
        result["versions"] = versions()
        # Servers take turns within each (size, repeat): noise from other work on this shared
        # machine then lands on every server alike instead of on whichever ran during it.
        def measure(name: str, n: int, rep: int, run: Callable[[], dict[str, Any]],
                    summarize_run: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
            """One server's turn: its raw result and summary go into `result`; a failure is recorded."""
            try:
                raw = run()
            except RuntimeError as e:
                log(f"{name} {n} failed: {e}")
                result["errors"].append(f"{name}@{n}#{rep + 1}: {str(e).splitlines()[0]}")
                return None
            if raw.get("devices_ready", 0) < n:
                log(f"{name} {n}: only {raw.get('devices_ready')} devices logged in")
            summ = summarize_run(raw)
            result["runs"].append({"server": name, "conns": n, "repeat": rep, "raw": raw, "summary": summ})
            return summ

        for n in prof.sizes:
            for rep in range(prof.repeats):
                for t in tgs:
                    run_id = f"{t.name[:2].upper()}{n}r{rep}x{secrets.token_hex(2)}"
                    log(f"{t.name}: {n} connections, repeat {rep + 1}/{prof.repeats}")
                    summ = measure(t.name, n, rep, partial(run_once, t, n, prof, workdir, run_id, pin_cpus), summarize)
                    if summ is not None:
                        brief = summ["broadcast"]["deliveries_per_s"], summ["reqresp"]["replies_per_s"]
                        log(f"  broadcast {fmt(brief[0])}/s, reqresp {fmt(brief[1])}/s")
                if xbase is not None:
                    run_id = f"XN{n}r{rep}x{secrets.token_hex(2)}"
                    log(f"{CROSSNODE}: {n} devices on node A, broadcasts sent to node B, repeat {rep + 1}")
                    run = partial(run_crossnode, xbase, n, prof, workdir, run_id, pin_cpus)
                    summ = measure(CROSSNODE, n, rep, run, summarize_crossnode)
                    if summ is not None:
                        log(f"  cross-node broadcast {fmt(summ['broadcast']['deliveries_per_s'])}/s")
        if not args.no_ceiling:
            build_c(CEILING_SRC, CEILING)
            ct = Target("ceiling", [str(CEILING)], dict(os.environ), phases="broadcast,reqresp", bcast_window=32)
            for n in prof.sizes:
                log(f"load generator ceiling against a trivial C server: {n} connections")
                try:
                    raw = run_once(ct, n, prof, workdir, f"CE{n}x{secrets.token_hex(2)}", pin_cpus)
                except RuntimeError as e:
                    result["errors"].append(f"ceiling@{n}: {str(e).splitlines()[0]}")
                    continue
                b, r = raw.get("broadcast", {}), raw.get("reqresp", {})
                result["ceiling"][str(n)] = {
                    "received_frames_per_s": b.get("deliveries_per_s"),
                    "loadgen_cpu_s": b.get("loadgen_cpu_s"),
                    "elapsed_s": b.get("elapsed_s"),
                    "frames_per_loadgen_cpu_s": b.get("loadgen_frames_per_cpu_s"),
                    "replies_per_s": r.get("replies_per_s"),
                }
                log(f"  received {fmt(b.get('deliveries_per_s'))} frames/s")
    except KeyboardInterrupt:
        log("interrupted; stopping children and writing what was measured")
        result["errors"].append("interrupted")
    finally:
        stop_all()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    result.setdefault("versions", {})
    result["machine"]["loadavg_1m_at_end"] = loadavg()
    for s in result["servers"]:
        for n in prof.sizes:
            runs = [r["summary"] for r in result["runs"] if r["server"] == s and r["conns"] == n]
            if not runs:
                continue
            cell = result["medians"].setdefault(s, {}).setdefault(str(n), {})
            for scen in SCENARIOS:
                cell[scen] = {k: median([r[scen][k] for r in runs]) for k in runs[0][scen]}
                result["rows"].append({"server": s, "conns": n, "scenario": scen, **cell[scen]})
    for n in prof.sizes:
        runs = [r["summary"] for r in result["runs"] if r["server"] == CROSSNODE and r["conns"] == n]
        if runs:
            cell = {k: median([r["broadcast"][k] for r in runs]) for k in runs[0]["broadcast"]}
            result["crossnode"][str(n)] = cell
            result["rows"].append({"server": CROSSNODE, "conns": n, "scenario": "broadcast", **cell})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "latest.md").write_text(md)
    print(tables(result))
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    ok = bool(result["runs"]) and "interrupted" not in result["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
