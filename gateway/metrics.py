"""The gateway's own Prometheus metrics, and the short history the live page draws.

Theory of operation:

- A raw ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which costs a task per
  request) counts every HTTP request once, when its response starts (the /kv requests
  that ``protocol.KVHttpProtocol`` answers itself are counted there, with ``begin`` and
  ``end_kv``, into the same tallies): by ``route`` (kv,
  health, ready, ui, metrics, docs, other), ``op`` (get, put, delete for /kv; the route
  otherwise) and ``code`` (the HTTP status). Key-value requests also feed a latency
  histogram per op; every request moves the in-flight gauge.
- Counting per batch, as the rest of zkv does: a request only adds to plain Python ints
  (a dict entry per (route, op, code), a bisect into the latency buckets, the in-flight
  int); ``flush`` moves the sums into prometheus_client once a second (the history
  sampler) and before every scrape. prometheus_client's own ``inc``/``observe`` take a
  lock and walk the buckets on every call, which measured 3-4x the cost of the tally.
- ``--workers N`` > 1 runs prometheus_client in multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``, set by ``zkv gateway`` before the workers start); then
  ``/metrics`` and the history below add up every worker.
- ``History`` samples the kv latency histogram's totals once per second and keeps the
  per-second deltas for ``HISTORY_S`` seconds: requests/s and p50/p99 latency estimated
  from the bucket counts (the usual Prometheus ``histogram_quantile`` interpolation).
  Whichever worker answers ``/ui/data`` sees the whole gateway.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HISTORY_S = 300
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                     2.0, 5.0, 10.0)
_KV_OPS = {"GET": "get", "PUT": "put", "DELETE": "delete"}
_ROUTES = {"health", "ready", "ui", "metrics", "docs", "redoc", "openapi.json"}


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class GatewayMetrics:
    """The gateway's metric objects on one registry (a private one by default, so two
    apps in one process, as in tests, do not collide), fed per batch (see the module
    doc): ``count`` only adds to plain ints; ``flush`` moves the sums into
    prometheus_client, once a second and before every scrape."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter("zkv_gateway_requests", "HTTP requests answered",
                                ["route", "op", "code"], registry=reg)
        self.latency = Histogram("zkv_gateway_request_duration_seconds",
                                 "Latency of /kv requests, first byte of the request to "
                                 "start of the response", ["op"], buckets=LATENCY_BUCKETS_S,
                                 registry=reg)
        self.in_flight_gauge = Gauge("zkv_gateway_requests_in_flight",
                                     "HTTP requests being served", registry=reg,
                                     multiprocess_mode="livesum")
        self.in_flight = 0
        self._bounds = [*LATENCY_BUCKETS_S, float("inf")]
        self._counts: dict[tuple[str, str, int], int] = {}
        #: op -> [sum of seconds, count per bucket...] since the last flush
        self._latency: dict[str, list[float]] = {}

    def count(self, route: str, op: str, code: int, elapsed_s: float | None) -> None:
        key = (route, op, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        if elapsed_s is not None:
            tally = self._latency.get(op)
            if tally is None:
                tally = self._latency[op] = [0.0] * (len(self._bounds) + 1)
            tally[0] += elapsed_s
            tally[1 + bisect_left(self._bounds, elapsed_s)] += 1

    def begin(self) -> float:
        """A /kv request starts (``protocol.KVCycle``): in flight; its start for ``end_kv``."""
        self.in_flight += 1
        return time.perf_counter()

    def end_kv(self, op: str, code: int, started: float) -> None:
        self.in_flight -= 1
        self.count("kv", op, code, time.perf_counter() - started)

    def flush(self) -> None:
        """Move the tallies into prometheus_client (the only place that touches it)."""
        counts, self._counts = self._counts, {}
        for (route, op, code), n in counts.items():
            self.requests.labels(route, op, str(code)).inc(n)
        latency, self._latency = self._latency, {}
        for op, tally in latency.items():
            child = self.latency.labels(op)
            child._sum.inc(tally[0])  # bulk observe: prometheus_client has no public one
            for i, hits in enumerate(tally[1:]):
                if hits:
                    child._buckets[i].inc(hits)
        self.in_flight_gauge.set(self.in_flight)

    def exposition(self) -> tuple[bytes, str]:
        """The text for ``/metrics``: every worker's when in multiprocess mode."""
        self.flush()
        if multiprocess():
            reg = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
            return generate_latest(reg), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def latency_totals(self) -> tuple[float, list[tuple[float, float]]]:
        """(count, [(upper bound, cumulative count)]) of the kv latency histogram, summed
        over ops (and workers)."""
        if multiprocess():
            reg = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
            families = reg.collect()
        else:
            families = self.latency.collect()
        buckets: dict[float, float] = {}
        count = 0.0
        for family in families:
            if family.name != "zkv_gateway_request_duration_seconds":
                continue
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif s.name.endswith("_count"):
                    count += s.value
        return count, sorted(buckets.items())


class MetricsMiddleware:
    """Raw ASGI middleware counting every HTTP request (see the module doc)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/kv/"):
            route, op = "kv", _KV_OPS.get(scope["method"], "other")
        elif path == "/kv":  # GET /kv?prefix=: a scan page (gateway/scan.py)
            route, op = "kv", "scan"
        else:
            first = path[1:].split("/", 1)[0]
            route = first if first in _ROUTES else "other"
            op = route
        metrics = self.metrics
        started = time.perf_counter()
        code = 500
        metrics.in_flight += 1

        async def send_counted(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            metrics.in_flight -= 1
            elapsed = time.perf_counter() - started if route == "kv" else None
            metrics.count(route, op, code, elapsed)


class History:
    """Per-second throughput and latency of /kv requests over the last ``HISTORY_S``."""

    def __init__(self, metrics: GatewayMetrics, length: int = HISTORY_S) -> None:
        self.metrics = metrics
        self.points: deque[dict[str, Any]] = deque(maxlen=length)
        self._last: tuple[float, float, list[tuple[float, float]]] | None = None

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.metrics.flush()
        count, buckets = self.metrics.latency_totals()
        last, self._last = self._last, (now, count, buckets)
        if last is None:
            return
        dt = max(1e-6, now - last[0])
        prev = dict(last[2])
        delta = [(le, c - prev.get(le, 0.0)) for le, c in buckets]
        n = count - last[1]
        self.points.append({"t": round(now, 3), "rps": round(n / dt, 1),
                            "p50_ms": _quantile_ms(0.5, delta, n),
                            "p99_ms": _quantile_ms(0.99, delta, n)})

    def series(self) -> list[dict[str, Any]]:
        return list(self.points)


def _quantile_ms(q: float, buckets: list[tuple[float, float]], total: float) -> float | None:
    """Linear interpolation inside the bucket holding the q-quantile, like Prometheus'
    ``histogram_quantile``; None without requests."""
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return round(lower_bound * 1000, 3)
            span = cumulative - lower_count
            frac = 0.0 if span <= 0 else (rank - lower_count) / span
            return round((lower_bound + (le - lower_bound) * frac) * 1000, 3)
        lower_bound, lower_count = le, cumulative
    return round(lower_bound * 1000, 3)
