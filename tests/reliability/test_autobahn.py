"""Autobahn|Testsuite conformance of /ws with kosoku (every case but 9.* performance and 12.*/13.* compression).

Two runs against a live core on 127.0.0.1:

1. The framing run: the core's own handshake, WebSocket session (`core.wire.WireSession`), hub
   registration and close paths, with `on_message` swapped for an echo, because Autobahn judges a
   server by what it echoes. Every case must be OK, except the few listed in FRAMING_NOT_OK.
2. The contract run: the untouched /ws handler. fleetpush is not an echo service, so a case that
   expects its text back gets a 400 galbot_response (PROTOCOL §2), and a binary frame closes with
   1003 (PROTOCOL §1). Those cases are listed in CONTRACT_FAILURES, the failures must be exactly
   those, and each must fail for that documented reason only; every other case must pass.

Core settings for both runs (each Autobahn case is one anonymous connection that never logs in):
`auth.login_timeout_s` 3600 so no case is cut with 4401 mid-run, `limits.rate_per_s`/`rate_burst`
100000 so the 1000-message cases are not answered with 429. `limits.max_message_bytes` stays at
the default 65536: the largest case payload outside 9.* is exactly 65536 bytes (1.1.7, 1.1.8, 10.1.1).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
from collections.abc import Callable
from typing import Any

import kosoku
import pytest
from conftest import make_settings

from core.transport import Client

EXCLUDE = ["9.*", "12.*", "13.*"]

# Case -> why it is not OK in the framing run. Both still count as passed for Autobahn.
FRAMING_NOT_OK: dict[str, tuple[str, str]] = {
    "7.1.6": ("INFORMATIONAL", "the 256 KiB message is over limits.max_message_bytes (closed 1009); what "
                               "happens to frames after a close is left open by RFC 6455"),
    "7.13.1": ("INFORMATIONAL", "close code 5000 is outside every RFC 6455 range; we answer 1002"),
    "7.13.2": ("INFORMATIONAL", "close code 65535 is outside every RFC 6455 range; we answer 1002"),
}

_ECHO_TEXT = "expects its text message echoed; fleetpush answers non-envelope text with a 400 galbot_response"
_ECHO_AFTER = "expects the valid text sent before the protocol error echoed (the error itself is handled as required)"
# Glob -> reason; the contract run's failures must be exactly the cases these globs match.
CONTRACT_FAILURES: dict[str, str] = {
    "1.1.*": _ECHO_TEXT,
    "1.2.*": "expects its binary message echoed; PROTOCOL §1 closes a connection that sends binary with 1003",
    "3.2": _ECHO_AFTER, "3.3": _ECHO_AFTER, "3.4": _ECHO_AFTER,
    "4.1.3": _ECHO_AFTER, "4.1.4": _ECHO_AFTER, "4.1.5": _ECHO_AFTER,
    "4.2.3": _ECHO_AFTER, "4.2.4": _ECHO_AFTER, "4.2.5": _ECHO_AFTER,
    "5.3": _ECHO_TEXT, "5.4": _ECHO_TEXT, "5.5": _ECHO_TEXT, "5.6": _ECHO_TEXT, "5.7": _ECHO_TEXT,
    "5.8": _ECHO_TEXT, "5.15": _ECHO_AFTER, "5.19": _ECHO_TEXT, "5.20": _ECHO_TEXT,
    "6.1.*": _ECHO_TEXT, "6.2.*": _ECHO_TEXT, "6.5.*": _ECHO_TEXT,
    "6.6.2": _ECHO_TEXT, "6.6.5": _ECHO_TEXT, "6.6.7": _ECHO_TEXT, "6.6.9": _ECHO_TEXT, "6.6.11": _ECHO_TEXT,
    "6.7.*": _ECHO_TEXT, "6.9.*": _ECHO_TEXT,
    "6.11.1": _ECHO_TEXT, "6.11.2": _ECHO_TEXT, "6.11.3": _ECHO_TEXT, "6.11.4": _ECHO_TEXT,
    "6.22.*": _ECHO_TEXT, "6.23.*": _ECHO_TEXT,
    "7.1.1": _ECHO_TEXT,
    "10.1.1": _ECHO_TEXT,
}


def _settings() -> Any:
    return make_settings(auth={"login_timeout_s": 3600}, limits={"rate_per_s": 100000, "rate_burst": 100000})


async def _run(url: str) -> list[Any]:
    try:
        results = await kosoku.run_fuzzingclient(url, None, EXCLUDE, concurrency=8)
    except kosoku.FailureError as failure:
        results = failure.results
    return list(results)


async def _echo(self: Client, message: str | bytes) -> None:
    if self.conn is None or self.conn.closed:
        return
    self.conn.touch()
    self.conn.sink.send_message(message)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
async def test_framing_layer_passes_every_case(core_factory: Callable[..., Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(Client, "on_message", _echo)
    core = await core_factory(_settings())
    results = await _run(core.ws_url)
    assert len(results) == 247  # the whole selection ran
    not_ok = {r.case_id: r.behavior.value for r in results if r.behavior.value != "OK"}
    assert {r.case_id for r in results if r.behavior_close.value != "OK"} <= set(FRAMING_NOT_OK)
    assert not_ok == {case: verdict for case, (verdict, _) in FRAMING_NOT_OK.items()}, not_ok
    assert all(r.passed for r in results)
    await asyncio.wait_for(core.app.gateway.empty.wait(), 10)  # every case's connection left the hub


def _allowlisted(case_id: str) -> bool:
    return any(fnmatch.fnmatchcase(case_id, pat) for pat in CONTRACT_FAILURES)


def _failed_for_the_documented_reason(r: Any) -> bool:
    expected_echo = any(ev[0] == "message" for seq in r.expected.values() for ev in seq)
    if not expected_echo:
        return False
    got = [ev for ev in r.received if ev[0] == "message"]
    if all(ev[2] for seq in r.expected.values() for ev in seq if ev[0] == "message"):
        return got == [] and r.remote_close_code == 1003  # binary: closed per contract, nothing echoed
    for ev in got:
        reply = json.loads(ev[1])
        if reply.get("op") != "galbot_response" or reply.get("code") != 400:
            return False
    return True


@pytest.mark.timeout(90)
async def test_contract_handler_fails_only_the_echo_cases(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(_settings())
    results = await _run(core.ws_url)
    assert len(results) == 247
    failed = {r.case_id for r in results if not r.passed}
    expected = {r.case_id for r in results if _allowlisted(r.case_id)}
    assert failed == expected, {"new failures": sorted(failed - expected), "now passing": sorted(expected - failed)}
    wrong_reason = [r.case_id for r in results if not r.passed and not _failed_for_the_documented_reason(r)]
    assert wrong_reason == []
    await asyncio.wait_for(core.app.gateway.empty.wait(), 10)
    # The core is unharmed: a device still logs in and reports.
    dev = await core.device("AB-1")
    assert (await dev.request("/api/device/status", {"battery": 50}))["code"] == 0
