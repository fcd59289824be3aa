"""The lock-free loop metrics expose exactly what prometheus_client's own would, for the same observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from core.metrics import LoopCounter, LoopHistogram, Metrics

BUCKETS = (0.0005, 0.001, 0.01, 0.1, 1.0, 10.0)


def samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without comments and without prometheus_client's _created series."""
    lines = generate_latest(registry).decode().splitlines()
    return sorted(ln for ln in lines if ln and not ln.startswith("#") and "_created" not in ln)


def test_histogram_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LoopHistogram("lat_seconds", "latency", ["service"], BUCKETS, registry=ours)
    b = Histogram("lat_seconds", "latency", ["service"], buckets=BUCKETS, registry=theirs)
    # Values on a bound go in that bucket (le = "less or equal"), above the last one in +Inf only.
    values = [0.0, 0.0005, 0.00051, 0.001, 0.05, 1.0, 9.99, 10.0, 11.0, 250.0]
    for service in ("/api/a", "/api/b"):
        for v in values:
            a.labels(service).observe(v)
            b.labels(service).observe(v)
    a.labels("/api/a").observe(0.002)
    b.labels("/api/a").observe(0.002)
    assert samples(ours) == samples(theirs)
    assert 'lat_seconds_bucket{le="0.0005",service="/api/a"} 2.0' in samples(ours)
    assert 'lat_seconds_count{service="/api/b"} 10.0' in samples(ours)


def test_counter_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LoopCounter("requests_total", "requests", ["service", "code"], registry=ours)
    b = Counter("requests_total", "requests", ["service", "code"], registry=theirs)
    for service, code, n in [("/x", "0", 3), ("/x", "400", 1), ("/y", "0", 2)]:
        for _ in range(n):
            a.labels(service, code).inc()
            b.labels(service, code).inc()
    a.labels("/y", "0").inc(5)
    b.labels("/y", "0").inc(5)
    assert samples(ours) == samples(theirs)


def test_the_core_exports_them_under_their_names() -> None:
    m = Metrics()
    m.requests.labels("/api/device/heartbeat", "0").inc()
    m.handler_latency.labels("/api/device/heartbeat").observe(0.0002)
    text = m.render().decode()
    assert 'requests_total{code="0",service="/api/device/heartbeat"} 1.0' in text
    assert 'handler_latency_seconds_bucket{le="0.0005",service="/api/device/heartbeat"} 1.0' in text
    assert "# TYPE handler_latency_seconds histogram" in text
