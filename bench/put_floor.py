"""The floor under target 3's put: its path in bare pyzmq, with nothing but the durable
minimum on it (informational, printed by ``bench.round_trips``).

    client -> relay (bench/relay_baseline.py) -> leader -> 2 followers
                                                  leader <- first follower's ack
    client <- relay <- leader

- the **relay** is the baseline's, unchanged: a broker hop without routing logic;
- the **leader** decodes the request with ``zkv.protocol.codec`` (as the baseline's
  worker does), sends its header to both followers, appends it to its own file (one
  ``pwrite`` + ``fdatasync``, the file zero-filled ahead as zkv's WAL is), waits for the
  first follower's ack (with its own sync, a majority of 3 holds the record on disk),
  and answers with the codec;
- each **follower** appends what it receives the same way and acks.

``--no-sync`` leaves out every ``fdatasync`` (a diagnostic, not a durable floor): the
path's hops alone. ``--decompose`` times, alternating in one run, the relay, one
fdatasync, this floor with and without its syncs and zkv's put on 1 x 3 with fsync
always and never, and prints where the put's time goes.

There is no log matching, no term, no commit index, no state machine, no session table,
no retry and no failure handling: whatever zkv's put costs above this is what a Raft
put does beyond moving the bytes and syncing them. Where this alone costs more than the
target's bound (2 x the relay + one fdatasync), the bound leaves a put through the
broker, durable on a majority, no room for any work of its own on this machine.

    python bench/put_floor.py --data-dir DIR   # a put at a time for 3 s, its p50
    python bench/put_floor.py --data-dir DIR --decompose [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from bench.relay_baseline import READY, WORKER_ID, kill_all, relay, wait_for_relay
from zkv.ops.bench import run_bench
from zkv.ops.cluster import free_port
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import ErrorReply, PutReply, PutRequest

FOLLOWERS = 2
ACK_TIMEOUT_MS = 5_000  # a follower that dies leaves the leader waiting this long at most
LOG_BYTES = 16 << 20  # each process's file: ~25 s of puts one at a time before it wraps


class _Log:
    """An append-only file, zero-filled ahead as zkv's WAL segments are: an
    ``fdatasync`` then flushes the data alone, never the file's size (no journal
    commit), so the floor's syncs cost what zkv's do. It wraps around when full."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        zeros = bytes(1 << 20)
        for offset in range(0, LOG_BYTES, len(zeros)):
            os.pwrite(self.fd, zeros, offset)
        os.fsync(self.fd)
        self.offset = 0

    def append(self, record: bytes, sync: bool) -> None:
        if self.offset + len(record) > LOG_BYTES:
            self.offset = 0
        os.pwrite(self.fd, record, self.offset)
        self.offset += len(record)
        if sync:
            os.fdatasync(self.fd)


def follower(endpoint: str, data_dir: Path, name: str, sync: bool = True) -> None:
    """Append each record received, fdatasync, ack with its sequence number."""
    log = _Log(data_dir / f"floor-{name}.log")
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    while True:
        ident, seq, record = sock.recv_multipart()
        log.append(record, sync)
        sock.send_multipart([ident, seq])


def leader(backend: str, followers: list[str], data_dir: Path, sync: bool = True) -> None:
    """Answer each put once it is on its own disk and on one follower's (module doc)."""
    log = _Log(data_dir / "floor-leader.log")
    ctx = zmq.Context()
    front = ctx.socket(zmq.DEALER)
    front.setsockopt(zmq.LINGER, 0)
    front.setsockopt(zmq.IDENTITY, WORKER_ID)
    front.connect(backend)
    peers = []
    poller = zmq.Poller()
    for endpoint in followers:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint)
        poller.register(peer, zmq.POLLIN)
        peers.append(peer)
    front.send_multipart([b"", READY])
    seq = 0
    while True:
        frames = front.recv_multipart()
        ident = frames[0]
        try:
            msg = codec.decode(frames[1:])
        except RemoteProtocolError:
            continue
        if not isinstance(msg, PutRequest):
            reply = codec.encode(ErrorReply(getattr(msg, "request_id", 0),
                                            ErrorCode.BAD_REQUEST))
            front.send_multipart([ident, *reply])
            continue
        seq += 1
        tag = seq.to_bytes(8, "big")
        record = frames[1]
        for peer in peers:
            peer.send_multipart([tag, record])
        log.append(record, sync)
        if not _first_ack(poller, tag):
            continue  # no follower answered: no majority, no reply (the client retries)
        front.send_multipart([ident, *codec.encode(PutReply(msg.request_id, seq))])


def _first_ack(poller: zmq.Poller, tag: bytes) -> bool:
    """Wait for a follower's ack of ``tag``; older acks (the slower follower's) are
    read and dropped on the way."""
    while True:
        ready = poller.poll(ACK_TIMEOUT_MS)
        if not ready:
            return False
        for sock, _ in ready:
            if sock.recv() == tag:
                return True


class Floor:
    """The relay, the leader and the followers as child processes; a context manager."""

    def __init__(self, data_dir: Path, sync: bool = True) -> None:
        self.data_dir = data_dir
        #: its own directory under ``data_dir`` (its processes' files), gone at exit
        self.dir: Path | None = None
        self.sync = sync
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Floor:
        self.dir = Path(tempfile.mkdtemp(prefix="put-floor-", dir=self.data_dir))
        backend = f"tcp://127.0.0.1:{free_port()}"
        followers = [f"tcp://127.0.0.1:{free_port()}" for _ in range(FOLLOWERS)]
        me = [sys.executable, str(Path(__file__).resolve()), "--data-dir", str(self.dir)]
        if not self.sync:
            me.append("--no-sync")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            for i, endpoint in enumerate(followers):
                self.procs.append(subprocess.Popen(
                    [*me, "--role", "follower", "--endpoint", endpoint, "--name", f"f{i}"],
                    env=env))
            relay_proc = subprocess.Popen(
                [*me, "--role", "relay", "--endpoint", self.endpoint, "--backend", backend],
                stdout=subprocess.PIPE, env=env)
            self.procs.append(relay_proc)
            self.procs.append(subprocess.Popen(
                [*me, "--role", "leader", "--backend", backend, "--followers", *followers],
                env=env))
            wait_for_relay(relay_proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        kill_all(self.procs)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _put_p50(endpoint: str, duration_s: float) -> float:
    result = run_bench(endpoint, concurrency=1, duration_s=duration_s, keys=1_000,
                       value_size=100, read_ratio=0.0, warmup_s=0.5, check=False)
    return float(result.latency_ms["put"]["p50"])


def decompose(data_dir: Path, rounds: int, duration_s: float) -> dict[str, float]:
    """Each side's best p50 (ms) over ``rounds`` alternating rounds (module doc)."""
    from bench.relay_baseline import Baseline
    from bench.round_trips import fdatasync_ms
    from zkv.ops.cluster import LocalCluster

    sides: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        clusters_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=data_dir)))
        endpoints = {}
        for fsync in ("always", "never"):
            cluster = stack.enter_context(LocalCluster(
                clusters_dir / f"1x3-{fsync}", shards=1, replicas=3, brokers=1, port=0,
                fsync=fsync, log_level="WARNING"))
            cluster.wait_ready(60.0)
            endpoints[f"zkv put, fsync {fsync}"] = cluster.endpoint
        endpoints["floor"] = stack.enter_context(Floor(data_dir)).endpoint
        endpoints["floor, no fdatasync"] = stack.enter_context(
            Floor(data_dir, sync=False)).endpoint
        endpoints["relay"] = stack.enter_context(Baseline()).endpoint
        for i in range(rounds):
            print(f"put_floor: round {i + 1}/{rounds}", file=sys.stderr, flush=True)
            sides.setdefault("fdatasync", []).append(
                statistics.median(fdatasync_ms(data_dir, 200)))
            for name, endpoint in endpoints.items():
                sides.setdefault(name, []).append(_put_p50(endpoint, duration_s))
    return {name: min(p50s) for name, p50s in sides.items()}


def add_role_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments a floor's processes are started with (``Floor`` and its
    subclasses): which role, its sockets and its name; ``bench`` is the comparison."""
    p.add_argument("--role", choices=["bench", "relay", "leader", "follower"], default="bench")
    p.add_argument("--endpoint")
    p.add_argument("--backend")
    p.add_argument("--followers", nargs="*", default=[])
    p.add_argument("--name", default="f")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_role_arguments(p)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--no-sync", action="store_true", help="no fdatasync (a diagnostic)")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--decompose", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    sync = not args.no_sync
    if args.role == "relay":
        relay(args.endpoint, args.backend)
    elif args.role == "leader":
        leader(args.backend, args.followers, args.data_dir, sync)
    elif args.role == "follower":
        follower(args.endpoint, args.data_dir, args.name, sync)
    elif args.decompose:
        best = decompose(args.data_dir, args.rounds, args.duration)
        bound = 2 * best["relay"] + best["fdatasync"]
        print(f"one put at a time, best p50 of {args.rounds} alternating round(s)")
        print(f"  {'bound: 2 x relay + fdatasync':32} {bound:.3f} ms")
        for name, ms in best.items():
            print(f"  {name:32} {ms:.3f} ms  {ms / bound:.2f} x the bound")
    else:
        with Floor(args.data_dir, sync) as floor:
            ms = _put_p50(floor.endpoint, args.duration)
        print(f"put floor p50 {ms:.3f} ms")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
