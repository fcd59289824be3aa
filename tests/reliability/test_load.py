"""Load and slow consumers: a rate-limit flood beside a calm client, a 200 x 500 fan-out with a bounded
number of tasks, and memory bounded while a client stops reading. Loopback only, sized for a shared
2-core machine; the timing bounds are generous liveness checks."""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from conftest import Core, make_settings
from fleetkit import FLEET_SECRET, RawSocket, _fresh_timestamp, client_frame, removed
from relkit import FrameReader

from core.auth import device_token
from core.broker import Target


def masked_text(payload: bytes) -> bytes:
    """One masked client text frame."""
    return client_frame(0x1, payload)


async def raw_device(core: Core, sn: str) -> tuple[RawSocket, FrameReader]:
    """A logged-in device on a bare socket, read in bulk."""
    raw = await RawSocket.connect(core.port)
    ts = _fresh_timestamp(sn)
    raw.send_json({"service": "/api/user/login", "request_id": "login", "values": {
        "sn": sn, "timestamp": ts, "token": device_token(FLEET_SECRET, sn, ts), "type": "retail"}})
    fr = FrameReader(raw.reader)
    [(op, payload)] = await fr.frames(1, 10)
    assert op == 0x1 and json.loads(payload)["code"] == 0
    return raw, fr


async def median_latency(client: Any, n: int) -> float:
    lat = []
    for _ in range(n):
        start = time.perf_counter()
        assert (await client.request("/api/device/heartbeat"))["code"] == 0
        lat.append(time.perf_counter() - start)
    return statistics.median(lat)


async def test_rate_limit_flood_leaves_a_calm_client_unaffected(core_factory: Callable[..., Any]) -> None:
    # rate_abuse_replies is out of reach so the flood goes on for the whole measurement (4429 itself
    # is proven in tests/integration/test_push_limits.py).
    core = await core_factory(make_settings(limits={"rate_per_s": 50, "rate_burst": 100, "rate_abuse_replies": 10**9}))
    calm = await core.device("CALM-1")
    before = await median_latency(calm, 40)
    flooders = [await raw_device(core, f"FLOOD-{i}") for i in range(4)]
    per = 4000
    frame = masked_text(b'{"service": "/api/device/heartbeat", "request_id": 1}')
    codes: dict[int, int] = {}
    got = [0]

    async def drain(fr: FrameReader) -> None:
        n = 0
        while n < per:
            for _op, payload in await fr.frames(per - n, 20):
                code = json.loads(payload)["code"]
                codes[code] = codes.get(code, 0) + 1
                n += 1
                got[0] += 1

    drains = [asyncio.create_task(drain(fr)) for _, fr in flooders]
    started = time.monotonic()
    for raw, _ in flooders:
        raw.writer.write(frame * per)
    during = await median_latency(calm, 40)
    overlapped = got[0] < 4 * per  # the calm client was measured while the flood was still being served
    await asyncio.wait_for(asyncio.gather(*drains), 60)
    elapsed = time.monotonic() - started
    assert overlapped
    assert codes.get(429, 0) > 2 * per  # the flood was refused...
    # ...beyond each bucket's burst and what refilled while it lasted.
    assert codes.get(0, 0) <= 4 * (100 + 50 * elapsed) + 8, (codes, elapsed)
    assert during <= max(10 * before, 0.05), (before, during)
    assert (await calm.request("/api/device/heartbeat"))["code"] == 0
    for raw, _ in flooders:
        raw.close()


async def test_fan_out_200_clients_500_messages_in_order_with_bounded_tasks(core_factory: Callable[..., Any]) -> None:
    core = await core_factory(make_settings(limits={"rate_per_s": 100000, "rate_burst": 100000}))
    devices: list[tuple[RawSocket, FrameReader]] = []
    for batch in range(4):
        devices += await asyncio.gather(*(raw_device(core, f"FAN-{batch}-{i}") for i in range(50)))
    ops = await core.ops()
    n = 500
    seen: list[list[int]] = [[] for _ in devices]

    async def read(k: int, fr: FrameReader) -> None:
        while len(seen[k]) < n:
            for op, payload in await fr.frames(n, 30):
                assert op == 0x1
                msg = json.loads(payload)
                if msg.get("service") == "seq":
                    seen[k].append(msg["values"]["i"])

    readers = [asyncio.create_task(read(k, fr)) for k, (_, fr) in enumerate(devices)]
    await asyncio.sleep(0)  # let every reader start before the baseline is taken
    baseline = len(asyncio.all_tasks())
    samples: list[int] = []
    sampling = True

    async def sample() -> None:
        while sampling and len(samples) < 100_000:
            samples.append(len(asyncio.all_tasks()))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    for i in range(n):
        r = await ops.request("/admin/push/broadcast", {"service": "seq", "message": {"i": i},
                                                         "target": {"type": "retail"}})
        assert r["code"] == 0 and r["values"]["matched"] == len(devices)
    await asyncio.wait_for(asyncio.gather(*readers), 90)
    sampling = False
    await sampler
    assert len(samples) > 10
    # The sampler itself is one task; the core adds none per message or per receiver.
    assert max(samples) <= baseline + 10, (baseline, max(samples))
    for k, got in enumerate(seen):
        assert got == list(range(n)), (k, got[:10])
    for raw, _ in devices:
        raw.close()


async def test_memory_stays_bounded_while_a_client_stops_reading(core_factory: Callable[..., Any]) -> None:
    queue = 200
    core = await core_factory(make_settings(limits={"outbound_queue": queue, "write_timeout_s": 120}))
    slow = await RawSocket.connect(core.port, rcvbuf=4096)
    ts = _fresh_timestamp("SLOW-M")
    slow.send_json({"service": "/api/user/login", "request_id": 1, "values": {
        "sn": "SLOW-M", "timestamp": ts, "token": device_token(FLEET_SECRET, "SLOW-M", ts), "type": "retail"}})
    op, _ = await slow.read_frame()
    assert op == 0x1
    blob = "x" * 32768
    total = 2000  # 64 MiB if nothing bounded it
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sent = 0
        for i in range(total):
            d = await core.app.deps.push.publish(Target(sns=("SLOW-M",)), "big", {"i": i, "blob": blob})
            sent += 1
            if d.matched == 0:
                break  # cut: no longer a receiver
            await asyncio.sleep(0)  # a scheduling point, so write completions run as they would between requests
        peak = tracemalloc.get_traced_memory()[1] - base
        await removed(core.app.deps.hub, lambda c: c.sn == "SLOW-M", timeout=10)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert sent < total  # it was cut before the end
    assert peak < 2 * queue * 33_000 + 8 * 2**20, peak  # the queue bound, with room for one batch and slack
    assert after < 4 * 2**20, after  # the dropped queue was freed
    assert await slow.close_code() in (4503, 1006)  # 1006: the cut may drop the socket before the close frame
    slow.close()
