"""Wire version 1 next to version 2 (``protocol/compat.py``), for rolling upgrades.

Two kinds of test: the rule itself (which version each message is stamped with, what a
v1 frame decodes to), and the real thing: the previous release's own codec, extracted
from the repository's history and run in a subprocess, decodes what this release sends
and sends what this release must decode.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.support.previous_release import extract
from zkv.protocol import codec
from zkv.protocol.admin import AdminInfo
from zkv.protocol.compat import LEGACY_VERSION
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import (
    PROTOCOL_VERSION,
    AppendEntries,
    AppendReply,
    Campaign,
    Consistency,
    DeleteRequest,
    Entry,
    ErrorReply,
    GetReply,
    GetRequest,
    Heard,
    Heartbeat,
    PutReply,
    PutRequest,
    Redirect,
    Role,
    StatusReply,
    VoteReply,
    VoteRequest,
)
from zkv.protocol.ring import RingConfig

RING = RingConfig(3, (0, 1), 256)


def _version(msg: Any) -> int:
    return int(msgpack.unpackb(codec.encode(msg)[0], raw=False)[0])


def _heartbeat(**extra: Any) -> Heartbeat:
    return Heartbeat("n1", 0, Role.LEADER, 4, "n1", 4, 10, 9, 9, 5, 123, "tcp://n1:7100",
                     ("n1", "n2", "n3"), RING, 100, dict(extra))


# ------------------------------------------------------------------- the rule


@pytest.mark.parametrize("msg", [
    GetRequest(b"c", 1, b"k", Consistency.STALE),
    PutRequest(b"c", 2, b"k", 0, b"v"),
    PutRequest(b"c", 2, b"k", 0, b"v" * 100_000),  # blob in its own frame
    DeleteRequest(b"c", 3, b"k", 0),
    GetReply(1, True, 7, b"v"),
    PutReply(2, 8),
    ErrorReply(1, 3, "not leader", "n2", 0),
    VoteRequest(5, "n2", 10, 4),
    VoteReply(5, "n1", True),
    AppendReply(5, "n2", True, 10, 3),
    AppendEntries(5, "n1", 9, 4, (Entry(5, 10, b"x"),), 9, 3),
    Campaign(0, 4, "b0"),
    _heartbeat(voter=True),
    Redirect(0, RING, ((b"client", b"header"),)),
    StatusReply(1, "b0", ({"node_id": "n1"},), RING),
], ids=lambda m: type(m).__name__)
def test_what_the_previous_release_reads_the_same_goes_as_version_1(msg: Any) -> None:
    assert _version(msg) == LEGACY_VERSION
    assert codec.decode(codec.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    DeleteRequest(b"c", 3, b"k", 0, expected_version=4),  # a conditional delete
    VoteRequest(5, "n2", 10, 4, transfer=True),  # leadership transfer
    AppendReply(5, "n2", True, 10, 3, voter=False),  # a non-voter's ack
    StatusReply(1, "b0", (), None),  # no ring yet: v1 always had one
    AdminInfo(b"c", 1, 0),
    Heard("b0", 4),
], ids=lambda m: type(m).__name__)
def test_what_it_would_misread_or_not_know_goes_as_version_2(msg: Any) -> None:
    assert _version(msg) == PROTOCOL_VERSION
    assert codec.decode(codec.encode(msg)) == msg


def test_a_heartbeat_in_version_1_carries_the_ring_flat() -> None:
    header = msgpack.unpackb(codec.encode(_heartbeat())[0], raw=False)
    assert header[:2] == [1, Heartbeat.TYPE]
    assert header[2 + 13:2 + 16] == [3, [0, 1], 256]  # ring_epoch, ring_shards, ring_vnodes
    assert len(header) == 2 + 18


def _v1(*values: Any) -> list[bytes]:
    return [msgpack.packb([LEGACY_VERSION, *values], use_bin_type=True)]


def test_version_1_frames_of_the_ring_carriers_decode_to_version_2_fields() -> None:
    hb = codec.decode(_v1(Heartbeat.TYPE, "n1", 0, 2, 4, "n1", 4, 10, 9, 9, 5, 123,
                          "tcp://n1:7100", ["n1", "n2", "n3"], 3, [0, 1], 256, 100, {}))
    assert hb == _heartbeat()
    rd = codec.decode(_v1(Redirect.TYPE, 0, 3, [0, 1], 256, [[b"client", b"header"]]))
    assert rd == Redirect(0, RING, ((b"client", b"header"),))
    st = codec.decode(_v1(StatusReply.TYPE, 1, "b0", [],
                          {"epoch": 3, "shards": [0, 1], "vnodes": 256}))
    assert st == StatusReply(1, "b0", (), RING)


@pytest.mark.parametrize("frames", [
    _v1(AdminInfo.TYPE, b"c", 1, 0),  # a type v1 did not have
    _v1(DeleteRequest.TYPE, b"c", 3, b"k", 0, 4),  # a field v1 did not have
    _v1(Heartbeat.TYPE, "n1", 0, 2, 4),  # a v1 heartbeat cut short
    _v1(StatusReply.TYPE, 1, "b0", [], {"epoch": 3}),  # a v1 ring without shards
    _v1(Redirect.TYPE, 0, 3, [0, 1], 0, []),  # a ring of 0 vnodes
    [msgpack.packb([3, GetRequest.TYPE, b"c", 1, b"k"])],  # a version from the future
    [msgpack.packb([True, GetRequest.TYPE, b"c", 1, b"k"])],  # True == 1, but not an int
], ids=["new-type", "new-field", "short-heartbeat", "ring-no-shards", "ring-0-vnodes",
        "version-3", "version-true"])
def test_what_version_1_could_not_have_sent_is_refused(frames: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode(frames)


# ------------------------------------------- against the previous release's own codec

_OLD_SIDE = textwrap.dedent("""
    import sys, msgpack
    from protocol import codec, messages as m
    frames_in = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    decoded = []
    for frames in frames_in:
        try:
            decoded.append(repr(codec.decode(frames)))
        except Exception as exc:
            decoded.append("ERROR " + type(exc).__name__)
    ring = {"epoch": 3, "shards": [0, 1], "vnodes": 256}
    sent = [codec.encode(msg) for msg in (
        m.Heartbeat("n1", 0, m.Role.LEADER, 4, "n1", 4, 10, 9, 9, 5, 123, "tcp://n1:7100",
                    ("n1", "n2", "n3"), 3, (0, 1), 256, 100, {}),
        m.Redirect(0, 3, (0, 1), 256, ((b"client", b"header"),)),
        m.StatusReply(1, "b0", (), ring),
        m.GetRequest(b"c", 1, b"k", m.Consistency.STALE),
        m.PutRequest(b"c", 2, b"k", 0, b"v"),
        m.AppendEntries(5, "n1", 9, 4, (m.Entry(5, 10, b"x"),), 9, 3),
        m.AppendReply(5, "n2", True, 10, 3),
        m.VoteRequest(5, "n2", 10, 4, False),
        m.VoteReply(5, "n1", True, False),
        m.ErrorReply(1, 3, "not leader", "n2", 0),
    )]
    sys.stdout.buffer.write(msgpack.packb({"decoded": decoded, "sent": sent}, use_bin_type=True))
""")


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's protocol and storage node code, importable from here."""
    return extract(tmp_path_factory.mktemp("previous"), "protocol", "storage_node")


def _run_previous(root: Path, script: str, payload: list[Any]) -> dict[str, Any]:
    """``script`` run by the previous release's code, ``payload`` on its stdin."""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, input=msgpack.packb(payload),
        capture_output=True, timeout=60, env={"PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    out: dict[str, Any] = msgpack.unpackb(proc.stdout, raw=False)
    return out


def test_the_previous_release_reads_what_this_one_sends(previous: Path) -> None:
    readable = [
        _heartbeat(voter=True, incarnation="ab"),
        Redirect(0, RING, ((b"client", b"header"),)),
        StatusReply(1, "b0", ({"node_id": "n1"},), RING),
        GetRequest(b"c", 1, b"k", Consistency.STALE),
        PutRequest(b"c", 2, b"k", 0, b"v" * 100_000),
        DeleteRequest(b"c", 3, b"k", 0),
        AppendEntries(5, "n1", 9, 4, (Entry(5, 10, b"x"),), 9, 3),
        AppendReply(5, "n2", True, 10, 3),
        VoteRequest(5, "n2", 10, 4, pre_vote=True),
        VoteReply(5, "n1", True),
        ErrorReply(1, 3, "not leader", "n2", 0),
    ]
    refused = [
        VoteRequest(5, "n2", 10, 4, transfer=True),
        AppendReply(5, "n2", True, 10, 3, voter=False),
        Heard("b0", 4),
    ]
    got = _run_previous(previous, _OLD_SIDE, [codec.encode(m) for m in readable + refused])
    decoded = got["decoded"]
    for msg, text in zip(readable, decoded, strict=False):
        assert not text.startswith("ERROR"), (msg, text)
        assert text.startswith(type(msg).__name__ + "("), text
    assert "ring_epoch=3, ring_shards=(0, 1), ring_vnodes=256" in decoded[0]
    assert "'incarnation': 'ab'" in decoded[0]
    assert "ring_epoch=3, ring_shards=(0, 1), ring_vnodes=256" in decoded[1]
    assert "'shards': [0, 1]" in decoded[2]
    assert decoded[len(readable):] == ["ERROR RemoteProtocolError"] * len(refused)


def test_this_release_reads_what_the_previous_one_sends(previous: Path) -> None:
    sent = _run_previous(previous, _OLD_SIDE, [])["sent"]
    assert [codec.decode(frames) for frames in sent] == [
        _heartbeat(),
        Redirect(0, RING, ((b"client", b"header"),)),
        StatusReply(1, "b0", (), RING),
        GetRequest(b"c", 1, b"k", Consistency.STALE),
        PutRequest(b"c", 2, b"k", 0, b"v"),
        AppendEntries(5, "n1", 9, 4, (Entry(5, 10, b"x"),), 9, 3),
        AppendReply(5, "n2", True, 10, 3),
        VoteRequest(5, "n2", 10, 4),
        VoteReply(5, "n1", True),
        ErrorReply(1, 3, "not leader", "n2", 0),
    ]


# --------------------------------------- log entries: what a mixed shard replicates

_OLD_COMMANDS = textwrap.dedent("""
    import sys, msgpack
    from protocol.ring import RingConfig
    from storage_node import commands as c
    decoded = []
    for data in msgpack.unpackb(sys.stdin.buffer.read(), raw=False):
        try:
            decoded.append(repr(c.decode_command(data)))
        except Exception as exc:
            decoded.append("ERROR " + type(exc).__name__)
    sent = [c.encode_command(cmd) for cmd in (
        c.Noop(),
        c.PutCommand(b"c", 1, 0, 1000, b"k", b"v"),
        c.DeleteCommand(b"c", 2, 1, 1001, b"k"),
        c.CasCommand(b"c", 3, 1, 1002, b"k", 4, b"w"),
        c.RingSet(RingConfig(2, (0, 1), 256)),
    )]
    sys.stdout.buffer.write(msgpack.packb({"decoded": decoded, "sent": sent}, use_bin_type=True))
""")


def test_an_old_follower_applies_what_a_new_leader_logs_for_plain_writes(
    previous: Path,
) -> None:
    """A leader of this release replicating to a follower of the previous one: the
    entries plain writes make (and a new leader's no-op) read the same there."""
    from zkv.storage_node import commands as c

    entries = [
        c.Noop(),
        c.PutCommand(b"c", 1, 0, 1000, b"k", b"v"),
        c.DeleteCommand(b"c", 2, 1, 1001, b"k"),
        c.CasCommand(b"c", 3, 1, 1002, b"k", 4, b"w"),
    ]
    decoded = _run_previous(previous, _OLD_COMMANDS,
                            [c.encode_command(e) for e in entries])["decoded"]
    assert decoded == [
        "Noop()",
        "PutCommand(client_id=b'c', request_id=1, lowest_pending=0, ts_ms=1000, key=b'k', "
        "value=b'v')",
        "DeleteCommand(client_id=b'c', request_id=2, lowest_pending=1, ts_ms=1001, key=b'k')",
        "CasCommand(client_id=b'c', request_id=3, lowest_pending=1, ts_ms=1002, key=b'k', "
        "expected_version=4, value=b'w')",
    ]


def test_a_new_node_reads_the_log_the_previous_release_wrote(previous: Path) -> None:
    """An adopted data dir's log, and an old leader's entries, read the same here."""
    from zkv.storage_node import commands as c

    sent = _run_previous(previous, _OLD_COMMANDS, [])["sent"]
    assert [c.decode_command(data) for data in sent] == [
        c.Noop(),
        c.PutCommand(b"c", 1, 0, 1000, b"k", b"v"),
        c.DeleteCommand(b"c", 2, 1, 1001, b"k"),
        c.CasCommand(b"c", 3, 1, 1002, b"k", 4, b"w"),
        c.RingSet(RingConfig(2, (0, 1), 256)),
    ]
