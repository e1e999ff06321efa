"""Bench statistics, wire equivalence and socket spread: pure (runs: tests/process)."""

from __future__ import annotations

import random

import pytest

from zkv.ops.bench import (
    RequestCodec,
    percentile,
    spread,
    summarize,
)
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, GetReply, GetRequest, PutReply, PutRequest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        ([], 50, None),
        ([7], 0, 7),
        ([7], 99.9, 7),
        ([1, 2, 3, 4], 50, 2),
        ([1, 2, 3, 4], 75, 3),
        ([1, 2, 3, 4], 76, 4),
        ([1, 2, 3, 4], 100, 4),
        (list(range(1, 1001)), 99.9, 999),
        (list(range(1, 1001)), 99, 990),
        (list(range(1, 101)), 90, 90),
    ],
)
def test_percentile_nearest_rank(samples: list[int], q: float, expected: int | None) -> None:
    assert percentile(samples, q) == expected


def test_percentile_matches_naive_reference() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = sorted(rng.randrange(10_000) for _ in range(rng.randrange(1, 300)))
        q = rng.choice([50, 90, 99, 99.9, rng.uniform(0, 100)])
        # naive: smallest sample with at least q% of samples <= it
        naive = next(x for x in data if sum(y <= x for y in data) * 100 >= q * len(data) - 1e-9)
        assert percentile(data, q) == naive


def test_percentile_rejects_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summarize_reports_ms() -> None:
    s = summarize([1000, 2000, 3000, 4000])  # µs
    assert s == {"count": 4, "p50": 2.0, "p90": 4.0, "p99": 4.0, "p99.9": 4.0,
                 "mean": 2.5, "max": 4.0}
    assert summarize([])["p50"] is None


def test_request_codec_emits_protocol_codec_bytes() -> None:
    c = RequestCodec()
    cid = b"c" * 16
    assert c.get(cid, 5, b"k", 2) == codec.encode(GetRequest(cid, 5, b"k", 2))
    assert c.put(cid, 9, b"k", 3, b"v" * 100) == codec.encode(
        PutRequest(cid, 9, b"k", 3, b"v" * 100))
    assert c.put(cid, 9, b"k", 3, b"v" * 10_000) == codec.encode(
        PutRequest(cid, 9, b"k", 3, b"v" * 10_000))
    assert c.parse_reply(codec.encode(PutReply(9, 4))) == (9, 0)
    assert c.parse_reply(codec.encode(GetReply(5, True, 1, b"x"))) == (5, 0)
    assert c.parse_reply(codec.encode(ErrorReply(5, ErrorCode.NO_LEADER))) == (5, 4)
    assert c.parse_reply([b"\xc1"]) == (-1, 0)


@pytest.mark.parametrize(
    ("endpoints", "concurrency", "sockets", "expected"),
    [
        (["a"], 64, 0, [("a", 16)] * 4),
        (["a"], 8, 0, [("a", 8)]),
        (["a", "b"], 8, 0, [("a", 4), ("b", 4)]),  # at least one socket per broker
        (["a", "b"], 1, 0, [("a", 1)]),  # but never an empty window
        (["a", "b", "c"], 64, 0, [("a", 16), ("b", 16), ("c", 16), ("a", 16)]),
        (["a", "b"], 7, 3, [("a", 3), ("b", 2), ("a", 2)]),
        (["a", "b"], 10, 1, [("a", 5), ("b", 5)]),
    ],
)
def test_spread_sockets_over_brokers(endpoints: list[str], concurrency: int, sockets: int,
                                     expected: list[tuple[str, int]]) -> None:
    got = spread(endpoints, concurrency, sockets)
    assert got == expected
    assert sum(size for _, size in got) == concurrency


def test_spread_property() -> None:
    rng = random.Random(11)
    for _ in range(300):
        endpoints = [f"e{i}" for i in range(rng.randrange(1, 6))]
        concurrency, sockets = rng.randrange(1, 300), rng.randrange(0, 40)
        got = spread(endpoints, concurrency, sockets)
        sizes = [size for _, size in got]
        assert sum(sizes) == concurrency and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        used = {e for e, _ in got}
        assert used == set(endpoints[:min(len(endpoints), concurrency)])
