"""How to start the dashboard as its own process.

The core URL reaches the dashboard through the environment variable ``FLEETPUSH_CORE_URL``
(see :func:`environment`); :func:`command` also passes it after ``--`` as ``--core-url URL`` so the
argv alone is enough. Usage statistics are off both by flag and by ``dashboard/.streamlit/config.toml``
(which Streamlit reads next to the script, whatever the working directory), so Streamlit never calls
out to the internet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

#: The environment variable that carries the core's base URL to the dashboard.
ENV_CORE_URL = "FLEETPUSH_CORE_URL"
APP = Path(__file__).resolve().parent / "app.py"
ROOT = APP.parent.parent


def command(core_url: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The argv that runs the dashboard on ``host:port`` against the core at ``core_url``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--",
        "--core-url",
        core_url,
    ]


def environment(core_url: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the dashboard process: ``base`` (default os.environ) plus the core URL."""
    env = dict(os.environ if base is None else base)
    env[ENV_CORE_URL] = core_url
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spawn(core_url: str, port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """Start the dashboard process with :func:`command` and :func:`environment`."""
    return subprocess.Popen(command(core_url, port, host), env=environment(core_url), cwd=str(ROOT))
