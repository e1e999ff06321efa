"""Invariant 6 on real processes: no input from the network crashes a process.

10,000 seeded random and malformed messages each (``random.Random(SEED)``: frame counts
0..5, random lengths and bytes, truncated headers of real encoded messages, fields of
the wrong type via msgpack, huge declared lengths, deep nesting, empty identity frames,
valid messages on the wrong socket) are sent

(a) to the broker frontend from DEALER sockets,
(b) to the broker backend from a DEALER posing as a node (a fake node id),
(c) to a lone storage node: the test plays the broker (a ROUTER the node connects to,
    plus a SUB on port + 1 for its heartbeats) and sends ``[node_id, client, garbage]``
    and ``[node_id, b"", garbage]``, and garbage to its peer port from a DEALER.

Afterwards every process still runs and serves a valid request. A failing seed replays
exactly: the generator depends only on the seed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster, free_port, free_port_block
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import (
    AppendEntries,
    AppendReply,
    Campaign,
    CasReply,
    CasRequest,
    Consistency,
    DeleteReply,
    DeleteRequest,
    Entry,
    ErrorReply,
    GetReply,
    GetRequest,
    Heartbeat,
    InstallSnapshot,
    PingRequest,
    PongReply,
    PutReply,
    PutRequest,
    Role,
    SnapshotReply,
    StatusReply,
    StatusRequest,
    VoteReply,
    VoteRequest,
)
from zkv.protocol.ring import RingConfig

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("BAD_INPUT_SEED", "20240607"))
MESSAGES = 10_000
BURST = 200  # messages sent between two drains of the replies
NODE_ID = "s0r0"

# --------------------------------------------------------------------------- generator

_CID = b"\x01" * 16
_TEMPLATES: list[Any] = [
    GetRequest(_CID, 1, b"key", Consistency.LINEARIZABLE),
    GetRequest(_CID, 2, b"key", Consistency.STALE),
    PutRequest(_CID, 3, b"key", 3, b"value"),
    DeleteRequest(_CID, 4, b"key", 4),
    CasRequest(_CID, 5, b"key", 5, 0, b"value"),
    StatusRequest(_CID, 6),
    PingRequest(_CID, 7),
    GetReply(1, True, 3, b"v"),
    PutReply(1, 3),
    DeleteReply(1, True, 4),
    CasReply(1, False, 0),
    ErrorReply(1, 3, "not leader", "s0r1", 0),
    StatusReply(1, "b0", ({"node_id": "x"},), RingConfig(1, (0,), 128)),
    PongReply(1, "b0"),
    Heartbeat("s0r9", 0, Role.LEADER, 1, "s0r9", 1, 1, 1, 1, 0, 1, "tcp://127.0.0.1:1",
              ("s0r9",), RingConfig(1, (0,), 128), 100),
    Campaign(0, 0, "fuzz"),
    VoteRequest(1, "s0r1", 0, 0, True),
    VoteReply(1, "s0r1", True, False),
    AppendEntries(1, "s0r1", 0, 0, (Entry(1, 1, b"\x91\x00"),), 0, 1),
    AppendReply(1, "s0r1", True, 1, 1),
    InstallSnapshot(1, "s0r1", 5, 1, 0, True, b"snap"),
    SnapshotReply(1, "s0r1", 5, 4, True),
]
_ENCODED = [codec.encode(m) for m in _TEMPLATES]
_HUGE_PREFIXES = [
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    b"\xc5\xff\xff",  # bin16 of 64 KiB
]


def _odd_value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 1.5, float("nan"),
        "", "x" * rng.randint(1, 300), b"", rng.randbytes(rng.randint(1, 64)), [], [1, 2],
        {}, {"a": 1}, {1: 2}, [[[]]], rng.randint(-(2**40), 2**40),
    ])


def _random_frame(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.15:
        return b""
    if r < 0.6:
        return rng.randbytes(rng.randint(1, 16))
    if r < 0.9:
        return rng.randbytes(rng.randint(17, 512))
    if r < 0.99:
        return rng.randbytes(rng.randint(513, 8192))
    return rng.randbytes(rng.randint(8193, 200_000))


def garbage(rng: random.Random) -> list[bytes]:
    """One malformed (or valid but misplaced) message body; may be empty (0 frames)."""
    kind = rng.randrange(9)
    if kind == 0:  # random frames, 0..5 of them
        return [_random_frame(rng) for _ in range(rng.randint(0, 5))]
    template = list(rng.choice(_ENCODED))
    if kind == 1:  # a truncated real header (and maybe its blob)
        head = template[0][: rng.randrange(len(template[0]))]
        return [head, *template[1:]] if rng.random() < 0.5 else [head]
    if kind == 2:  # a field of the wrong type (or an odd value of the right type)
        fields = msgpack.unpackb(template[0], raw=False)
        for _ in range(rng.randint(1, 3)):
            fields[rng.randrange(len(fields))] = _odd_value(rng)
        if rng.random() < 0.2:
            fields = fields[: rng.randrange(len(fields) + 1)]
        elif rng.random() < 0.2:
            fields.extend(_odd_value(rng) for _ in range(rng.randint(1, 4)))
        head = msgpack.packb(fields, use_bin_type=rng.random() < 0.8)
        return [head, *template[1:]]
    if kind == 3:  # a huge declared length with little or nothing behind it
        prefix = rng.choice([b"", b"\x93\x01\x02", b"\x95\x01\x02\xc4\x10" + b"c" * 16 + b"\x01"])
        return [prefix + rng.choice(_HUGE_PREFIXES) + rng.randbytes(rng.randint(0, 32))]
    if kind == 4:  # deep nesting
        depth = rng.choice([100, 1_000, 10_000, 100_000])
        return [rng.choice([b"\x91", b"\x81\xa1a"]) * depth + b"\xc0"]
    if kind == 5:  # a valid message with frames added or removed
        if rng.random() < 0.5:
            return template + [_random_frame(rng) for _ in range(rng.randint(1, 3))]
        return template[:1] if len(template) > 1 else [template[0], _random_frame(rng)]
    if kind == 6:  # empty frames
        return [b""] * rng.randint(1, 5)
    if kind == 7:  # msgpack of something that is not a header
        obj = _odd_value(rng)
        if rng.random() < 0.5:
            obj = [1, rng.randrange(60), *(_odd_value(rng) for _ in range(rng.randint(0, 8)))]
        return [msgpack.packb(obj, use_bin_type=True)]
    return template  # kind 8: a valid message, usually on the wrong socket


def _client_ident(rng: random.Random) -> bytes:
    return b"" if rng.random() < 0.3 else rng.randbytes(rng.randint(1, 32))


# --------------------------------------------------------------------------- plumbing


def _drain(sock: zmq.Socket[Any]) -> list[list[bytes]]:
    out = []
    while True:
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return out


def _assert_typed(replies: list[list[bytes]], skip: int = 0) -> dict[str, int]:
    """Every reply decodes to a message; count them by type."""
    kinds: dict[str, int] = {}
    for frames in replies:
        msg = codec.decode(frames[skip:])
        kinds[type(msg).__name__] = kinds.get(type(msg).__name__, 0) + 1
    return kinds


def _send(sock: zmq.Socket[Any], frames: list[bytes]) -> bool:
    if not frames:
        return False  # zmq cannot send a message of zero frames
    sock.send_multipart(frames, zmq.NOBLOCK)
    return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "data", shards=1, replicas=1, brokers=1, port=0,
                      fsync="never", heartbeat_ms=100, election_timeout_ms=1000,
                      log_level="INFO") as c:
        c.wait_ready(60)
        yield c


def _assert_cluster_serves(cluster: LocalCluster) -> None:
    for c in [*cluster.brokers, *cluster.nodes.values()]:
        assert c.proc is not None and c.proc.poll() is None, f"{c.name} died:\n{c.tail(40)}"
    with KVClient(cluster.endpoints, timeout_s=20) as kv:
        assert kv.ping() == "b0"
        version = kv.put("after-the-storm", "still here")
        assert kv.get_versioned("after-the-storm") == (b"still here", version)


# --------------------------------------------------------------------------- (a), (b)


def test_broker_frontend_survives_garbage(cluster: LocalCluster) -> None:
    rng = random.Random(SEED)
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(8):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(cluster.endpoints[0])
            socks.append(s)
        started = time.monotonic()
        sent = 0
        replies: list[list[bytes]] = []
        for i in range(MESSAGES):
            sent += _send(socks[i % len(socks)], garbage(rng))
            if i % BURST == BURST - 1:
                for s in socks:
                    replies += _drain(s)
        deadline = time.monotonic() + 20
        while len(replies) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
            for s in socks:
                replies += _drain(s)
        kinds = _assert_typed(replies)
        print(f"\nfrontend: {sent} messages in {time.monotonic() - started:.1f}s, "
              f"{len(replies)} replies: {kinds}")
        assert len(replies) == sent, f"{sent - len(replies)} messages got no reply"
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    _assert_cluster_serves(cluster)


def test_broker_backend_survives_garbage_from_a_fake_node(cluster: LocalCluster) -> None:
    rng = random.Random(SEED + 1)
    backend = cluster.backend_endpoints()[0]
    ctx = zmq.Context()
    socks = []
    try:
        for ident in (b"fake-node", b"s9r9", NODE_ID.encode() + b"-imposter"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.IDENTITY, ident)
            s.connect(backend)
            socks.append(s)
        started = time.monotonic()
        for i in range(MESSAGES):
            body = garbage(rng)
            frames = [_client_ident(rng), *body] if rng.random() < 0.8 else body
            _send(socks[i % len(socks)], frames)
            if i % BURST == BURST - 1:
                for s in socks:
                    _drain(s)  # the broker never sends a fake node anything but campaigns
        time.sleep(1.0)
        print(f"\nbackend: {MESSAGES} messages in {time.monotonic() - started:.1f}s")
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    _assert_cluster_serves(cluster)


# --------------------------------------------------------------------------- (c)


class LoneNode:
    """A ``zkv-node`` process whose only broker is this test."""

    def __init__(self, tmp_path: Path) -> None:
        self.ctx = zmq.Context()
        self.port = free_port_block(2)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.bind(f"tcp://127.0.0.1:{self.port}")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.bind(f"tcp://127.0.0.1:{self.port + 1}")
        self.peer_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = tmp_path / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp_path = tmp_path
        self.rid = 0
        self.extra_args: tuple[str, ...] = ()

    def start(self) -> None:
        argv = [sys.executable, "-m", "zkv.storage_node.main", "--node-id", NODE_ID, "--shard", "0",
                "--data-dir", str(self.tmp_path / "node"), "--listen", self.peer_endpoint,
                "--brokers", f"tcp://127.0.0.1:{self.port}", "--fsync", "never",
                "--heartbeat-ms", "100", "--election-timeout-ms", "1000", "--bootstrap",
                *self.extra_args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.router.close(linger=0)
        self.sub.close(linger=0)
        self.ctx.term()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def heartbeat(self, timeout_s: float) -> Heartbeat:
        """The next heartbeat the node publishes (the newest one queued)."""
        deadline = time.monotonic() + timeout_s
        latest = None
        while latest is None:
            assert self.alive(), f"node died:\n{self.log_tail()}"
            left_ms = int((deadline - time.monotonic()) * 1000)
            assert left_ms > 0, "no heartbeat from the node"
            if self.sub.poll(min(left_ms, 200)):
                for frames in _drain(self.sub):
                    with contextlib.suppress(RemoteProtocolError):
                        msg = codec.decode(frames)
                        if isinstance(msg, Heartbeat):
                            latest = msg
        return latest

    def call(self, msg: Any, timeout_s: float = 5.0) -> Any:
        """Send a request as the broker would and return the node's reply."""
        ident = b"test-client"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.router.send_multipart([NODE_ID.encode(), ident, *codec.encode(msg)])
                break
            except zmq.ZMQError as exc:  # EHOSTUNREACH until the node has connected
                assert exc.errno == zmq.EHOSTUNREACH and time.monotonic() < deadline, exc
                time.sleep(0.05)
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            assert left_ms > 0, f"no reply to {msg!r}"
            if self.router.poll(left_ms):
                frames = self.router.recv_multipart()
                if frames[1] != ident:
                    continue  # a late reply to the garbage
                reply = codec.decode(frames[2:])
                if getattr(reply, "request_id", None) == msg.request_id:
                    return reply

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def make_leader(self, timeout_s: float = 20.0) -> Heartbeat:
        deadline = time.monotonic() + timeout_s
        while True:
            self.router.send_multipart([NODE_ID.encode(), b"", *codec.encode(Campaign(0, 0, "test"))])
            hb = self.heartbeat(5)
            if hb.role is Role.LEADER:
                return hb
            assert time.monotonic() < deadline, f"the node never led: {hb}"
            time.sleep(0.2)

    def assert_serves(self) -> None:
        assert self.alive(), f"node died:\n{self.log_tail()}"
        rid = self.next_rid()
        assert self.call(PingRequest(b"c" * 16, rid)) == PongReply(rid, NODE_ID)
        self.make_leader()
        rid = self.next_rid()
        put = self.call(PutRequest(b"c" * 16, rid, b"valid-key", rid, b"valid-value"), 10)
        assert isinstance(put, PutReply), put
        rid = self.next_rid()
        got = self.call(GetRequest(b"c" * 16, rid, b"valid-key"), 10)
        assert got == GetReply(rid, True, put.version, b"valid-value")


@pytest.fixture
def lone_node(tmp_path: Path) -> Iterator[LoneNode]:
    node = LoneNode(tmp_path)
    try:
        node.start()
        node.heartbeat(30)  # the node is up and publishing
        yield node
    finally:
        node.close()


def test_storage_node_survives_garbage(lone_node: LoneNode) -> None:
    node = lone_node
    node.assert_serves()
    rng = random.Random(SEED + 2)
    ident = NODE_ID.encode()
    started = time.monotonic()
    replies: list[list[bytes]] = []
    for i in range(MESSAGES):
        frames = [ident, _client_ident(rng), *garbage(rng)]
        try:
            node.router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise AssertionError(f"message {i}: the node is gone ({exc}):\n{node.log_tail()}") from exc
        if i % BURST == BURST - 1:
            replies += _drain(node.router)
    time.sleep(1.0)
    replies += _drain(node.router)
    kinds = _assert_typed(replies, skip=2)
    print(f"\nnode broker socket: {MESSAGES} messages in {time.monotonic() - started:.1f}s, "
          f"{len(replies)} replies: {kinds}")
    node.assert_serves()

    # The peer port: garbage and valid peer messages from strangers.
    started = time.monotonic()
    socks = []
    try:
        for peer_ident in (None, b"s0r9", b"stranger", ident):
            s = node.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            if peer_ident is not None:
                s.setsockopt(zmq.IDENTITY, peer_ident)
            s.connect(node.peer_endpoint)
            socks.append(s)
        for i in range(MESSAGES):
            _send(socks[i % len(socks)], garbage(rng))
            if i % BURST == BURST - 1:
                for s in socks:
                    _drain(s)
                assert node.alive(), f"node died after {i + 1} peer messages:\n{node.log_tail()}"
        time.sleep(1.0)
    finally:
        for s in socks:
            s.close(linger=0)
    print(f"node peer socket: {MESSAGES} messages in {time.monotonic() - started:.1f}s")
    node.assert_serves()


@pytest.mark.parametrize("term", [2**64 - 1, 2**64 - 2, 2**63, -1])
def test_storage_node_survives_extreme_campaign_terms(lone_node: LoneNode, term: int) -> None:
    """A Campaign decodes with any msgpack int as its term; the node must not take a
    term it cannot persist or publish (uint64 is the wire's limit), nor die of it."""
    node = lone_node
    node.router.send_multipart([NODE_ID.encode(), b"", *codec.encode(Campaign(0, term, "fuzz"))])
    time.sleep(1.0)
    assert node.alive(), f"a Campaign at term {term} killed the node:\n{node.log_tail()}"
    hb = node.heartbeat(5)
    assert 0 <= hb.term < 2**64
    node.assert_serves()
