"""The codec: round trips for every message, and only RemoteProtocolError on bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkv.protocol import codec
from zkv.protocol.admin import (
    ADMIN_REPLY_CLASSES,
    ADMIN_REQUEST_CLASSES,
    AdminAppliedReply,
    AdminBegin,
    AdminDrop,
    AdminFence,
    AdminInfo,
    AdminInfoReply,
    AdminListingReply,
    AdminMergeSessions,
    AdminPush,
    AdminPushReply,
    AdminRingSet,
    AdminSessions,
    AdminSessionsReply,
    AdminTrack,
    Applied,
    IncomingInfo,
    MigrateAck,
    MigrateBatch,
    OutgoingInfo,
    Phase,
    PushInfo,
    SourceInfo,
    StreamState,
    Target,
)
from zkv.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    NotLeader,
    RemoteProtocolError,
    Timeout,
    error_for_code,
)
from zkv.protocol.limits import RING_TOKENS_MAX
from zkv.protocol.messages import (
    ALL_MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AdminAddReplica,
    AdminMembers,
    AdminMembersReply,
    AdminRemoveReplica,
    AdminReplaceReplica,
    AdminSnapshotReply,
    AdminSnapshotSave,
    AdminTransferLeader,
    AppendEntries,
    CasRequest,
    Consistency,
    DeleteReply,
    DeleteRequest,
    Entry,
    ErrorReply,
    GetReply,
    GetRequest,
    Heartbeat,
    PutRequest,
    Redirect,
    Role,
    StatusReply,
    VoteRequest,
)
from zkv.protocol.multikey import KeyResult, MultiReply
from zkv.protocol.ring import RingConfig
from zkv.protocol.watch import WatchEvent, WatchReply

OLD, NEW = RingConfig(1, (0, 1), 16), RingConfig(2, (0, 1, 2), 16)
PUSH = PushInfo(2, 2, Phase.CATCHUP, StreamState.SENDING, 1000, 40, 12, 3400, 3, 1, "s2r0", "")
ADMIN_SAMPLES = [
    AdminInfo(b"c", 1, 0),
    AdminBegin(b"c", 2, 2, OLD, NEW),
    AdminTrack(b"c", 3, 0, OLD, NEW),
    AdminPush(b"c", 4, 0, OLD, NEW, 2, Phase.COPY, 0, b"\x01k", (Target("s2r0", "tcp://h:7"),),
              2000, 1 << 21, 500_000),
    AdminFence(b"c", 5, 1, OLD, NEW),
    AdminSessions(b"c", 6, 1, OLD, NEW),
    AdminMergeSessions(b"c", 7, 2, 2, 1, 99, b"\x90"),
    AdminMergeSessions(b"c", 7, 2, 2, 1, 99, b"S" * 20_000),  # the table in its own frame
    AdminRingSet(b"c", 8, 2, NEW),
    AdminDrop(b"c", 9, 0, 2),
    AdminInfoReply(1, 2, OLD, NEW, IncomingInfo(OLD, NEW, (
        SourceInfo(0, Phase.DONE, b"", 5, True, 7), SourceInfo(1, Phase.COPY, b"\x01a", 9, False,
                                                                (1 << 63) - 1))),
        OutgoingInfo(OLD, NEW, 3), 12, True, 40, 41, (PUSH,)),
    AdminInfoReply(1, None, None, None, None, None, 0, False, 0, 0, ()),
    AdminPushReply(4, False, 1, True, PUSH),
    AdminPushReply(4, True, 2, False, None),
    AdminSessionsReply(6, False, 1, 100, b"\x90"),
    AdminAppliedReply(8, Applied(True, epoch=2, sources=(0, 1))),
    AdminAppliedReply(8, Applied(False, "refused")),
    AdminListingReply(9, 2, 500),
    MigrateBatch(1, 0, 2, 2, Phase.DELTA, 7, b"", b"\x01z", True, b"\x90"),
    MigrateAck(1, 2, Applied(True, phase=Phase.DONE, cursor=b"", stale=True), ""),
    MigrateAck(1, 2, Applied(False, not_leader=True), "s2r1"),
    AdminAddReplica(b"c", 10, 0, "s0r3", "tcp://h:9"),
    AdminRemoveReplica(b"c", 11, 0, "s0r1"),
    AdminReplaceReplica(b"c", 12, 0, "s0r1", "s0r3", "tcp://h:9"),
    AdminTransferLeader(b"c", 13, 0, ""),
    AdminMembers(b"c", 14, 0),
    AdminSnapshotSave(b"c", 15, 1),
    AdminMembersReply(14, "s0r0", ("s0r0", "s0r2"), ("s0r3",), {"s0r3": "tcp://h:9"},
                      {"s0r3": "inc"}, {"s0r3": "s0r1"}, True, 7, ""),
    AdminSnapshotReply(15, "s1r0", 40, 2, 3, RingConfig(1, (0, 1), 16), b"\x90" * 3),
]

SAMPLES = [
    GetRequest(b"c" * 16, 1, b"key", Consistency.STALE),
    PutRequest(b"c" * 16, 2, b"key", 1, b"value" * 100),
    CasRequest(b"c", 3, b"k", 2, 7, b""),
    DeleteRequest(b"c", 3, b"k", 2),
    DeleteRequest(b"c", 3, b"k", 2, 41),
    DeleteReply(3, False, 41),
    GetReply(4, True, 9, b"\x00\xff"),
    ErrorReply(5, ErrorCode.NOT_LEADER, "not the leader", "s0r1", 3),
    StatusReply(6, "b0", ({"node_id": "s0r0", "term": 2},), RingConfig(1, (0, 1), 16)),
    StatusReply(6, "b0", (), None),
    Heartbeat("s0r0", 0, Role.LEADER, 3, "s0r0", 3, 10, 9, 9, 5, 42, "tcp://h:1",
              ("s0r0", "s0r1"), RingConfig(1, (0, 1), 256), 100, {"fsync": "always"}),
    Redirect(1, RingConfig(4, (1, 2), 8), ((b"client", b"header"),)),
    *ADMIN_SAMPLES,
    AppendEntries(3, "s0r0", 4, 2, (Entry(3, 5, b"x"), Entry(3, 6, b"")), 4, 11),
    VoteRequest(4, "s0r1", 10, 3, True),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert codec.decode(codec.encode(msg)) == msg  # type: ignore[arg-type]


def test_every_message_type_has_a_sample_or_defaults() -> None:
    codes = [cls.TYPE for cls in ALL_MESSAGE_TYPES]  # type: ignore[attr-defined]
    assert len(codes) == len(set(codes))


def test_large_value_travels_in_its_own_frame() -> None:
    big = b"V" * (codec.INLINE_BLOB_BYTES_MAX + 1)
    frames = codec.encode(PutRequest(b"c", 1, b"k", 1, big))
    assert len(frames) == 2 and frames[1] == big


def test_small_value_rides_in_the_header_and_both_forms_decode() -> None:
    msg = PutRequest(b"c", 1, b"k", 1, b"V" * 1000)
    frames = codec.encode(msg)
    assert len(frames) == 1 and codec.decode(frames) == msg
    head = msgpack.packb([PROTOCOL_VERSION, PutRequest.TYPE, b"c", 1, b"k", 1])
    assert codec.decode([head, b"V" * 1000]) == msg


def test_a_delete_without_expected_version_decodes_as_unconditional() -> None:
    """A sender that predates conditional deletes omits the field: still accepted."""
    old = msgpack.packb([PROTOCOL_VERSION, DeleteRequest.TYPE, b"c", 1, b"k", 1])
    assert codec.decode([old]) == DeleteRequest(b"c", 1, b"k", 1, 0)
    header = codec.encode(DeleteRequest(b"c", 1, b"key", 1, 9))[0]
    assert codec.route_fields(header) == (DeleteRequest.TYPE, b"key", 0)


@settings(max_examples=500, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1) | st.booleans() | st.none() | st.binary(max_size=4))
def test_a_delete_expected_version_decodes_only_as_a_non_negative_int(v: object) -> None:
    header = msgpack.packb([PROTOCOL_VERSION, DeleteRequest.TYPE, b"c", 1, b"k", 1, v])
    try:
        msg = codec.decode([header])
    except RemoteProtocolError:
        assert type(v) is not int or not 0 <= v <= codec.INT_MAX
    else:
        assert isinstance(msg, DeleteRequest) and msg.expected_version == v
        assert type(v) is int and codec.decode(codec.encode(msg)) == msg


def test_route_fields_reads_type_key_and_consistency() -> None:
    header = codec.encode(GetRequest(b"c", 1, b"the-key", Consistency.STALE))[0]
    assert codec.route_fields(header) == (GetRequest.TYPE, b"the-key", Consistency.STALE)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xc1"],
        [msgpack.packb([PROTOCOL_VERSION + 1, 1, b"c", 1, b"k", 0])],
        [msgpack.packb([PROTOCOL_VERSION, 999])],
        [msgpack.packb([PROTOCOL_VERSION, GetRequest.TYPE, "not-bytes", 1, b"k", 0])],
        [msgpack.packb([PROTOCOL_VERSION, GetRequest.TYPE, b"c", 1, b"k", 7])],  # bad enum
        [msgpack.packb([PROTOCOL_VERSION, GetRequest.TYPE, b"c", True, b"k", 0])],  # bool id
        [msgpack.packb([PROTOCOL_VERSION, PutRequest.TYPE, b"c", 1, b"k", 0])],  # no value
        [msgpack.packb([PROTOCOL_VERSION, AppendEntries.TYPE, 1, "a", 0, 0, [[1]], 0, 0])],
        [msgpack.packb({"a": 1})],
    ],
)
def test_malformed_frames_raise_remote_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode(frames)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_decoding_arbitrary_bytes_raises_only_remote_protocol_error(frames: list[bytes]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        codec.decode(frames)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=20)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from([cls.TYPE for cls in ALL_MESSAGE_TYPES]), st.lists(_msgpack_values, max_size=20), st.lists(st.binary(max_size=10), max_size=2))  # type: ignore[attr-defined]
def test_well_formed_msgpack_with_wrong_fields_is_refused_cleanly(
    kind: int, fields: list[object], extra: list[bytes]
) -> None:
    header = msgpack.packb([PROTOCOL_VERSION, kind, *fields])
    try:
        codec.decode([header, *extra])
        codec.route_fields(header)
    except RemoteProtocolError:
        pass


def test_encoding_a_non_message_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        codec.encode(object())  # type: ignore[arg-type]


def test_error_codes_map_to_exceptions() -> None:
    err = error_for_code(ErrorCode.NOT_LEADER, "x", "s0r1")
    assert isinstance(err, NotLeader) and err.leader_hint == "s0r1"
    assert isinstance(error_for_code(ErrorCode.TIMEOUT), Timeout)
    assert type(error_for_code(12345)).__name__ == "InternalError"


@pytest.mark.parametrize("kind", [[1], {"a": 1}, True, 1.5, None])
def test_route_fields_refuses_a_non_int_type(kind: object) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.route_fields(msgpack.packb([PROTOCOL_VERSION, kind, b"c", 1, b"k"]))


@pytest.mark.parametrize("value", [-1, 2**63, 2**64 - 1])
def test_integers_out_of_range_are_refused(value: int) -> None:
    header = msgpack.packb([PROTOCOL_VERSION, 41, 0, value, "b"])  # Campaign(term=value)
    with pytest.raises(RemoteProtocolError):
        codec.decode([header])


def test_every_admin_message_type_has_a_sample() -> None:
    sampled = {type(m) for m in ADMIN_SAMPLES}
    assert set(ADMIN_REQUEST_CLASSES) | set(ADMIN_REPLY_CLASSES) | {MigrateBatch, MigrateAck} <= sampled


def test_admin_requests_carry_their_shard_where_the_broker_routes_from() -> None:
    for msg in ADMIN_SAMPLES:
        if type(msg) in ADMIN_REQUEST_CLASSES:
            assert codec.admin_shard(codec.encode(msg)[0]) == msg.shard_id  # type: ignore[attr-defined]
    with pytest.raises(RemoteProtocolError):  # a data request is not an admin request
        codec.admin_shard(codec.encode(GetRequest(b"c", 1, b"k"))[0])


_ring_wire = st.one_of(
    st.lists(st.integers(-2, 2**64), max_size=4),
    st.tuples(st.integers(-1, 2**63), st.lists(st.integers(-1, 70), max_size=6),
              st.integers(-1, RING_TOKENS_MAX + 1)).map(list),
    _msgpack_values,
)


@settings(max_examples=2000, deadline=None)
@given(_ring_wire)
def test_ring_from_wire_returns_a_valid_ring_or_raises_remote_protocol_error(v: object) -> None:
    try:
        ring = RingConfig.from_wire(v)
    except RemoteProtocolError:
        return
    assert ring.shards and len(set(ring.shards)) == len(ring.shards)
    assert ring.vnodes >= 1 and len(ring.shards) * ring.vnodes <= RING_TOKENS_MAX
    assert RingConfig.from_wire(ring.to_wire()) == ring


@pytest.mark.parametrize("bad", [
    None, [], [1, [0]], [1, [], 8], [1, [0, 0], 8], [1, [0], 0], [-1, [0], 8], [1, [True], 8],
    [1, [0], RING_TOKENS_MAX + 1], [1, [0], 8, 9], [1.0, [0], 8], {"epoch": 1},
])
def test_bad_rings_are_refused(bad: object) -> None:
    with pytest.raises(RemoteProtocolError):
        RingConfig.from_wire(bad)
    with pytest.raises(RemoteProtocolError):  # and a message carrying one
        codec.decode([msgpack.packb([PROTOCOL_VERSION, AdminRingSet.TYPE, b"c", 1, 0, bad])])


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(ADMIN_SAMPLES), st.data())
def test_admin_messages_with_one_field_replaced_decode_or_are_refused_cleanly(
    msg: object, data: st.DataObject
) -> None:
    """Start from a valid admin message and break one field of its header (nested
    records and rings included): decode returns a message or raises only
    RemoteProtocolError."""
    frames = codec.encode(msg)  # type: ignore[arg-type]
    header = msgpack.unpackb(frames[0], raw=False)
    i = data.draw(st.integers(2, len(header) - 1))
    field = header[i]
    if isinstance(field, list) and field and data.draw(st.booleans()):
        j = data.draw(st.integers(0, len(field) - 1))
        field[j] = data.draw(_msgpack_values)
    else:
        header[i] = data.draw(_msgpack_values)
    try:
        out = codec.decode([msgpack.packb(header), *frames[1:]])
    except RemoteProtocolError:
        return
    assert type(out) is type(msg)


def test_trailing_default_fields_are_left_out_for_older_peers() -> None:
    """A rolling upgrade: the previous release knows AppendReply with 5 fields and
    VoteRequest with 5; new fields at their defaults must not reach it."""
    import msgpack

    from zkv.protocol.messages import AppendReply, VoteRequest

    plain = codec.encode(AppendReply(3, "a", True, 10, 0))
    assert len(msgpack.unpackb(plain[0])) == 2 + 5
    assert codec.decode(plain) == AppendReply(3, "a", True, 10, 0)
    waiting = AppendReply(3, "a", True, 10, 0, False, "inc")
    assert codec.decode(codec.encode(waiting)) == waiting
    assert len(msgpack.unpackb(codec.encode(VoteRequest(2, "b", 5, 1))[0])) == 2 + 4
    transfer = VoteRequest(2, "b", 5, 1, False, True)
    assert codec.decode(codec.encode(transfer)) == transfer


# ---------------------------------------------------------------- records (fast path)

WATCH_REPLY = WatchReply(7, 0, tuple(
    WatchEvent(10 + i, i % 3, b"users/%06d" % i, b"v" * (i % 50), i + 1) for i in range(1000)),
    1009)
RECORD_SAMPLES = [
    *(m for m in SAMPLES if type(m) in (AdminPush, AdminInfoReply, AdminPushReply,
                                       AdminAppliedReply, MigrateAck)),
    WATCH_REPLY,
    WatchReply(8, 1, (), 40, compacted=True),
    MultiReply(9, (b"a", b"b"), (KeyResult(0, True, 3, b"x"), KeyResult(5)), None),
]


def _reference_wire(v: object) -> object:
    """How records went on the wire before the fast path: field by field."""
    if isinstance(v, tuple):
        return [_reference_wire(x) for x in v] if v and dataclasses.is_dataclass(v[0]) \
            else v
    if isinstance(v, Entry):
        return [v.term, v.index, v.data]
    if isinstance(v, RingConfig):
        return v.to_wire()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return [_reference_wire(getattr(v, f.name)) for f in dataclasses.fields(v)]
    return v


@pytest.mark.parametrize("msg", RECORD_SAMPLES, ids=lambda m: type(m).__name__)
def test_records_go_as_the_array_of_their_fields_and_round_trip(msg: object) -> None:
    frames = codec.encode(msg)  # type: ignore[arg-type]
    n = len(msgpack.unpackb(frames[0], raw=False)) - 2  # trailing defaults may be left out
    fields = [_reference_wire(getattr(msg, f.name)) for f in dataclasses.fields(msg)]  # type: ignore[arg-type]
    assert frames == [msgpack.packb([PROTOCOL_VERSION, msg.TYPE, *fields[:n]])]  # type: ignore[attr-defined]
    assert codec.decode(frames) == msg


def test_a_watch_reply_costs_little_more_than_packing_its_events() -> None:
    """A leader encodes every event once per watcher: with 100 watchers, a WatchReply
    encoded field by field (4 us per event, ``fields()`` asked of each) held its loop
    long enough to halve the writes of ``bench/watch_fanout.py`` (it was 14x; 2x now).
    Best of 5, against msgpack packing the same events as tuples."""
    pack = msgpack.Packer(use_bin_type=True).pack
    rows = [dataclasses.astuple(e) for e in WATCH_REPLY.events]

    def best(f: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            times.append(time.perf_counter() - t0)
        return min(times)

    ratio = best(lambda: codec.encode(WATCH_REPLY)) / best(lambda: pack(rows))
    assert ratio < 5, f"encoding a WatchReply costs {ratio:.1f}x packing its events"
