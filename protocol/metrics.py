"""Prometheus metrics shared by the broker and the storage nodes: tallies and exposition.

Theory of operation (the gateway's ``gateway/metrics.py`` does the same per request):

- Counting stays in the event loop's thread and in plain Python ints: a ``Tally`` is a
  dict of cumulative counts per label tuple, a ``BucketTally`` a list of counts per
  histogram bucket. The loop adds to them per batch (a forwarded ``RequestBatch``, a
  group commit, a ``ReplyBatch``), or per reply where that is one dict update next to a
  msgpack encode. prometheus_client's own ``inc``/``observe`` take a lock and walk the
  buckets on every call, which measured 3-4x the cost of a tally.
- Once per heartbeat the loop builds a list of ``Family`` values (immutable tuples of
  samples, counters cumulative) and hands it to ``SnapshotCollector.publish``: one
  reference assignment, atomic under the GIL, so the loop never takes a lock and the
  scrape thread never sees a half-built snapshot. ``/metrics`` therefore lags the loop
  by at most one heartbeat interval.
- ``serve`` runs prometheus_client's HTTP server in its own daemon thread on a private
  registry holding only the collector; a scrape costs the loop nothing.

Pure except ``serve``: no clock, no sockets in the tallies, so they are unit-tested.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

#: Request latency buckets (seconds): the same as the gateway's, so dashboards line up.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                     2.0, 5.0, 10.0)
#: fsync latency buckets (seconds): an SSD fsync is 0.1-2 ms, a loaded disk 10-100 ms.
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                   0.25, 0.5, 1.0)
#: Batch size buckets (entries per group commit, requests per forwarded batch).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Labels = tuple[str, ...]
#: a histogram sample: (cumulative count per bucket, the last being +Inf; sum)
HistogramValue = tuple[tuple[float, ...], float]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as published by the loop: ``kind`` is counter, gauge or
    histogram; ``samples`` pairs label values with a float (a ``HistogramValue`` for a
    histogram, whose ``bounds`` name the finite buckets)."""

    name: str
    kind: str
    help: str
    label_names: Labels = ()
    samples: tuple[tuple[Labels, Any], ...] = ()
    bounds: tuple[float, ...] = ()


def gauge(name: str, help_text: str, value: float) -> Family:
    return Family(name, "gauge", help_text, (), (((), float(value)),))


def counter(name: str, help_text: str, value: float) -> Family:
    return Family(name, "counter", help_text, (), (((), float(value)),))


class Tally:
    """Cumulative counts per label tuple, in plain ints (never reset: counters)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[Labels, int] = {}

    def add(self, labels: Labels, n: int = 1) -> None:
        counts = self.counts
        counts[labels] = counts.get(labels, 0) + n

    def family(self, name: str, help_text: str, label_names: Labels, kind: str = "counter") -> Family:
        return Family(name, kind, help_text, label_names,
                      tuple((k, float(v)) for k, v in sorted(self.counts.items())))


class BucketTally:
    """A histogram in plain numbers: ``observe`` is one bisect and two adds; ``weight``
    records ``n`` equal observations at once (a batch whose items share a latency)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight

    @property
    def count(self) -> int:
        return sum(self.counts)

    def value(self) -> HistogramValue:
        cumulative: list[float] = []
        total = 0
        for c in self.counts:
            total += c
            cumulative.append(float(total))
        return tuple(cumulative), self.sum

    def family(self, name: str, help_text: str) -> Family:
        return Family(name, "histogram", help_text, (), (((), self.value()),), self.bounds)


def histogram_family(name: str, help_text: str, label_names: Labels,
                     tallies: dict[Labels, BucketTally]) -> Family:
    """One histogram family from a tally per label tuple (all with the same bounds)."""
    bounds = next(iter(tallies.values())).bounds if tallies else ()
    return Family(name, "histogram", help_text, label_names,
                  tuple((k, t.value()) for k, t in sorted(tallies.items())), bounds)


def _bound_text(b: float) -> str:
    return repr(float(b)) if b != int(b) else f"{b:.1f}"


def to_metric(f: Family) -> Metric:
    """A published ``Family`` as prometheus_client's metric family."""
    labels = list(f.label_names)
    metric: Any
    if f.kind == "counter":
        metric = CounterMetricFamily(f.name, f.help, labels=labels)
        for values, v in f.samples:
            metric.add_metric(list(values), v)
    elif f.kind == "gauge":
        metric = GaugeMetricFamily(f.name, f.help, labels=labels)
        for values, v in f.samples:
            metric.add_metric(list(values), v)
    elif f.kind == "histogram":
        metric = HistogramMetricFamily(f.name, f.help, labels=labels)
        les = [*map(_bound_text, f.bounds), "+Inf"]
        for values, (cumulative, total) in f.samples:
            metric.add_metric(list(values), list(zip(les, cumulative, strict=True)), total)
    else:
        raise ValueError(f"unknown metric kind {f.kind!r}")
    return metric  # type: ignore[no-any-return]


class SnapshotCollector(Collector):
    """A prometheus_client collector over the last snapshot the loop published."""

    def __init__(self) -> None:
        self._families: tuple[Family, ...] = ()

    def publish(self, families: Iterable[Family]) -> None:
        """Called by the loop once per heartbeat: one reference swap, no lock."""
        self._families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        for f in self._families:
            yield to_metric(f)


def serve(port: int, host: str = "127.0.0.1") -> tuple[SnapshotCollector, int]:
    """Start ``/metrics`` on ``host:port`` (0: the OS picks) in a daemon thread; returns
    the collector to publish to and the port bound."""
    registry = CollectorRegistry(auto_describe=False)
    collector = SnapshotCollector()
    registry.register(collector)
    server, _thread = start_http_server(port, host, registry)
    return collector, int(server.server_port)


def serve_metrics(host: str, port: int, name: str) -> SnapshotCollector | None:
    """``serve`` for an entry point: logs where ``/metrics`` is, or why it is not (a
    taken port must not stop a broker or node from serving data)."""
    try:
        collector, bound = serve(port, host)
    except (OSError, OverflowError) as exc:  # taken, not allowed, or not a port at all
        logger.error("{}: cannot serve metrics on {}:{}: {}", name, host, port, exc)
        return None
    logger.info("{} metrics on http://{}:{}/metrics", name, host, bound)
    return collector
