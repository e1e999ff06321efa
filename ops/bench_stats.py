"""``zkv bench`` results: percentiles, the merge of every generator's raw samples into
one ``BenchResult``, and its table.

Percentiles are nearest-rank over the sorted samples (no interpolation), so every figure
printed is a latency some request really had. Latencies are kept in µs as integers by
the generator and reported in ms.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from zkv.ops.bench_load import OP_GET, OP_NAMES, OP_PUT, Workload
from zkv.protocol.messages import Consistency

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted samples (None when empty)."""
    n = len(sorted_samples)
    if n == 0:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must be within [0, 100]")
    # The epsilon keeps float noise (99.9 / 100 * 1000 = 999.0000000000001) off the rank.
    rank = max(1, math.ceil(q * n / 100.0 - 1e-9))
    return sorted_samples[min(rank, n) - 1]


def summarize(samples_us: Sequence[int], qs: Sequence[float] = PERCENTILES) -> dict[str, Any]:
    """Count, mean, max and the percentiles ``qs`` of latencies in µs, reported in ms."""
    data = sorted(samples_us)
    out: dict[str, Any] = {"count": len(data)}
    for q in qs:
        p = percentile(data, q)
        out[f"p{q:g}"] = None if p is None else p / 1000.0
    out["mean"] = (sum(data) / len(data) / 1000.0) if data else None
    out["max"] = (data[-1] / 1000.0) if data else None
    return out


@dataclass
class BenchResult:
    endpoint: str
    concurrency: int
    processes: int
    duration_s: float
    value_size: int
    read_ratio: float
    consistency: str
    ops: int
    ops_s: float
    #: answered during the warmup, not in ``ops`` or the latencies: what a run cost
    #: from its start to its end is per ``ops + warmup_ops`` (``bench/ab_builds.py``)
    warmup_ops: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"endpoint {self.endpoint}  concurrency {self.concurrency}  processes "
            f"{self.processes}  value {self.value_size} B  reads {self.read_ratio:.0%}  "
            f"consistency {self.consistency}",
            f"throughput: {self.ops_s:,.0f} ops/s ({self.ops:,} ops in {self.duration_s:.1f}s)",
            f"{'latency ms':<12}{'count':>10}" + "".join(f"{'p' + f'{q:g}':>10}" for q in PERCENTILES)
            + f"{'max':>10}",
        ]
        for name, s in self.latency_ms.items():
            cells = "".join(_ms(s.get(f"p{q:g}")) for q in PERCENTILES)
            lines.append(f"{name:<12}{s['count']:>10}{cells}{_ms(s.get('max'))}")
        if self.errors:
            errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
            lines.append(f"errors: {errs}")
        else:
            lines.append("errors: none")
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return f"{'-':>10}" if v is None else f"{v:>10.3f}"


def merge(raws: list[dict[str, Any]], endpoint: str, concurrency: int, processes: int,
          duration_s: float, workload: Workload, level: Consistency) -> BenchResult:
    per_op: list[array[int]] = [array("q"), array("q")]
    errors: dict[str, int] = {}
    ops = 0
    warmup_ops = sum(r["warmup_ops"] for r in raws)
    elapsed = max([r["elapsed_s"] for r in raws] or [duration_s]) or duration_s
    for raw in raws:
        ops += raw["ops"]
        for op, a in enumerate(raw["lat"]):
            per_op[op].extend(a)
        for name, n in raw["errors"].items():
            errors[name] = errors.get(name, 0) + n
    everything = per_op[OP_GET] + per_op[OP_PUT]
    latency = {"all": summarize(everything)}
    for op, name in enumerate(OP_NAMES):
        if per_op[op]:
            latency[name] = summarize(per_op[op])
    return BenchResult(
        endpoint=endpoint, concurrency=concurrency, processes=processes,
        duration_s=round(elapsed, 3), value_size=workload.value_size,
        read_ratio=workload.read_ratio, consistency=level.name.lower(), ops=ops,
        ops_s=ops / elapsed if elapsed > 0 else 0.0, warmup_ops=warmup_ops, errors=errors,
        latency_ms=latency,
    )
