"""The analyst notebooks, executed headless against a real core fed by the simulator.

The test starts ``fleetpush serve`` on a free 127.0.0.1 port, runs a simulated fleet in time-lapse
(each robot's state model advances ``LAPSE`` seconds per real second, so a ~20 s run holds the
battery cycles and faults of several minutes), takes a few robots offline half way, issues commands
that end in every final state (acked, failed, expired, canceled, some after retries), then runs every
``notebooks/*.ipynb`` with papermill on a kernel spec that points at this interpreter and checks that
each tagged figure cell drew a plotly figure with data and each tagged conclusion cell rendered text.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.client import FINAL_COMMAND_STATES, FleetClient, FleetUnavailable
from core.simulate import Fleet, SimConfig, SimDevice

papermill = pytest.importorskip("papermill", reason="papermill is not installed (pip install papermill)")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
ADMIN_PASSWORD = "notebook-admin-pass"
FLEET_SECRET = "notebook-fleet-secret-0123456789"
KERNEL = "fleetpush-test-venv"
LAPSE = 25.0  # model seconds per real second
DEVICES = 32  # robots that stay connected
LEAVERS = 4  # robots that go offline half way (their commands expire or are canceled)
INTERVAL_S = 0.2
PHASE_S = 7.0  # real seconds before and after the leavers go
WAIT_S = 20.0  # upper bound of every awaited condition
WORN = 2  # robots with a worn battery ...
WORN_EXTRA_DRAIN = 0.2  # ... lose this many more percent per model second (the notebook should flag them)


@dataclass
class CoreProcess:
    """A ``fleetpush serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def http_url(self) -> str:
        """The HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The device WebSocket URL."""
        return f"ws://127.0.0.1:{self.port}/ws"


@dataclass
class Issued:
    """The commands the test issued, by the outcome it arranged for them."""

    by_outcome: dict[str, list[str]] = field(default_factory=dict)

    def add(self, outcome: str, command_id: str) -> None:
        """Remember a command id."""
        self.by_outcome.setdefault(outcome, []).append(command_id)

    def all(self) -> list[str]:
        """Every command id."""
        return [cid for ids in self.by_outcome.values() for cid in ids]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s:g} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    """A core on a free port, embedded store, fast command retries; stopped by its PID at the end."""
    log = tmp_path_factory.mktemp("core") / "core.log"
    port = _free_port()
    env = dict(os.environ)
    env.update({
        "FLEETPUSH_AUTH__ADMIN_PASSWORD": ADMIN_PASSWORD,
        "FLEETPUSH_AUTH__DEVICE_SECRET": FLEET_SECRET,
        "FLEETPUSH_AUTH__ARGON2_TIME_COST": "1",
        "FLEETPUSH_AUTH__ARGON2_MEMORY_KIB": "1024",
        "FLEETPUSH_SERVER__HOST": "127.0.0.1",
        "FLEETPUSH_COMMANDS__ACK_TIMEOUT_S": "1",  # slow acks (2.5 s) are redelivered: retries to analyse
        "FLEETPUSH_COMMANDS__SWEEP_INTERVAL_S": "0.2",
        "FLEETPUSH_STORE__MONGO_URL": "",
    })
    exe = Path(sys.executable).with_name("fleetpush")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    cp = CoreProcess(proc, port, log)
    try:
        probe = FleetClient(cp.http_url, timeout=1.0)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"core exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                return probe.readyz()
            except FleetUnavailable:
                return False

        _wait_for(ready, WAIT_S, "the core to be ready")
        probe.close()
        yield cp
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _time_lapse(device: SimDevice, factor: float, extra_drain_per_s: float = 0.0) -> None:
    """Advance the device's model ``factor`` times faster than real time; optionally wear its battery."""
    model = device.model

    def step(dt: float) -> dict[str, Any]:
        model.step(dt * factor)
        if extra_drain_per_s and model.mode != "charging":
            model.battery = max(0.0, model.battery - extra_drain_per_s * dt * factor)
        return model.report()

    device.step = step  # type: ignore[method-assign]


def _fleet(url: str, prefix: str, devices: int, seed: int, types: list[str] | None = None) -> Fleet:
    config = SimConfig(url=url, devices=devices, interval_s=INTERVAL_S, secret=FLEET_SECRET, sn_prefix=prefix,
                       types=types or ["retail", "dance_robot", "dance_dog", "rubbish"],
                       seed=seed, ack_failure_rate=0.12, slow_ack_rate=0.2, slow_ack_s=2.5,
                       base_backoff_s=0.05, max_backoff_s=1.0, connect_rate_per_s=100.0)
    fleet = Fleet(config)
    for device in fleet.devices:
        _time_lapse(device, LAPSE)
    return fleet


def _issue_online(client: FleetClient, sns_by_type: dict[str, list[str]], rng: random.Random,
                  issued: Issued) -> None:
    """Commands to connected robots: most are acked, some fail (refused or simulated faults)."""
    plan: list[tuple[str, dict[str, Any]]] = [
        ("ping", {}), ("relocalize", {}), ("dock", {}), ("dance", {"duration_s": 20}),
        ("empty_bin", {}), ("move", {"x": 5.0, "y": -3.0}), ("resume", {}), ("self_test", {}),
    ]
    for sns in sns_by_type.values():
        for sn in sns:
            for command, args in rng.sample(plan, 2):
                issued.add("online", client.send_command(sn, command, args=args, ttl_s=60).command_id)


def _issue_offline(client: FleetClient, leavers: list[str], issued: Issued) -> None:
    """Commands to robots that went away: short TTLs expire, long ones are canceled by the operator."""
    for sn in leavers:
        issued.add("expired", client.send_command(sn, "ping", ttl_s=1).command_id)
        issued.add("expired", client.send_command(sn, "dock", ttl_s=2).command_id)
        receipt = client.send_command(sn, "resume", ttl_s=600)
        client.cancel_command(receipt.command_id)
        issued.add("canceled", receipt.command_id)


class SimLoop:
    """An event loop in a thread: the fleets keep reporting while the test and the notebooks run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], limit_s: float) -> T:
        """Run a coroutine on the loop and wait for its result, at most ``limit_s`` seconds."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(limit_s)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _populate(client: FleetClient, stay: Fleet, leave: Fleet) -> Issued:
    """Run the fleets, take the leavers away, issue the commands, and wait until every command is final."""
    issued = Issued()
    rng = random.Random(5)
    await stay.start()
    await leave.start()
    assert await stay.wait_connected(DEVICES, WAIT_S), stay.stats().summary()
    assert await leave.wait_connected(LEAVERS, WAIT_S), leave.stats().summary()
    sns_by_type: dict[str, list[str]] = {}
    for device in stay.devices:
        sns_by_type.setdefault(device.type, []).append(device.sn)
    await asyncio.sleep(PHASE_S / 2)  # history accrues in real time: this is the run's length, not a wait
    await asyncio.to_thread(_issue_online, client, sns_by_type, rng, issued)
    await asyncio.sleep(PHASE_S / 2)
    await leave.stop()
    leavers = [d.sn for d in leave.devices]

    def offline() -> bool:
        return all(not d.online for d in client.devices() if d.sn in leavers)

    await asyncio.to_thread(_wait_for, offline, WAIT_S, "the leavers to be offline")
    await asyncio.to_thread(_issue_offline, client, leavers, issued)
    await asyncio.to_thread(_issue_online, client, sns_by_type, rng, issued)
    await asyncio.sleep(PHASE_S)

    def all_final() -> bool:
        states = {c.command_id: c.state for c in client.commands()}
        return all(states.get(cid) in FINAL_COMMAND_STATES for cid in issued.all())

    await asyncio.to_thread(_wait_for, all_final, WAIT_S, "every command to be final")
    return issued


@pytest.fixture(scope="module")
def fleet_data(core: CoreProcess) -> Iterator[dict[str, Any]]:
    """History and commands of every outcome in the core; the fleet keeps reporting until the module ends."""
    sim = SimLoop()
    stay = _fleet(core.ws_url, "SIM", DEVICES, seed=11)
    leave = _fleet(core.ws_url, "GONE", LEAVERS, seed=12, types=["rubbish"])
    worn = [device.sn for device in stay.devices[:WORN]]
    for device in stay.devices[:WORN]:
        _time_lapse(device, LAPSE, extra_drain_per_s=WORN_EXTRA_DRAIN)
    try:
        with FleetClient.connect(core.http_url, "admin", ADMIN_PASSWORD) as client:
            issued = sim.run(_populate(client, stay, leave), 4 * WAIT_S + 2 * PHASE_S)
            stay.config.interval_s = 0.5  # lighter load while the notebooks run; still several reports a bucket
            commands = client.commands()
            devices = client.devices()
        yield {
            "issued": issued,
            "states": Counter(c.state for c in commands),
            "state_of": {c.command_id: c.state for c in commands},
            "retried": sum(1 for c in commands if c.attempts > 1),
            "devices": devices,
            "worn": worn,
        }
    finally:
        sim.run(stay.stop(), WAIT_S)
        sim.run(leave.stop(), WAIT_S)
        sim.close()


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernel spec for this interpreter in a temp JUPYTER_PATH (never installed globally)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fleetpush (test venv)",
        "language": "python",
    }))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
    mp.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    mp.setenv("IPYTHONDIR", str(root / "ipython"))
    try:
        yield KERNEL
    finally:
        mp.undo()


def test_fleet_data_has_every_outcome(fleet_data: dict[str, Any]) -> None:
    """The core holds commands in every final state, some redelivered, and offline robots."""
    states = fleet_data["states"]
    for state in ("acked", "failed", "expired", "canceled"):
        assert states[state] > 0, states
    assert fleet_data["retried"] > 0, "no command was redelivered"
    for outcome in ("expired", "canceled"):
        arranged = fleet_data["issued"].by_outcome[outcome]
        assert {fleet_data["state_of"][cid] for cid in arranged} == {outcome}, outcome
    offline = [d.sn for d in fleet_data["devices"] if d.sn.startswith("GONE")]
    assert len(offline) == LEAVERS


NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_are_committed_without_outputs() -> None:
    """Every notebook has a parameters cell and no outputs or execution counts in git."""
    assert len(NOTEBOOK_FILES) >= 3, NOTEBOOK_FILES
    for path in NOTEBOOK_FILES:
        nb = nbformat.read(path, as_version=4)
        tags = [set(cell.metadata.get("tags", [])) for cell in nb.cells]
        assert sum("parameters" in t for t in tags) == 1, f"{path.name}: one cell tagged parameters"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


def _plotly_traces(cell: Any) -> list[dict[str, Any]]:
    """The traces of the plotly figures a cell displayed."""
    traces: list[dict[str, Any]] = []
    for out in cell.get("outputs", []):
        fig = out.get("data", {}).get(PLOTLY_MIME)
        if fig is not None:
            traces.extend(fig.get("data", []))
    return traces


def _has_points(trace: dict[str, Any]) -> bool:
    for key in ("x", "y", "values", "z"):
        value = trace.get(key)
        if isinstance(value, dict):  # plotly may ship arrays as typed buffers {"dtype", "bdata"}
            if value.get("bdata") or value.get("_inputArray"):
                return True
        elif value is not None and len(value) > 0:
            return True
    return False


def _markdown(cell: Any) -> str:
    return "".join(out.get("data", {}).get("text/markdown", "") for out in cell.get("outputs", []))


def _expected_findings(stem: str, fleet_data: dict[str, Any]) -> list[str]:
    """What the conclusions must say about the fleet this test made."""
    if stem.startswith("01"):
        return ["**rubbish** was the least available", f"{DEVICES} of {DEVICES + LEAVERS} robots are online"]
    if stem.startswith("02"):
        return [f"**{sn}**" for sn in fleet_data["worn"]]
    if stem.startswith("03"):
        states = fleet_data["states"]
        return [f"{state} " for state in ("acked", "failed", "expired", "canceled")] + [
            f"Expired**: {states['expired']} commands", "100% of them were never delivered"]
    return []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=[p.stem for p in NOTEBOOK_FILES])
def test_notebook_executes(path: Path, core: CoreProcess, fleet_data: dict[str, Any], kernel_env: str,
                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook runs headless against the core, draws its figures and writes its conclusions."""
    monkeypatch.setenv("FLEETPUSH_PASSWORD", ADMIN_PASSWORD)  # credentials through the environment
    out = tmp_path / path.name
    papermill.execute_notebook(
        str(path), str(out), kernel_name=kernel_env, cwd=str(NOTEBOOKS), progress_bar=False,
        parameters={"CORE_URL": core.http_url, "USERNAME": "admin", "WINDOW_HOURS": 1.0},
        execution_timeout=120,
    )
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    figures = [c for c in nb.cells if "figure" in c.metadata.get("tags", [])]
    conclusions = [c for c in nb.cells if "conclusion" in c.metadata.get("tags", [])]
    assert len(figures) >= 3, f"{path.name}: expected at least three figure cells"
    assert conclusions, f"{path.name}: no conclusion cell"
    for cell in figures:
        traces = _plotly_traces(cell)
        assert traces, f"{path.name}: figure cell drew no plotly figure:\n{cell.source[:200]}"
        assert any(_has_points(t) for t in traces), f"{path.name}: empty figure:\n{cell.source[:200]}"
    for cell in conclusions:
        text = _markdown(cell)
        assert len(text.strip()) > 40, f"{path.name}: conclusion rendered nothing:\n{cell.source[:200]}"
    params = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert params and core.http_url in params[0].source
    findings = "\n".join(_markdown(c) for c in conclusions)
    for expected in _expected_findings(path.stem, fleet_data):
        assert expected in findings, f"{path.name}: conclusion lacks {expected!r}:\n{findings}"
    mongo = [c for c in nb.cells if "mongodb" in c.metadata.get("tags", [])]
    assert mongo, f"{path.name}: no MongoDB query cell"
    assert "MONGO_URL not set" in "".join(o.get("text", "") for c in mongo for o in c.get("outputs", []))


STAGES = {"$match", "$group", "$project", "$sort", "$setWindowFields", "$addFields", "$limit"}


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=[p.stem for p in NOTEBOOK_FILES])
def test_mongodb_cell_builds_its_pipeline(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a MongoDB URL set, the production cell runs one aggregation over a store collection.

    No MongoDB runs here, so a stub client records the pipeline: this checks the cell's Python, the
    collection it reads and the shape of its stages, not MongoDB's evaluation of them.
    """
    import pandas as pd
    import pymongo

    calls: list[tuple[str, str, list[dict[str, Any]]]] = []

    class Collection:
        def __init__(self, db: str, name: str) -> None:
            self.db, self.name = db, name

        def aggregate(self, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
            calls.append((self.db, self.name, pipeline))
            return [{"stub": 1}]

    class StubClient:
        def __init__(self, url: str, **kwargs: Any) -> None:
            assert url == "mongodb://stub.invalid:27017" and kwargs.get("tz_aware") is True

        def __getitem__(self, db: str) -> Any:
            return type("Db", (), {"__getitem__": lambda _self, name: Collection(db, name)})()

    monkeypatch.setattr(pymongo, "MongoClient", StubClient)
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    import fleetdata

    shown: list[Any] = []
    namespace: dict[str, Any] = {
        "MONGO_URL": "mongodb://stub.invalid:27017", "MONGO_DB": "fleetpush", "fd": fleetdata, "pd": pd,
        "window": fleetdata.Window(hours=1), "bucket": pd.Timedelta("1min"), "display": shown.append,
    }
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "mongodb" in c.metadata.get("tags", [])]
    exec(compile(cell.source, f"{path.name}:mongodb", "exec"), namespace)
    assert len(calls) == 1 and shown, "the cell ran no aggregation or displayed nothing"
    db, collection, pipeline = calls[0]
    assert db == "fleetpush" and collection in {"status", "commands"}
    assert pipeline and next(iter(pipeline[0])) == "$match"
    for stage in pipeline:
        assert len(stage) == 1 and next(iter(stage)) in STAGES, stage
