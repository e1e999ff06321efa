"""Watch polls at the node core: answered at once, parked until an event, expired
empty, compacted, refused; and the same events from every replica after a failover."""

from __future__ import annotations

import pytest

from tests.unit.test_node_core import Shard, replies, request
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, PutRequest
from zkv.protocol.watch import WatchReply, WatchRequest
from zkv.storage_node.watch_history import PUT
from zkv.storage_node.watch_requests import PARKED_MAX

pytestmark = pytest.mark.unit


def watch(after: int, prefix: bytes = b"p/", wait_ms: int = 1000, shard: int = 0,
          rid: int = 900, limit: int = 100) -> WatchRequest:
    return WatchRequest(b"w", rid, shard, prefix, False, after, limit, wait_ms)


def put(shard: Shard, leader: str, key: bytes, rid: int) -> None:
    request(shard.nodes[leader], PutRequest(b"c", rid, key, rid, b"v%d" % rid), shard.now)
    shard.settle()


def test_poll_answers_at_once_parks_then_answers_on_an_event() -> None:
    s = Shard()
    a = s.elect("a")
    put(s, "a", b"p/1", 1)
    put(s, "a", b"q/1", 2)
    replies(a)
    request(a, watch(0), s.now)
    [r] = replies(a)
    assert isinstance(r, WatchReply) and [(e.kind, e.key) for e in r.events] == [(PUT, b"p/1")]
    after = r.revision
    assert after == a.state.applied_index
    request(a, watch(after, rid=901), s.now)
    assert replies(a) == [] and len(a.parked_watches) == 1
    put(s, "a", b"q/2", 3)  # not matching: still parked
    assert [r for r in replies(a) if isinstance(r, WatchReply)] == []
    put(s, "a", b"p/2", 4)
    [w] = [r for r in replies(a) if isinstance(r, WatchReply)]
    assert w.request_id == 901 and [e.key for e in w.events] == [b"p/2"]
    assert not a.parked_watches


def test_a_parked_poll_ends_empty_with_how_far_it_looked() -> None:
    s = Shard()
    a = s.elect("a")
    request(a, watch(a.state.applied_index, wait_ms=200), s.now)
    put(s, "a", b"q/1", 1)
    replies(a)
    s.tick(0.3)
    [w] = [r for r in replies(a) if isinstance(r, WatchReply)]
    assert w.events == () and w.revision == a.state.applied_index


def test_refusals_and_compaction_and_the_parking_bound() -> None:
    s = Shard()
    a = s.elect("a")
    request(a, watch(0, shard=3), s.now)
    request(a, watch(0, limit=0), s.now)
    codes = [r.code for r in replies(a) if isinstance(r, ErrorReply)]
    assert codes == [ErrorCode.WRONG_SHARD, ErrorCode.BAD_REQUEST]
    a.state.history.reset(5)
    request(a, watch(2), s.now)
    [w] = replies(a)
    assert isinstance(w, WatchReply) and w.compacted and w.revision == 5
    for i in range(PARKED_MAX + 3):
        request(a, watch(5, rid=i + 1), s.now)
    assert len(a.parked_watches) == PARKED_MAX
    assert len([r for r in replies(a) if isinstance(r, WatchReply)]) == 3


def test_every_replica_answers_the_same_events_after_a_failover() -> None:
    s = Shard()
    s.elect("a")
    for i in range(1, 6):
        put(s, "a", b"p/%d" % i, i)
    s.tick(0.2)  # followers learn the commit index and apply
    answers = []
    for _name, node in s.nodes.items():
        replies(node)
        request(node, watch(2, wait_ms=0), s.now)
        [w] = [r for r in replies(node) if isinstance(r, WatchReply)]
        answers.append((w.events, w.revision))
    assert answers[0][0] and all(x == answers[0] for x in answers)
    s.cut.add("a")
    s.tick(1.5)  # the followers stop hearing the leader
    b = s.elect("b")
    put(s, "b", b"p/6", 6)
    replies(b)
    request(b, watch(answers[0][1], wait_ms=0), s.now)
    [w] = replies(b)
    assert isinstance(w, WatchReply) and [e.key for e in w.events] == [b"p/6"]


def test_the_broker_routes_a_poll_by_its_shard_id() -> None:
    from tests.unit.test_broker_router import cluster, error_of, frames

    _, router = cluster()
    assert router.route(frames(watch(0, shard=0)), 0.1) == b"s0r0"
    assert error_of(router.route(frames(watch(0, shard=1, rid=7)), 0.1)) == (
        ErrorCode.NO_LEADER, 7)
