"""Prometheus metrics of one core process; the registry is injected, never global."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric the core exports, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The metrics touched on every request or push are plain numbers on the event loop's thread,
        # read at scrape time (LoopCounter, LoopHistogram): prometheus_client takes a lock per inc()
        # and per observe(), which was a tenth of a heartbeat request's CPU.
        self.push_success = LoopCounter(
            "push_success_total", "Frames queued to a connection, by push service", ["service"], registry=r
        )
        self.push_failure = Counter(
            "push_failure_total",
            "Frames that could not be queued or sent, by push service and error type",
            ["service", "error_type"],
            registry=r,
        )
        self.push_latency = LoopHistogram(
            "push_latency_seconds",
            "Time to encode and enqueue one push to all its targets",
            ["service"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge("connections", "Open WebSocket connections by kind", ["kind"], registry=r)
        self.connections_opened = Counter("connections_opened_total", "WebSocket handshakes accepted", registry=r)
        self.closes = Counter("connection_closes_total", "WebSocket connections closed, by close code", ["code"],
                              registry=r)
        # Per-frame counters are plain integers read at scrape time: a prometheus Counter takes a
        # lock on every inc(), which at one or two per frame was a visible share of a fan-out.
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        r.register(_FrameCounters(self))
        self.requests = LoopCounter("requests_total", "Requests handled, by service and reply code",
                                    ["service", "code"], registry=r)
        self.handler_latency = LoopHistogram("handler_latency_seconds", "Time from decode to reply, by service",
                                             ["service"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_overflows = Counter("queue_overflows_total",
                                       "Connections cut because their outbound queue overflowed", registry=r)
        self.rate_limited = Counter("rate_limited_total", "Requests answered 429", registry=r)
        self.logins = Counter("logins_total", "Login attempts by kind and outcome", ["kind", "outcome"], registry=r)
        self.store_errors = Counter("store_errors_total", "Store operations that failed", ["op"], registry=r)
        self.status_reports = Counter("status_reports_total", "Status snapshots stored", registry=r)
        self.commands = Counter("commands_total", "Command state transitions", ["state"], registry=r)
        self.http_requests = Counter("http_requests_total", "HTTP API requests", ["method", "route", "status"],
                                     registry=r)
        self.broker_degraded = Gauge("broker_degraded", "1 while the broker cannot reach other nodes", registry=r)
        self.broker_dropped = Counter("broker_publish_failures_total",
                                      "Cross-node pushes that could not be published", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _FrameCounters(Collector):
    """Exposes the plain per-frame counters of a Metrics as Prometheus counters."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The three counters, as they are now."""
        m = self._m
        yield CounterMetricFamily("frames_in", "Text frames received", value=m.frames_in)
        yield CounterMetricFamily("frames_out", "Frames written to sockets", value=m.frames_out)
        yield CounterMetricFamily("bytes_out", "Bytes written to WebSocket sockets", value=m.bytes_out)


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        """Add to the count."""
        self.value += amount


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation in the first bucket whose bound is >= value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopCounter(Collector):
    """A labelled counter without locks, for the event loop's thread only; `labels()` as prometheus_client's."""

    def __init__(self, name: str, doc: str, labelnames: list[str], registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labelnames = name, doc, labelnames
        self._kids: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        """The child for these label values."""
        kid = self._kids.get(values)
        if kid is None:
            kid = self._kids[values] = _Count()
        return kid

    def collect(self) -> Iterator[Metric]:
        """One counter family with a sample per child."""
        fam = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, kid in list(self._kids.items()):
            fam.add_metric(list(values), kid.value)
        yield fam


class LoopHistogram(Collector):
    """A labelled histogram without locks, for the event loop's thread only; `labels()` as prometheus_client's."""

    def __init__(
        self, name: str, doc: str, labelnames: list[str], buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self._name, self._doc, self._labelnames = name, doc, labelnames
        self._bounds = sorted(buckets)
        self._kids: dict[tuple[str, ...], _Buckets] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Buckets:
        """The child for these label values."""
        kid = self._kids.get(values)
        if kid is None:
            kid = self._kids[values] = _Buckets(self._bounds)
        return kid

    def collect(self) -> Iterator[Metric]:
        """One histogram family: cumulative buckets, sum and count per child."""
        fam = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        les = [*(_go_float(b) for b in self._bounds), "+Inf"]
        for values, kid in list(self._kids.items()):
            total = 0
            cumulative = []
            for le, n in zip(les, kid.counts, strict=True):
                total += n
                cumulative.append((le, total))
            fam.add_metric(list(values), cumulative, kid.sum)
        yield fam


def _go_float(v: float) -> str:
    # The bucket bound as prometheus_client writes it ("0.0005", "1.0", "10.0").
    return repr(float(v))
