"""The baseline for ``make bench``: a bare pyzmq relay of the same shape as zkv.

    client DEALER -> relay ROUTER/ROUTER (process) -> worker DEALER (process, a dict)

Same framing (the worker decodes and answers with ``zkv.protocol.codec``, as a storage node
does; the relay only swaps identity frames, as a broker does without routing logic),
same load generator (``zkv.ops.bench.run_bench``), same value size, window and duration.
Its ops/s is what zkv is measured against: zkv / baseline >= 0.8 is the target.

    python bench/relay_baseline.py --duration 5 --concurrency 64 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from zkv.ops.bench import BenchResult, run_bench
from zkv.ops.cluster import free_port
from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import ErrorReply, GetReply, GetRequest, PutReply, PutRequest

WORKER_ID = b"w0"
READY = b"READY"
STARTUP_S_MAX = 10.0
DRAIN_BATCH_MAX = 1024


def relay(frontend: str, backend: str) -> None:
    """ROUTER/ROUTER relay: swap identities, never look at the payload.

    It moves frames the way the zkv broker does (zero-copy receive, part by part,
    batched drains), so the ratio measures what zkv adds, not a slower I/O style."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    back.setsockopt(zmq.ROUTER_MANDATORY, 1)
    front.bind(frontend)
    back.bind(backend)
    hello = back.recv_multipart()  # wait for the worker before taking clients
    assert hello[0] == WORKER_ID
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    nb, more = zmq.NOBLOCK, zmq.NOBLOCK | zmq.SNDMORE
    while True:
        for sock, _ in poller.poll():
            recv = sock.recv
            for _ in range(DRAIN_BATCH_MAX):
                try:
                    first = recv(nb, False)
                except zmq.Again:
                    break
                try:
                    if sock is front:
                        send = back.send
                        send(WORKER_ID, more)
                        part = first
                    else:
                        send = front.send
                        part = recv(nb, False)  # the client identity leads the reply
                    while part.more:
                        send(part, more)
                        part = recv(nb, False)
                    send(part, nb)
                except zmq.ZMQError:
                    pass  # peer gone: drop, as the broker does


def worker(backend: str) -> None:
    """Answer Get/Put from a dict, decoding and encoding with ``zkv.protocol.codec``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, WORKER_ID)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(backend)
    sock.send_multipart([b"", READY])
    data: dict[bytes, tuple[bytes, int]] = {}
    version = 0
    while True:
        frames = sock.recv_multipart()
        ident = frames[0]
        try:
            msg = codec.decode(frames[1:])
        except RemoteProtocolError:
            continue
        if isinstance(msg, GetRequest):
            found = data.get(msg.key)
            reply = (GetReply(msg.request_id, True, found[1], found[0]) if found
                     else GetReply(msg.request_id, False, 0, b""))
        elif isinstance(msg, PutRequest):
            version += 1
            data[msg.key] = (msg.value, version)
            reply = PutReply(msg.request_id, version)
        else:
            reply = ErrorReply(getattr(msg, "request_id", 0), ErrorCode.BAD_REQUEST)
        sock.send_multipart([ident, *codec.encode(reply)])


class Baseline:
    """The relay and worker as child processes; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Baseline:
        backend = f"tcp://127.0.0.1:{free_port()}"
        me = [sys.executable, str(Path(__file__).resolve())]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        relay_proc = subprocess.Popen(
            [*me, "--role", "relay", "--frontend", self.endpoint, "--backend", backend],
            stdout=subprocess.PIPE, env=env)
        self.procs.append(relay_proc)
        self.procs.append(subprocess.Popen([*me, "--role", "worker", "--backend", backend],
                                           env=env))
        try:
            wait_for_relay(relay_proc)
        except BaseException:  # a relay that never started, or Ctrl-C while waiting
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        kill_all(self.procs)


def wait_for_relay(relay_proc: subprocess.Popen[bytes]) -> None:
    """The relay prints ``ready`` once its worker has said hello to it."""
    deadline = time.monotonic() + STARTUP_S_MAX
    assert relay_proc.stdout is not None
    os.set_blocking(relay_proc.stdout.fileno(), False)
    while relay_proc.stdout.readline().strip() != b"ready":
        if time.monotonic() > deadline or relay_proc.poll() is not None:
            raise RuntimeError("the relay did not start")
        time.sleep(0.02)


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process, then reap them all (a bench must leave none behind)."""
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=5)


def run_baseline(*, duration_s: float = 5.0, concurrency: int = 64, value_size: int = 100,
                 keys: int = 10_000, read_ratio: float = 0.5, warmup_s: float = 1.0,
                 processes: int = 1, sockets: int = 0, seed: int | None = None,
                 progress=None) -> BenchResult:  # type: ignore[no-untyped-def]
    with Baseline() as b:
        return run_bench(b.endpoint, concurrency=concurrency, duration_s=duration_s,
                         keys=keys, value_size=value_size, read_ratio=read_ratio,
                         warmup_s=warmup_s, processes=processes, sockets=sockets, seed=seed,
                         check=False, progress=progress)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--read-ratio", type=float, default=0.5)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--sockets", type=int, default=0)
    p.add_argument("--json", action="store_true")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=["bench", "relay", "worker"], default="bench")
    p.add_argument("--frontend")
    p.add_argument("--backend")
    add_load_arguments(p)
    args = p.parse_args(argv)
    if args.role == "relay":
        relay(args.frontend, args.backend)
        return 0
    if args.role == "worker":
        worker(args.backend)
        return 0
    result = run_baseline(duration_s=args.duration, concurrency=args.concurrency,
                          value_size=args.value_size, keys=args.keys,
                          read_ratio=args.read_ratio, warmup_s=args.warmup,
                          processes=args.processes, sockets=args.sockets)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"relay baseline: {result.ops_s:,.0f} ops/s")
        print(result.format())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
