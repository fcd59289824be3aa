"""`fleetpush bench --quick` end to end: every server and scenario yields numbers (speed is never asserted)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("broadcast", "reqresp", "ingest", "command", "idle")
PEERS = ("node", "aiohttp", "websockets")
CROSSNODE_TITLE = "cross-node broadcast (2 nodes over Redis)"

missing = [tool for tool in ("gcc", "node") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(missing) and os.environ.get("CI") != "true",
    reason=f"the benchmark needs {', '.join(missing)} (C load generator, Node ws peer); not installed here",
)


def core_landed() -> bool:
    return (ROOT / "core" / "__main__.py").exists()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One `--quick` run shared by the tests below: its JSON result and its markdown."""
    out = tmp_path_factory.mktemp("bench") / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text()


@pytest.mark.timeout(600)
def test_bench_quick_has_a_numeric_row_per_server_and_scenario(quick_run: tuple[dict[str, Any], str]) -> None:
    result, md = quick_run

    servers = [*PEERS, "fleetpush"] if core_landed() else list(PEERS)
    assert set(servers) <= set(result["servers"]), result["skipped"]
    assert not result["errors"], result["errors"]
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    for server in servers:
        assert f" {server} " in header, header
        for scenario in SCENARIOS:
            rows = [r for r in result["rows"] if r["server"] == server and r["scenario"] == scenario]
            assert len(rows) == 1, (server, scenario, rows)
            metrics = {k: v for k, v in rows[0].items() if k not in ("server", "conns", "scenario")}
            assert metrics, (server, scenario)
            for name, value in metrics.items():
                assert isinstance(value, int | float) and math.isfinite(value), (server, scenario, name, value)

    # Every device logged in, and the load generator measured its own ceiling.
    for run in result["runs"]:
        assert run["raw"]["devices_ready"] == run["conns"], (run["server"], run["raw"])
    assert result["ceiling"], "load generator ceiling missing"
    assert all(c["received_frames_per_s"] > 0 for c in result["ceiling"].values())


@pytest.mark.timeout(600)
def test_bench_quick_has_the_cross_node_broadcast_row(quick_run: tuple[dict[str, Any], str]) -> None:
    if not core_landed():
        pytest.skip("core/__main__.py not there yet: no fleetpush nodes to cluster")
    if shutil.which("redis-server") is None and os.environ.get("CI") != "true":
        pytest.skip("redis-server is not installed (apt-get install redis-server): no cross-node scenario")
    result, md = quick_run
    assert "crossnode" not in result["skipped"], result["skipped"]
    rows = [r for r in result["rows"] if r["server"] == "crossnode" and r["scenario"] == "broadcast"]
    assert len(rows) == 1, rows
    # On failure, show what the run saw: the load generator's broadcast numbers, each node's broker
    # state at the end, and (for a zero) the tails of the node, Redis and load generator logs.
    raw = next(r["raw"] for r in result["runs"] if r["server"] == "crossnode")
    seen = {k: raw.get(k) for k in ("broadcast", "brokers_at_end", "control_close_code", "diagnostics")}
    problems = [
        f"{name} = {rows[0][name]!r}"
        for name in ("deliveries_per_s", "latency_p50_ms", "latency_p99_ms")
        if not (isinstance(rows[0][name], int | float) and math.isfinite(rows[0][name]) and rows[0][name] > 0)
    ]
    if raw["brokers_at_end"] != {"a": "ok", "b": "ok"}:
        problems.append(f"brokers at the end: {raw['brokers_at_end']}")
    if raw["broadcast"]["reply_errors"]:  # every broadcast request must be answered code 0
        problems.append(f"{raw['broadcast']['reply_errors']} broadcast requests answered with an error")
    if problems:  # pytest.fail prints all of it (an assert message would be cut short)
        pytest.fail("; ".join(problems) + "\n" + json.dumps(seen, indent=1, default=str))
    # Every device on node A got the broadcasts sent through node B.
    assert rows[0]["devices_ready"] == rows[0]["conns"], rows[0]
    assert CROSSNODE_TITLE in md, md
    section = md.split(CROSSNODE_TITLE, 1)[1].splitlines()
    assert any(line.startswith("| ") and "deliveries/s" in line for line in section), section
