"""Bench statistics (pure), wire equivalence, and a short run against the fake broker."""

from __future__ import annotations

import json
import random
import time

import pytest

from tests.unit.test_client_fake import DROP, FakeBroker
from zkv.client.cli import main
from zkv.ops.bench import (
    BenchResult,
    RequestCodec,
    percentile,
    run_bench,
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


def test_run_bench_against_fake_broker_is_bounded() -> None:
    ticks: list[tuple[float, int, int]] = []
    with FakeBroker() as b:
        start = time.monotonic()
        r = run_bench(b.endpoint, concurrency=16, duration_s=1.2, warmup_s=0.2, keys=50,
                      value_size=10, read_ratio=0.5, seed=3,
                      progress=lambda *a: ticks.append(a))
        assert time.monotonic() - start < 4
    assert isinstance(r, BenchResult)
    assert r.ops > 100 and r.ops_s > 0 and not r.errors
    assert r.latency_ms["all"]["count"] == r.ops
    assert r.latency_ms["get"]["count"] + r.latency_ms["put"]["count"] == r.ops
    assert ticks and ticks[0][1] >= 0
    json.dumps(r.to_dict())
    assert "throughput" in r.format()


def test_error_codes_and_lost_replies_are_counted() -> None:
    def hook(ident: bytes, msg: object, seen: int) -> object:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, ErrorCode.NO_LEADER)
        return None

    with FakeBroker(hook) as b:
        r = run_bench(b.endpoint, concurrency=4, duration_s=0.5, warmup_s=0, read_ratio=0.5,
                      check=False)
    assert r.errors.get("NO_LEADER", 0) > 0
    assert "put" not in r.latency_ms


def test_bench_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker() as b:
        code = main(["--endpoint", b.endpoint, "bench", "--concurrency", "8", "--duration",
                     "0.5", "--warmup", "0", "--keys", "10", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["concurrency"] == 8 and result["ops"] > 0


def test_bench_dead_endpoint_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(lambda i, m, s: DROP) as b:
        start = time.monotonic()
        code = main(["--endpoint", b.endpoint, "bench", "--duration", "30"])
        assert time.monotonic() - start < 5
    assert code == 3
    assert "timeout" in capsys.readouterr().err
