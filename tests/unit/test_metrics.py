"""The pure parts of the broker's and nodes' metrics: tallies, the per-batch latency
timer, the election tracker, and their exposition through prometheus_client."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zkv.broker.stats import InflightTimer
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, GetReply, GetRequest, PutReply, PutRequest
from zkv.protocol.metrics import BucketTally, Family, SnapshotCollector, Tally
from zkv.storage_node.stats import NodeStats, RaftTracker

ROOT = Path(__file__).resolve().parents[2]


def exposition(families: list[Family]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    collector = SnapshotCollector()
    registry.register(collector)
    collector.publish(families)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_bucket_tally_matches_a_naive_histogram() -> None:
    bounds = (0.001, 0.01, 0.1, 1.0)
    rng = random.Random(7)
    tally = BucketTally(bounds)
    values = []
    for _ in range(500):
        v, w = rng.choice([0.001, 0.5, 2.0, rng.random()]), rng.randint(1, 4)
        tally.observe(v, w)
        values += [v] * w
    cumulative, total = tally.value()
    assert list(cumulative) == [sum(1 for v in values if v <= b) for b in bounds] + [len(values)]
    assert total == pytest.approx(sum(values))
    assert tally.count == len(values)


def test_exposition_of_counters_gauges_and_histograms() -> None:
    t = Tally()
    t.add(("get", "ok"), 3)
    t.add(("get", "ok"))
    h = BucketTally((0.5, 1.0))
    h.observe(0.5)
    h.observe(3.0, 2)
    got = exposition([
        t.family("x_requests", "r", ("op", "result")),
        Family("x_term", "gauge", "t", (), (((), 4.0),)),
        h.family("x_seconds", "s"),
    ])
    assert got[("x_requests_total", (("op", "get"), ("result", "ok")))] == 4
    assert got[("x_term", ())] == 4
    assert got[("x_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("x_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("x_seconds_count", ())] == 3
    assert got[("x_seconds_sum", ())] == pytest.approx(6.5)


def test_timer_sum_is_exact_whatever_the_reply_grouping() -> None:
    timer = InflightTimer()
    timer.sent(b"n1", 3, now=10.0)
    timer.sent(b"n1", 2, now=10.5)
    timer.sent(b"n2", 1, now=10.2)
    assert timer.in_flight == 6
    timer.answered(b"n1", 1, now=11.0)  # one reply, then a batch of four
    timer.answered(b"n1", 4, now=12.0)
    timer.answered(b"n2", 1, now=10.4)
    assert timer.in_flight == 0
    assert timer.latency.count == 6
    assert timer.latency.sum == pytest.approx(1.0 + 2 * 2.0 + 2 * 1.5 + 0.2)


def test_timer_ignores_unknown_replies_and_redirects_are_not_observed() -> None:
    timer = InflightTimer()
    timer.answered(b"ghost", 5, now=1.0)
    timer.sent(b"n", 4, now=1.0)
    timer.answered(b"n", 4, now=2.0, observe=False)
    timer.answered(b"n", 1, now=3.0)  # more replies than known forwards
    assert timer.in_flight == 0 and timer.latency.count == 0


def test_timer_expires_lost_forwards_and_stays_bounded() -> None:
    timer = InflightTimer(entries_max=3)
    for i in range(5):
        timer.sent(b"n", 2, now=float(i))
    assert timer.lost == 4 and timer.in_flight == 6  # two oldest entries pushed out
    timer.expire(now=33.5, max_age_s=30.0)  # the entries sent at 2 and 3 are lost
    assert timer.lost == 8 and timer.in_flight == 2
    timer.answered(b"n", 2, now=34.0)
    assert timer.latency.sum == pytest.approx(2 * 30.0)
    timer.expire(now=100.0)
    assert timer.in_flight == 0


@pytest.mark.parametrize(("seen", "elections", "changes", "became"), [
    ([(1, "a")], 0, 0, 0),
    ([(1, ""), (1, "a")], 0, 1, 0),
    ([(1, "a"), (2, ""), (2, "b")], 1, 1, 0),
    ([(1, "a"), (4, "me")], 3, 1, 1),
    ([(1, "a"), (1, "a"), (2, "a")], 1, 0, 0),
])  # fmt: skip
def test_raft_tracker(seen: list[tuple[int, str]], elections: int, changes: int,
                      became: int) -> None:
    tracker = RaftTracker()
    for term, leader in seen:
        tracker.observe(term, leader, "me")
    assert (tracker.elections, tracker.leader_changes, tracker.became_leader) == (
        elections, changes, became)


def test_node_replies_by_op_and_result() -> None:
    stats = NodeStats()
    stats.op = PutRequest
    stats.reply(PutReply(1, 1))
    stats.reply(ErrorReply(2, ErrorCode.NOT_LEADER, "x"))
    stats.op = GetRequest
    stats.reply(GetReply(3, False, 0, b""))
    stats.reply(ErrorReply(4, 99, "from the future"))
    stats.op = None
    stats.reply(ErrorReply(5, ErrorCode.NO_LEADER, "step-down"))
    assert stats.requests().counts == {
        ("put", "ok"): 1, ("put", "not_leader"): 1, ("get", "ok"): 1,
        ("get", "error_99"): 1, ("other", "no_leader"): 1,
    }  # fmt: skip


@pytest.mark.parametrize("path", ["protocol/metrics.py", "broker/stats.py", "storage_node/stats.py"])
def test_tallies_read_no_clock_and_open_no_socket(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}
    assert not imported & {"time", "zmq", "socket", "threading", "random", "asyncio"}
