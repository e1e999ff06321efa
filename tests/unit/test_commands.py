"""State-machine commands: the layout docs/internals.md fixes, and garbage refused."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import CasRequest, DeleteRequest, GetRequest, PutRequest
from zkv.storage_node.commands import (
    NOOP_DATA,
    CasCommand,
    DeleteCommand,
    Noop,
    Op,
    PutCommand,
    command_from_request,
    decode_command,
    encode_command,
)

COMMANDS = [
    Noop(),
    PutCommand(b"client", 7, 5, 1_700_000_000_000, b"key", b"value"),
    PutCommand(b"", 0, 0, 0, b"", b""),
    DeleteCommand(b"client", 8, 5, 1_700_000_000_001, b"key"),
    DeleteCommand(b"client", 8, 5, 1_700_000_000_001, b"key", 2**64 - 1),
    CasCommand(b"client", 9, 9, 1_700_000_000_002, b"key", 0, b"new"),
    CasCommand(b"c", 2**63, 2**63, 2**63, b"k" * 1000, 2**64 - 1, b"v" * 100_000),
]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_round_trip(cmd):
    assert decode_command(encode_command(cmd)) == cmd


def test_wire_layout_matches_the_docs():
    assert msgpack.unpackb(encode_command(Noop())) == [0]
    assert NOOP_DATA == b"\x91\x00"  # what ReplicaConfig.noop_data proposes
    put = PutCommand(b"c", 1, 1, 99, b"k", b"v")
    assert msgpack.unpackb(encode_command(put)) == [1, b"c", 1, 1, 99, b"k", b"v"]
    delete = DeleteCommand(b"c", 2, 1, 99, b"k")
    assert msgpack.unpackb(encode_command(delete)) == [2, b"c", 2, 1, 99, b"k"]
    delete_if = DeleteCommand(b"c", 2, 1, 99, b"k", 7)
    assert msgpack.unpackb(encode_command(delete_if)) == [2, b"c", 2, 1, 99, b"k", 7]
    cas = CasCommand(b"c", 3, 1, 99, b"k", 42, b"v")
    assert msgpack.unpackb(encode_command(cas)) == [3, b"c", 3, 1, 99, b"k", 42, b"v"]


def test_commands_from_requests():
    put = PutRequest(b"c", 4, b"k", 3, b"v")
    assert command_from_request(put, 1234) == PutCommand(b"c", 4, 3, 1234, b"k", b"v")
    delete = DeleteRequest(b"c", 5, b"k", 3)
    assert command_from_request(delete, 1) == DeleteCommand(b"c", 5, 3, 1, b"k")
    delete_if = DeleteRequest(b"c", 5, b"k", 3, 12)
    assert command_from_request(delete_if, 1) == DeleteCommand(b"c", 5, 3, 1, b"k", 12)
    cas = CasRequest(b"c", 6, b"k", 3, 17, b"v")
    assert command_from_request(cas, 2) == CasCommand(b"c", 6, 3, 2, b"k", 17, b"v")
    with pytest.raises(TypeError):
        command_from_request(GetRequest(b"c", 1, b"k"), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_command("put")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        [],
        {},
        [Op.RING.value, b"new ring"],  # a ring must be [epoch, [shards], vnodes]
        [99],
        ["1"],
        [True],
        [0, "extra"],
        [1, b"c", 1, 1, 99, b"k"],  # PUT missing its value
        [1, b"c", 1, 1, 99, b"k", b"v", b"extra"],
        [1, "c", 1, 1, 99, b"k", b"v"],  # client id as str
        [1, b"c", -1, 1, 99, b"k", b"v"],  # negative request id
        [1, b"c", 1, 1, 99, b"k", "v"],
        [2, b"c", 1, 1, 1.5, b"k"],
        [3, b"c", 1, 1, 99, b"k", -1, b"v"],
        [3, b"c", 1, 1, 99, b"k", False, b"v"],
    ],
)
def test_malformed_commands_are_refused(value):
    with pytest.raises(RemoteProtocolError):
        decode_command(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", "text", None, b"\x91\x00\x00"])
def test_garbage_is_refused(data):
    with pytest.raises(RemoteProtocolError):
        decode_command(data)  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_any_bytes_raises_only_remote_protocol_error(data):
    try:
        cmd = decode_command(data)
    except RemoteProtocolError:
        return
    assert decode_command(encode_command(cmd)) == cmd


_fields = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1), st.binary(max_size=8),
    st.text(max_size=4), st.booleans(), st.none(), st.floats(allow_nan=False),
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-1, max_value=5), st.lists(_fields, max_size=9))
def test_decoding_any_array_raises_only_remote_protocol_error(op, rest):
    data = msgpack.packb([op, *rest], use_bin_type=True)
    with contextlib.suppress(RemoteProtocolError):
        decode_command(data)
