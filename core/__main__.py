"""The `fleetpush` command: serve, dashboard, simulate, up, bench."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Any

from .config import ConfigError, Settings, load_settings
from .logs import setup_logging

log = logging.getLogger("fleetpush")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    try:
        s = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"fleetpush: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    if overrides:
        s.server = s.server.model_copy(update=overrides)
    return s


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> int:
    """Run one core node until SIGINT or SIGTERM; exit code 0 after a clean stop."""
    from .app import make_app

    app = make_app(settings)
    port = await app.start()
    # Start-up objects live as long as the process; freezing them keeps the collector's
    # young generations small, which cuts pauses under fan-out load.
    gc.collect()
    gc.freeze()
    log.info("fleetpush core listening on %s (ws: /ws, api: /api/v1, metrics: /metrics)", app.url())
    print(f"fleetpush core listening on {app.url()}  (WebSocket {app.url().replace('http', 'ws', 1)}/ws)",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()

    async def announce_password() -> None:
        await app.store_ready.wait()
        if app.generated_admin_password:
            # Printed once on stdout for the operator; it never goes through the loggers.
            print(f"fleetpush: created user 'admin' with generated password: {app.generated_admin_password}",
                  flush=True)

    announcer = asyncio.create_task(announce_password())
    await stop.wait()
    announcer.cancel()
    log.info("shutting down: closing %d connections with 1001", len(app.deps.hub))
    await app.stop()
    log.info("stopped (port %d)", port)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    s = _settings(args)
    setup_logging(s.server.log_format, s.server.log_level)
    code = asyncio.run(serve(s))
    # A second Ctrl-C while the interpreter joins its worker threads would print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _cmd_simulate(args: argparse.Namespace) -> int:
    from . import simulate

    setup_logging("text", "INFO")
    return int(simulate.main(args))


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboard.launch import command, environment

    s = _settings(args)
    url = args.core_url or s.dashboard.core_url
    argv = command(url, args.dash_port or s.dashboard.port, s.dashboard.host)
    env = environment(url)
    env["FLEETPUSH_DASHBOARD_REFRESH_S"] = str(s.dashboard.refresh_s)
    os.execvpe(argv[0], argv, env)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from .up import run_up

    return run_up(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    # bench/ lives beside core/ in the checkout; it is not part of the installed package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bench = importlib.import_module("bench.run")
    return int(bench.main(args.rest))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand."""
    parser = argparse.ArgumentParser(prog="fleetpush", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the core (WebSocket /ws, HTTP API, /metrics)")
    p.add_argument("--config", help="path of config.yaml (default: the repository's)")
    p.add_argument("--port", type=int, help="override server.port")
    p.add_argument("--host", help="override server.host")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("simulate", help="run a simulated fleet against a core")
    try:
        from . import simulate

        simulate.add_arguments(p)
    except ImportError:  # the simulator module is optional in stripped-down images
        pass
    p.set_defaults(fn=_cmd_simulate)

    p = sub.add_parser("dashboard", help="run the ops dashboard against a core")
    p.add_argument("--config")
    p.add_argument("--core-url", dest="core_url", help="the core's HTTP URL (default dashboard.core_url)")
    p.add_argument("--port", dest="dash_port", type=int, help="dashboard port (default dashboard.port)")
    p.set_defaults(fn=_cmd_dashboard)

    p = sub.add_parser("up", help="core on the embedded store + dashboard + a simulated fleet")
    p.add_argument("--config")
    p.add_argument("--port", type=int, help="core port (default server.port)")
    p.add_argument("--dashboard-port", type=int, help="dashboard port (default dashboard.port)")
    p.add_argument("--devices", type=int, help="simulated robots (default simulator.devices)")
    p.set_defaults(fn=_cmd_up)

    p = sub.add_parser("bench", help="benchmark fleetpush against peer servers (options: fleetpush bench --help)",
                       add_help=False)
    p.set_defaults(fn=_cmd_bench, rest=[])

    # The benchmark parses its own options, so everything after `bench` goes to it unchanged.
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    fn: Any = args.fn
    return int(fn(args))


if __name__ == "__main__":
    sys.exit(main())
