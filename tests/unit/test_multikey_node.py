"""Batches and scans at the node core: one log entry per batch write, reads gated like
gets, ownership checked per key before proposing, bounds as typed errors."""

from __future__ import annotations

import pytest

from tests.unit.test_node_core import Shard, make_core, replies, request
from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import MULTI_KEYS_MAX
from zkv.protocol.messages import Consistency, ErrorReply
from zkv.protocol.multikey import (
    KeyResult,
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    MultiReply,
    ScanReply,
    ScanRequest,
)
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.commands import decode_command
from zkv.storage_node.multikey_commands import MultiWrite

pytestmark = pytest.mark.unit

KEYS = (b"a", b"b", b"c")


def test_a_batch_write_is_one_log_entry_applied_on_every_replica() -> None:
    shard = Shard()
    leader = shard.elect("a")
    before = len(shard.logs["a"])
    request(leader, MultiPutRequest(b"c1", 1, 1, KEYS, (b"1", b"2", b"3")))
    shard.settle()
    assert len(shard.logs["a"]) == before + 1
    assert isinstance(decode_command(shard.logs["a"][-1].data), MultiWrite)
    (reply,) = replies(leader)
    index = shard.logs["a"][-1].index
    assert reply == MultiReply(1, KEYS, (KeyResult(0, True, index),) * 3)
    shard.tick(0.2)  # followers learn the commit index
    for node in shard.nodes.values():
        assert node.state.get(b"b") == (b"2", index)
    request(leader, MultiDeleteRequest(b"c1", 2, 2, (b"a", b"zz")))
    shard.settle()
    (reply,) = replies(leader)
    assert isinstance(reply, MultiReply) and [r.found for r in reply.results] == [True, False]


def test_batch_reads_and_scans_are_gated_like_gets() -> None:
    shard = Shard()
    leader = shard.elect("a")
    request(leader, MultiPutRequest(b"c1", 1, 1, KEYS, (b"1", b"2", b"3")))
    shard.settle()
    replies(leader)
    follower = shard.nodes["b"]
    request(follower, MultiGetRequest(b"c1", 2, KEYS))
    request(follower, ScanRequest(b"c1", 3, b"", None, 10))
    assert [r.code for r in replies(follower)] == [ErrorCode.NOT_LEADER] * 2
    shard.tick(0.2)
    request(follower, ScanRequest(b"c1", 4, b"", None, 10, True, Consistency.STALE))
    (page,) = replies(follower)
    assert isinstance(page, ScanReply) and page.keys == KEYS and page.values == ()
    request(leader, MultiGetRequest(b"c1", 5, (b"c", b"x")))
    request(leader, ScanRequest(b"c1", 6, b"", b"a", 1))
    assert replies(leader) == []  # linearizable: after the read index round
    shard.settle()
    got = replies(leader)
    assert got[0] == MultiReply(5, (b"c", b"x"), (
        KeyResult(0, True, got[0].results[0].version, b"3"), KeyResult(0, False, 0)))
    assert isinstance(got[1], ScanReply) and got[1].keys == (b"b",) and got[1].next_after == b"b"


def test_a_batch_with_a_key_of_another_shard_proposes_nothing_and_says_which() -> None:
    ring = RingConfig(1, (0, 1), 16)
    r = Ring(ring)
    ours = [k for k in (b"%d" % i for i in range(100)) if r.shard_for(k) == 0][:2]
    theirs = [k for k in (b"%d" % i for i in range(100)) if r.shard_for(k) == 1][:1]
    shard = Shard(ring=ring)
    leader = shard.elect("a")
    before = len(shard.logs["a"])
    keys = (ours[0], theirs[0], ours[1])
    request(leader, MultiPutRequest(b"c1", 1, 1, keys, (b"", b"", b"")))
    shard.settle()
    assert len(shard.logs["a"]) == before
    (reply,) = replies(leader)
    assert isinstance(reply, MultiReply) and reply.ring == ring
    assert [x.code for x in reply.results] == [ErrorCode.UNAVAILABLE, ErrorCode.WRONG_SHARD,
                                               ErrorCode.UNAVAILABLE]


def test_batch_and_scan_bounds_are_typed_errors() -> None:
    node = make_core("a", key_bytes_max=4, value_bytes_max=2)
    request(node, MultiGetRequest(b"c", 1, tuple(b"%d" % i for i in range(MULTI_KEYS_MAX + 1))))
    request(node, MultiGetRequest(b"c", 2, (b"toolong",)))
    request(node, MultiPutRequest(b"c", 3, 3, (b"k",), (b"vvv",)))
    request(node, MultiPutRequest(b"c", 4, 4, (b"k", b"j"), (b"v",)))
    request(node, ScanRequest(b"c", 5, b"", None, 0))
    request(node, ScanRequest(b"c", 6, b"toolong", None, 5))
    got = replies(node)
    assert all(isinstance(r, ErrorReply) for r in got)
    assert [(r.request_id, r.code) for r in got] == [  # type: ignore[attr-defined]
        (1, ErrorCode.TOO_LARGE), (2, ErrorCode.TOO_LARGE), (3, ErrorCode.TOO_LARGE),
        (4, ErrorCode.BAD_REQUEST), (5, ErrorCode.BAD_REQUEST), (6, ErrorCode.TOO_LARGE)]
