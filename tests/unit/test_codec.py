"""The codec: round trips for every message, and only RemoteProtocolError on bad input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkv.protocol import codec
from zkv.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    NotLeader,
    RemoteProtocolError,
    Timeout,
    error_for_code,
)
from zkv.protocol.messages import (
    ALL_MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AppendEntries,
    CasRequest,
    Consistency,
    Entry,
    ErrorReply,
    GetReply,
    GetRequest,
    Heartbeat,
    PutRequest,
    Role,
    StatusReply,
    VoteRequest,
)

SAMPLES = [
    GetRequest(b"c" * 16, 1, b"key", Consistency.STALE),
    PutRequest(b"c" * 16, 2, b"key", 1, b"value" * 100),
    CasRequest(b"c", 3, b"k", 2, 7, b""),
    GetReply(4, True, 9, b"\x00\xff"),
    ErrorReply(5, ErrorCode.NOT_LEADER, "not the leader", "s0r1", 3),
    StatusReply(6, "b0", ({"node_id": "s0r0", "term": 2},), {"epoch": 1, "shards": [0, 1]}),
    Heartbeat("s0r0", 0, Role.LEADER, 3, "s0r0", 3, 10, 9, 9, 5, 42, "tcp://h:1",
              ("s0r0", "s0r1"), 1, (0, 1), 256, 100, {"fsync": "always"}),
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
