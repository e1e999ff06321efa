"""The floor under target 1: 2 shards x 3 replicas of writes in bare pyzmq, with group
commit at every hop and nothing but the durable minimum on the path; fsync always
against never, alternating, at each concurrency (informational).

    generator -> relay (one process, round robin over the 2 leaders)
              -> leader: every request its drain brought is one batch: sent to both
                 followers, appended to its own file (pwrite + fdatasync)
              -> follower: every batch its drain brought, appended, one fdatasync,
                 one ack of the highest batch
              <- leader: a batch is answered once a follower acked it (its own sync
                 came first: a majority of 3 holds it on disk)

Eight processes, as ``bench.ab_builds``' 2 x 3 (six nodes, a broker, the generator),
the same generator (``zkv.ops.bench.run_bench``, writes only, 100 B values, 10,000
keys) and the same files (zero-filled ahead, as zkv's WAL segments). There is no log
matching, term, commit index, state machine, session or failure handling, and a
leader keeps any number of batches in flight: whatever ratio of fsync always to never
this reaches within a p99 is what the disk leaves to a replicated store whose
Python costs almost nothing per write.

    python -m bench.write_floor --concurrency 32,64,128,256 --rounds 2 --duration 8
    python -m bench.write_floor --modes never,always,direct   # and O_DIRECT | O_DSYNC
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from bench.ab_builds import machine_busy_s, parse_concurrencies, run_order, summarize
from bench.put_floor import LOG_BYTES, Floor, _Log, add_role_arguments
from bench.relay_baseline import READY, wait_for_relay
from zkv.ops.cluster import free_port
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.messages import PutReply, PutRequest

LEADERS = (b"L0", b"L1")
DRAIN_MAX = 1024
BLOCK = 4096
#: never: no sync; always: pwrite + fdatasync (zkv's WAL); direct: O_DIRECT | O_DSYNC
MODES = ("never", "always", "direct")


def parse_modes(text: str) -> list[str]:
    """``never,always[,direct]``: the configurations compared, the first the baseline."""
    modes = text.split(",")
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct modes of {MODES}, got {text!r}")
    return modes


class _DirectLog:
    """``--direct``: the file opened ``O_DIRECT | O_DSYNC``, so one ``pwrite`` of the
    4 KiB blocks holding a batch is its write and its sync at once (no page cache, no
    separate ``fdatasync``: ``append``'s ``sync`` changes nothing); the partial last
    block is kept and written again with the next batch. The same zero-filled file as
    ``_Log``."""

    def __init__(self, path: Path) -> None:
        os.close(_Log(path).fd)
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
        self.buf = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT needs
        self.block_offset = 0  # where the block holding ``tail`` starts in the file
        self.tail = b""

    def append(self, record: bytes, sync: bool) -> None:
        data = self.tail + record
        if self.block_offset + len(data) + BLOCK > LOG_BYTES:
            self.block_offset, data = 0, record
        padded = -(-len(data) // BLOCK) * BLOCK
        self.buf[:len(data)] = data
        self.buf[len(data):padded] = bytes(padded - len(data))
        os.pwrite(self.fd, memoryview(self.buf)[:padded], self.block_offset)
        whole = len(data) // BLOCK * BLOCK
        self.block_offset += whole
        self.tail = data[whole:]


def open_log(path: Path, sync: bool, direct: bool) -> _Log | _DirectLog:
    """The file a process appends to: ``--direct`` only matters when syncing."""
    return _DirectLog(path) if direct and sync else _Log(path)


def relay(frontend: str, backend: str) -> None:
    """ROUTER/ROUTER: each request to the next leader in turn, each reply back."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    front.bind(frontend)
    back.bind(backend)
    waiting = set(LEADERS)
    while waiting:
        waiting.discard(back.recv_multipart()[0])
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    nb = zmq.NOBLOCK
    turn = 0
    while True:
        for sock, _ in poller.poll():
            for _ in range(DRAIN_MAX):
                try:
                    frames = sock.recv_multipart(nb, copy=False)
                except zmq.Again:
                    break
                if sock is front:
                    turn ^= 1
                    back.send_multipart([LEADERS[turn], *frames], nb, copy=False)
                else:
                    front.send_multipart(frames[1:], nb, copy=False)


def leader(name: bytes, backend: str, followers: list[str], data_dir: Path,
           sync: bool, direct: bool = False) -> None:
    """One batch per drain; answer a batch once its own sync and one ack are in."""
    log = open_log(data_dir / f"floor-{name.decode()}.log", sync, direct)
    ctx = zmq.Context()
    front = ctx.socket(zmq.DEALER)
    front.setsockopt(zmq.LINGER, 0)
    front.setsockopt(zmq.IDENTITY, name)
    front.connect(backend)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    peers = []
    for endpoint in followers:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint)
        poller.register(peer, zmq.POLLIN)
        peers.append(peer)
    front.send_multipart([b"", READY])
    seq = acked = 0
    version = 0
    pending: dict[int, list[tuple[bytes, int]]] = {}
    nb = zmq.NOBLOCK
    while True:
        ready = dict(poller.poll())
        if front in ready:
            batch: list[tuple[bytes, int]] = []
            records = []
            for _ in range(DRAIN_MAX):
                try:
                    frames = front.recv_multipart(nb)
                except zmq.Again:
                    break
                try:
                    msg = codec.decode(frames[1:])
                except RemoteProtocolError:
                    continue
                if isinstance(msg, PutRequest):
                    batch.append((frames[0], msg.request_id))
                    records.append(frames[1])
            if batch:
                seq += 1
                tag = seq.to_bytes(8, "big")
                payload = b"".join(records)
                for peer in peers:
                    peer.send_multipart([tag, payload])
                log.append(payload, sync)
                pending[seq] = batch
        for peer in peers:
            if peer in ready:
                while True:
                    try:
                        acked = max(acked, int.from_bytes(peer.recv(nb), "big"))
                    except zmq.Again:
                        break
        while pending and min(pending) <= acked:
            for ident, request_id in pending.pop(min(pending)):
                version += 1
                front.send_multipart([ident, *codec.encode(PutReply(request_id, version))])


def follower(endpoint: str, data_dir: Path, name: str, sync: bool,
             direct: bool = False) -> None:
    """Append every batch a drain brings in one write, one sync, ack the highest."""
    log = open_log(data_dir / f"floor-{name}.log", sync, direct)
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    nb = zmq.NOBLOCK
    while True:
        got = [sock.recv_multipart()]
        while len(got) < DRAIN_MAX:
            try:
                got.append(sock.recv_multipart(nb))
            except zmq.Again:
                break
        log.append(b"".join(payload for _, _, payload in got), sync)
        ident, tag, _ = got[-1]
        sock.send_multipart([ident, tag])


class WriteFloor(Floor):
    """The relay, 2 leaders and 4 followers as child processes; a context manager
    (``put_floor.Floor``'s directory, endpoint and teardown)."""

    def __init__(self, data_dir: Path, mode: str = "always") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(data_dir, sync=mode != "never")
        self.mode = mode

    def __enter__(self) -> WriteFloor:
        self.dir = Path(tempfile.mkdtemp(prefix="write-floor-", dir=self.data_dir))
        backend = f"tcp://127.0.0.1:{free_port()}"
        me = [sys.executable, "-m", "bench.write_floor", "--data-dir", str(self.dir),
              "--mode", self.mode]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = Path(__file__).resolve().parent.parent
        try:
            relay_proc = subprocess.Popen(
                [*me, "--role", "relay", "--endpoint", self.endpoint, "--backend", backend],
                stdout=subprocess.PIPE, env=env, cwd=root)
            self.procs.append(relay_proc)
            for i, name in enumerate(LEADERS):
                followers = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
                for j, endpoint in enumerate(followers):
                    self.procs.append(subprocess.Popen(
                        [*me, "--role", "follower", "--endpoint", endpoint,
                         "--name", f"f{i}{j}"], env=env, cwd=root))
                self.procs.append(subprocess.Popen(
                    [*me, "--role", "leader", "--name", name.decode(), "--backend", backend,
                     "--followers", *followers], env=env, cwd=root))
            wait_for_relay(relay_proc)
        except BaseException:
            self.__exit__()
            raise
        return self


GENERATOR = """
import json, sys
from zkv.ops.bench import run_bench
r = run_bench(sys.argv[1], concurrency=int(sys.argv[2]), duration_s=float(sys.argv[3]),
              keys=10_000, value_size=100, read_ratio=0.0, warmup_s=float(sys.argv[4]),
              check=False)
print(json.dumps(r.to_dict()))
"""


def run_one(data_dir: Path, mode: str, concurrency: int, duration_s: float,
            warmup_s: float = 2.0) -> dict[str, Any]:
    """One run of the floor in ``mode`` (``MODES``), loaded by the generator (its own
    process, as in ``bench.ab_builds``); the machine's busy CPU per write."""
    with WriteFloor(data_dir, mode) as floor:
        before = machine_busy_s()
        out = subprocess.run(
            [sys.executable, "-c", GENERATOR, floor.endpoint, str(concurrency), str(duration_s),
             str(warmup_s)],
            capture_output=True, text=True, timeout=duration_s + 60, check=True,
            cwd=Path(__file__).resolve().parent.parent)
        busy = machine_busy_s() - before
    result = json.loads(out.stdout)
    writes = result["ops"] + result["warmup_ops"]
    return {"name": mode, "concurrency": concurrency,
            "ops_s": result["ops_s"], "p99_ms": result["latency_ms"]["all"]["p99"],
            "machine_us_per_write": busy * 1e6 / max(writes, 1),
            "errors": result.get("errors", {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_role_arguments(p)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--mode", choices=MODES, default="always",
                   help="a process's sync (its role's; --modes for the comparison)")
    p.add_argument("--modes", type=parse_modes, default=["never", "always"],
                   help="the comparison's configurations, the first its baseline")
    p.add_argument("--concurrency", type=parse_concurrencies, default=[32, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--p99-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    sync, direct = args.mode != "never", args.mode == "direct"
    if args.role == "relay":
        relay(args.endpoint, args.backend)
        return 0
    if args.role == "leader":
        leader(args.name.encode(), args.backend, args.followers, args.data_dir, sync, direct)
        return 0
    if args.role == "follower":
        follower(args.endpoint, args.data_dir, args.name, sync, direct)
        return 0
    data_dir = args.data_dir or Path(tempfile.gettempdir())
    results = []
    for mode, concurrency in run_order(args.rounds, args.concurrency, args.modes):
        results.append(run_one(data_dir, mode, concurrency, args.duration, args.warmup))
        print(json.dumps(results[-1]), flush=True)
    for line in summarize(results, args.modes, args.p99_ms):
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
