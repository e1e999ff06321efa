"""Router: forward / answer locally / typed error, for a table of inputs."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from zkv.broker.node_table import NodeTable
from zkv.broker.router import Router
from zkv.protocol import codec
from zkv.protocol.admin import AdminInfo
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import PROTOCOL_VERSION as V
from zkv.protocol.messages import (
    CasRequest,
    Consistency,
    DeleteRequest,
    ErrorReply,
    GetRequest,
    Heartbeat,
    PingRequest,
    PongReply,
    PutRequest,
    Role,
    StatusReply,
    StatusRequest,
)
from zkv.protocol.ring import Ring, RingConfig

pytestmark = pytest.mark.unit

CLIENT = b"\x00client"
SHARDS = (0, 1, 2)
VNODES = 32
RING = Ring.of(SHARDS, VNODES)


def key_in(shard: int) -> bytes:
    for i in range(10_000):
        k = b"key-%d" % i
        if RING.shard_for(k) == shard:
            return k
    raise AssertionError("no key found")


K0, K1, K2 = key_in(0), key_in(1), key_in(2)


def hb(node: str, shard: int, role: Role = Role.FOLLOWER, term: int = 1) -> Heartbeat:
    return Heartbeat(
        node_id=node, shard_id=shard, role=role, term=term, leader_id="",
        last_log_term=1, last_index=1, commit_index=1, applied_index=1, key_count=0, pid=1,
        peer_addr="", members=(), ring=RingConfig(7, SHARDS, VNODES),
        heartbeat_ms=100,
    )  # fmt: skip


def cluster() -> tuple[NodeTable, Router]:
    """Shard 0: leader s0r0 + 2 followers; shard 1: followers only; shard 2: unheard."""
    t = NodeTable(1.0)
    t.observe(hb("s0r0", 0, Role.LEADER), 0.0)
    t.observe(hb("s0r1", 0), 0.0)
    t.observe(hb("s0r2", 0), 0.0)
    t.observe(hb("s1r0", 1), 0.0)
    return t, Router(t, "b9", key_bytes_max=64, value_bytes_max=100)


def frames(msg: object) -> list[bytes]:
    return [CLIENT, *codec.encode(msg)]  # type: ignore[arg-type]


def error_of(result: object) -> tuple[int, int]:
    assert isinstance(result, list), result
    reply = codec.decode(result)
    assert isinstance(reply, ErrorReply), reply
    return reply.code, reply.request_id


FORWARD_CASES = [
    pytest.param(GetRequest(b"c", 1, K0), b"s0r0", id="get"),
    pytest.param(GetRequest(b"c", 1, K0, Consistency.LEADER), b"s0r0", id="get-leader"),
    pytest.param(PutRequest(b"c", 2, K0, 1, b"v" * 100), b"s0r0", id="put-at-limit"),
    pytest.param(DeleteRequest(b"c", 3, K0, 1), b"s0r0", id="delete"),
    pytest.param(CasRequest(b"c", 4, K0, 1, 0, b"v"), b"s0r0", id="cas"),
    pytest.param(GetRequest(b"c", 5, b"k" * 64 if RING.shard_for(b"k" * 64) == 0 else K0),
                 b"s0r0", id="key-at-limit"),
]  # fmt: skip


@pytest.mark.parametrize(("msg", "node"), FORWARD_CASES)
def test_forwarded_to_leader(msg: object, node: bytes) -> None:
    _, router = cluster()
    assert router.route(frames(msg), 0.1) == node


ERROR_CASES = [
    pytest.param([CLIENT, *codec.encode(GetRequest(b"c", 11, K1))], ErrorCode.NO_LEADER, 11,
                 id="followers-only"),
    pytest.param([CLIENT, *codec.encode(PutRequest(b"c", 12, K2, 0, b"v"))], ErrorCode.NO_LEADER,
                 12, id="unheard-shard"),
    pytest.param([CLIENT, *codec.encode(GetRequest(b"c", 13, b"k" * 65))], ErrorCode.TOO_LARGE,
                 13, id="key-too-large"),
    pytest.param([CLIENT, msgpack.packb([V, 2, b"c", 14, K0, 0]), b"v" * 101],
                 ErrorCode.TOO_LARGE, 14, id="value-frame-too-large"),
    pytest.param([CLIENT, msgpack.packb([V, 1, b"c", 15, b"k", 0, b"x" * 20_000])],
                 ErrorCode.TOO_LARGE, 15, id="header-too-large"),
    pytest.param([CLIENT, b"\xc1garbage"], ErrorCode.BAD_REQUEST, 0, id="garbage"),
    pytest.param([CLIENT, b""], ErrorCode.BAD_REQUEST, 0, id="empty-header"),
    pytest.param([CLIENT], ErrorCode.BAD_REQUEST, 0, id="no-header"),
    pytest.param([CLIENT, codec.encode(GetRequest(b"c", 16, K0))[0], b"", b""],
                 ErrorCode.BAD_REQUEST, 16, id="four-frames"),
    pytest.param([CLIENT, codec.encode(GetRequest(b"c", 17, K0))[0], b"blob"],
                 ErrorCode.BAD_REQUEST, 17, id="get-with-blob"),
    pytest.param([CLIENT, msgpack.packb([V, 1, b"c", 19])], ErrorCode.BAD_REQUEST, 19,
                 id="get-without-key"),
    pytest.param([CLIENT, msgpack.packb([V, 1, b"c", 20, "str-key"])], ErrorCode.BAD_REQUEST, 20,
                 id="key-wrong-type"),
    pytest.param([CLIENT, msgpack.packb([V + 1, 1, b"c", 21, b"k"])], ErrorCode.BAD_REQUEST, 21,
                 id="wrong-version"),
    pytest.param([CLIENT, msgpack.packb([V, [1, 2], b"c", 22, b"k"])], ErrorCode.BAD_REQUEST,
                 22, id="unhashable-type-field"),
    pytest.param([CLIENT, msgpack.packb([V, {"a": 1}, b"c", 23])], ErrorCode.BAD_REQUEST, 23,
                 id="map-type-field"),
    pytest.param([CLIENT, msgpack.packb([V, 99, b"c", 24])], ErrorCode.BAD_REQUEST, 24,
                 id="unknown-type"),
    pytest.param([CLIENT, *codec.encode(PongReply(25, "x"))], ErrorCode.BAD_REQUEST, 0,
                 id="reply-sent-as-request"),
    pytest.param([CLIENT, *codec.encode(hb("s0r0", 0))], ErrorCode.BAD_REQUEST, 0,
                 id="heartbeat-on-frontend"),
    pytest.param([CLIENT, msgpack.packb([V, 6, b"c", "rid"])], ErrorCode.BAD_REQUEST, 0,
                 id="ping-wrong-field-type"),
    pytest.param([CLIENT, msgpack.packb({"a": 1})], ErrorCode.BAD_REQUEST, 0, id="map-header"),
]  # fmt: skip


@pytest.mark.parametrize(("msg", "code", "rid"), ERROR_CASES)
def test_error_replies(msg: list[bytes], code: ErrorCode, rid: int) -> None:
    _, router = cluster()
    assert error_of(router.route(msg, 0.1)) == (code, rid)


def test_no_ring_means_no_leader() -> None:
    router = Router(NodeTable(1.0), "b")
    assert error_of(router.route(frames(GetRequest(b"c", 3, b"k")), 0.0)) == (
        ErrorCode.NO_LEADER, 3,
    )  # fmt: skip


def test_no_leader_after_leader_expires() -> None:
    table, router = cluster()
    table.observe(hb("s0r1", 0), 0.9)
    assert router.route(frames(GetRequest(b"c", 1, K0)), 0.9) == b"s0r0"
    table.tick(1.0)
    code, _ = error_of(router.route(frames(GetRequest(b"c", 1, K0)), 1.0))
    assert code == ErrorCode.NO_LEADER
    reply = codec.decode(router.route(frames(GetRequest(b"c", 1, K0)), 1.0))  # type: ignore[arg-type]
    assert isinstance(reply, ErrorReply) and reply.epoch == 7


def test_stale_reads_round_robin_over_live_replicas() -> None:
    _, router = cluster()
    req = frames(GetRequest(b"c", 1, K0, Consistency.STALE))
    got = [router.route(req, 0.1) for _ in range(6)]
    assert sorted(set(got)) == [b"s0r0", b"s0r1", b"s0r2"]  # type: ignore[type-var]
    assert got[:3] == got[3:]


def test_stale_read_without_leader_goes_to_a_follower() -> None:
    _, router = cluster()
    assert router.route(frames(GetRequest(b"c", 1, K1, Consistency.STALE)), 0.1) == b"s1r0"


def test_ping_answered_locally() -> None:
    _, router = cluster()
    reply = router.route(frames(PingRequest(b"c", 42)), 0.1)
    assert codec.decode(reply) == PongReply(42, "b9")  # type: ignore[arg-type]


def test_status_answered_locally() -> None:
    _, router = cluster()
    reply = codec.decode(router.route(frames(StatusRequest(b"c", 43)), 0.25))  # type: ignore[arg-type]
    assert isinstance(reply, StatusReply)
    assert reply.request_id == 43 and reply.broker_id == "b9"
    assert [n["node_id"] for n in reply.nodes] == ["s0r0", "s0r1", "s0r2", "s1r0"]
    assert all(n["age_ms"] == 250 and n["live"] for n in reply.nodes)
    assert reply.ring == RingConfig(7, (0, 1, 2), VNODES)


def test_route_never_raises_on_random_input() -> None:
    _, router = cluster()
    rng = random.Random(1234)
    valid = [codec.encode(m)[0] for m in (GetRequest(b"c", 1, K0), PingRequest(b"c", 2),
                                           PutRequest(b"c", 3, K0, 0, b"v"))]  # fmt: skip
    for _ in range(5000):
        n = rng.randint(0, 5)
        msg = [rng.randbytes(rng.randint(0, 40)) for _ in range(n)]
        if n >= 2 and rng.random() < 0.5:
            v = rng.choice(valid)
            msg[1] = v[: rng.randint(0, len(v))]
        result = router.route(msg, 0.1)
        assert result is None or isinstance(result, (bytes, list))
        if isinstance(result, list):
            codec.decode(result)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Router(NodeTable(1.0), "b", key_bytes_max=0)


def test_small_values_travel_inline_and_are_forwarded() -> None:
    """A value up to codec.INLINE_BLOB_BYTES_MAX rides in the header; the node, which
    decodes the request anyway, enforces its exact value limit."""
    _, router = cluster()
    one_frame = frames(PutRequest(b"c", 30, K0, 0, b"v" * 101))
    assert len(one_frame) == 2
    assert router.route(one_frame, 0.1) == b"s0r0"


# --------------------------------------------------------------------------- reroute

# Two rings over the same vnodes: the broker starts on ONE_SHARD (epoch 1); a node that
# already runs TWO_SHARDS (epoch 2) refuses keys it gave to shard 1 and hands them back.
ONE_SHARD = RingConfig(1, (0,), VNODES)
TWO_SHARDS = RingConfig(2, (0, 1), VNODES)
_CANDIDATES = [b"m-%d" % i for i in range(10_000)]
MOVED = next(k for k in _CANDIDATES if Ring(TWO_SHARDS).shard_for(k) == 1)
KEPT = next(k for k in _CANDIDATES if Ring(TWO_SHARDS).shard_for(k) == 0)


def resharding() -> tuple[NodeTable, Router]:
    """Leaders for shards 0 and 1 (followers s1r1, s1r2 too), broker ring at epoch 1."""
    t = NodeTable(1.0)
    t.adopt_ring(ONE_SHARD)
    for node, shard, role in (("s0r0", 0, Role.LEADER), ("s1r0", 1, Role.LEADER),
                              ("s1r1", 1, Role.FOLLOWER), ("s1r2", 1, Role.FOLLOWER)):
        t.observe(dataclasses.replace(hb(node, shard, role), ring=RingConfig(1, (0,), VNODES)), 0.0)
    assert t.ring is not None and t.ring.config == ONE_SHARD
    return t, Router(t, "b9", key_bytes_max=64, value_bytes_max=100)


def item(msg: object) -> tuple[bytes, ...]:
    return (CLIENT, *codec.encode(msg))  # type: ignore[arg-type]


def test_reroute_goes_to_the_new_owner_once_the_ring_is_adopted() -> None:
    table, router = resharding()
    put = item(PutRequest(b"c", 1, MOVED, 0, b"v"))
    assert router.route(list(put), 0.1) == b"s0r0"  # the stale ring sends it to shard 0
    assert table.adopt_ring(TWO_SHARDS)
    assert router.reroute(put, 0, 0.1) == b"s1r0"
    assert router.wrong_shard == 0 and router.rejected == 0


def test_reroute_keeps_the_blob_frame_out_of_the_decision() -> None:
    table, router = resharding()
    table.adopt_ring(TWO_SHARDS)
    big = (CLIENT, codec.encode(PutRequest(b"c", 2, MOVED, 0, b""))[0], b"v" * 100)
    assert router.reroute(big, 0, 0.1) == b"s1r0"


@pytest.mark.parametrize(
    ("adopted", "key", "epoch"),
    [
        pytest.param(False, MOVED, 1, id="broker-ring-not-newer"),
        pytest.param(True, KEPT, 2, id="still-the-refusing-shard-at-new-epoch"),
    ],
)
def test_refusal_by_the_shard_the_ring_names_answers_wrong_shard(
    adopted: bool, key: bytes, epoch: int
) -> None:
    table, router = resharding()
    if adopted:
        table.adopt_ring(TWO_SHARDS)
    result = router.reroute(item(GetRequest(b"c", 7, key)), 0, 0.1)
    reply = codec.decode(result)  # type: ignore[arg-type]
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.request_id, reply.epoch) == (ErrorCode.WRONG_SHARD, 7, epoch)
    assert reply.message == f"key not owned by shard 0 at ring epoch {epoch}"
    assert router.wrong_shard == 1 and router.rejected == 0


def test_reroute_without_a_ring_is_no_leader() -> None:
    router = Router(NodeTable(1.0), "b")
    assert error_of(router.reroute(item(GetRequest(b"c", 3, b"k")), 0, 0.0)) == (
        ErrorCode.NO_LEADER, 3,
    )  # fmt: skip


def test_reroute_to_a_shard_without_leader_is_no_leader() -> None:
    table, router = resharding()
    table.adopt_ring(TWO_SHARDS)
    table.tick(5.0)  # every node expired
    assert error_of(router.reroute(item(DeleteRequest(b"c", 4, MOVED, 0)), 0, 5.0)) == (
        ErrorCode.NO_LEADER, 4,
    )  # fmt: skip


def test_stale_get_rerouted_round_robin_over_the_new_shard() -> None:
    table, router = resharding()
    table.adopt_ring(TWO_SHARDS)
    get = item(GetRequest(b"c", 5, MOVED, Consistency.STALE))
    got = {router.reroute(get, 0, 0.1) for _ in range(6)}
    assert got == {b"s1r0", b"s1r1", b"s1r2"}


def test_stale_get_refused_by_a_replica_of_the_owner_is_not_sent_to_another() -> None:
    """A follower lagging behind the ring must not start a tour of its shard's replicas."""
    table, router = resharding()
    table.adopt_ring(TWO_SHARDS)
    get = item(GetRequest(b"c", 6, MOVED, Consistency.STALE))
    assert error_of(router.reroute(get, 1, 0.1)) == (ErrorCode.WRONG_SHARD, 6)


MALFORMED_ITEMS = [
    pytest.param((CLIENT,), ErrorCode.BAD_REQUEST, 0, id="no-header"),
    pytest.param((CLIENT, b"\xc1junk"), ErrorCode.BAD_REQUEST, 0, id="garbage"),
    pytest.param((CLIENT, msgpack.packb([V, 1, b"c", 8])), ErrorCode.BAD_REQUEST, 8,
                 id="get-without-key"),
    pytest.param((CLIENT, *codec.encode(PingRequest(b"c", 9))), ErrorCode.BAD_REQUEST, 9,
                 id="ping-is-not-redirectable"),
    pytest.param((CLIENT, *codec.encode(AdminInfo(b"c", 10, 0))),
                 ErrorCode.BAD_REQUEST, 10, id="admin-is-not-redirectable"),
    pytest.param((CLIENT, codec.encode(GetRequest(b"c", 11, MOVED))[0], b"blob"),
                 ErrorCode.BAD_REQUEST, 11, id="get-with-blob"),
    pytest.param((CLIENT, codec.encode(GetRequest(b"c", 12, MOVED))[0], b"", b""),
                 ErrorCode.BAD_REQUEST, 12, id="four-frames"),
    pytest.param((CLIENT, *codec.encode(GetRequest(b"c", 13, b"k" * 65))), ErrorCode.TOO_LARGE,
                 13, id="key-too-large"),
    pytest.param((CLIENT, codec.encode(PutRequest(b"c", 14, MOVED, 0, b""))[0], None),
                 ErrorCode.BAD_REQUEST, 14, id="value-not-bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("frames_", "code", "rid"), MALFORMED_ITEMS)
def test_malformed_redirected_items_are_answered(
    frames_: tuple[bytes, ...], code: ErrorCode, rid: int
) -> None:
    table, router = resharding()
    table.adopt_ring(TWO_SHARDS)
    assert error_of(router.reroute(frames_, 0, 0.1)) == (code, rid)
    assert router.rejected == 1 and router.wrong_shard == 0


@pytest.mark.parametrize(
    "frames_", [(), (b"",), (b"", codec.encode(GetRequest(b"c", 1, MOVED))[0]),
                ("str-ident", b"h"), (CLIENT, "str-header"), (CLIENT, None)],  # type: ignore[list-item]
)  # fmt: skip
def test_redirected_items_nobody_can_be_answered_for_are_dropped(
    frames_: tuple[bytes, ...],
) -> None:
    _, router = resharding()
    assert router.reroute(frames_, 0, 0.1) is None
    assert router.rejected == 1 and router.last_rejection


def test_reroute_never_raises_on_random_input() -> None:
    table, router = resharding()
    table.adopt_ring(TWO_SHARDS)
    rng = random.Random(4321)
    valid = [codec.encode(m)[0] for m in (GetRequest(b"c", 1, MOVED),
                                           PutRequest(b"c", 3, KEPT, 0, b"v"))]  # fmt: skip
    for _ in range(3000):
        n = rng.randint(0, 4)
        frames_ = [rng.randbytes(rng.randint(0, 40)) for _ in range(n)]
        if n >= 2 and rng.random() < 0.5:
            v = rng.choice(valid)
            frames_[1] = v[: rng.randint(0, len(v))]
        result = router.reroute(tuple(frames_), rng.randrange(3), 0.1)
        assert result is None or isinstance(result, (bytes, list))
        if isinstance(result, list):
            codec.decode(result)
