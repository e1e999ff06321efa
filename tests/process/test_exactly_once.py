"""Invariant 4 through the real SDK and real processes: a retried write is applied once.

A small zmq proxy sits between a ``KVClient`` and the broker (a ROUTER facing the client,
one DEALER per client connection facing the broker). It drops the FIRST reply to a
``PutRequest`` (so the write was applied but the client never hears of it), then holds
back the client's retries until the test lets them through. Meanwhile a second client,
connected straight to the broker, writes another value to the same key. When the retry
(same client id, same request id: checked on the frames the proxy saw) finally reaches
the shard, it must be answered from the session table with the version of the first
application, and the key must keep the second client's value. Had the retry been
applied again, the key would hold the first value at a newer version.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol import codec
from zkv.protocol.errors import KVError, RemoteProtocolError
from zkv.protocol.messages import PutReply, PutRequest

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 600


@dataclass
class SeenPut:
    client_id: bytes
    request_id: int
    key: bytes
    value: bytes
    forwarded: bool


@dataclass
class DropFirstPutReply:
    """The proxy: see the module docstring. Runs in its own thread until ``close``."""

    broker_endpoint: str
    ctx: zmq.Context[Any] = field(default_factory=zmq.Context)
    endpoint: str = ""
    puts: list[SeenPut] = field(default_factory=list)
    dropped: PutReply | None = None
    dropped_event: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    replies_after_release: list[Any] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._front = self.ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.bind("tcp://127.0.0.1:*")
        self.endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.ctx.destroy(linger=0)

    def _run(self) -> None:
        backs: dict[bytes, zmq.Socket[Any]] = {}  # client connection -> DEALER to broker
        idents: dict[zmq.Socket[Any], bytes] = {}
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(50):
                    frames = sock.recv_multipart()
                    if sock is self._front:
                        self._from_client(frames, backs, idents, poller)
                    else:
                        self._from_broker(idents[sock], frames)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            for s in [self._front, *backs.values()]:
                s.close(linger=0)

    def _from_client(self, frames: list[bytes], backs: dict[bytes, zmq.Socket[Any]],
                     idents: dict[zmq.Socket[Any], bytes], poller: zmq.Poller) -> None:
        ident, body = frames[0], frames[1:]
        held = self.dropped_event.is_set() and not self.release.is_set()
        with contextlib.suppress(RemoteProtocolError):
            msg = codec.decode(body)
            if isinstance(msg, PutRequest):
                self.puts.append(SeenPut(msg.client_id, msg.request_id, msg.key, msg.value,
                                         not held))
        if held:
            return  # the retry waits until the test has written the other value
        back = backs.get(ident)
        if back is None:
            back = self.ctx.socket(zmq.DEALER)
            back.setsockopt(zmq.LINGER, 0)
            back.connect(self.broker_endpoint)
            backs[ident] = back
            idents[back] = ident
            poller.register(back, zmq.POLLIN)
        back.send_multipart(body)

    def _from_broker(self, ident: bytes, frames: list[bytes]) -> None:
        reply: Any = None
        with contextlib.suppress(RemoteProtocolError):
            reply = codec.decode(frames)
        if isinstance(reply, PutReply) and self.dropped is None:
            self.dropped = reply  # the write was applied; the client never learns it
            self.dropped_event.set()
            return
        if self.release.is_set():
            self.replies_after_release.append(reply)
        self._front.send_multipart([ident, *frames])


@contextlib.contextmanager
def proxy_to(endpoint: str) -> Iterator[DropFirstPutReply]:
    p = DropFirstPutReply(endpoint)
    try:
        yield p
    finally:
        p.close()


def _wait_leader(cluster: LocalCluster, timeout_s: float = 60.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(KVError):
            rows = [n for n in cluster.status()["nodes"]
                    if n["role"] == 2 and n.get("live", True)]
            if rows:
                best = max(rows, key=lambda n: n["term"])
                return best["node_id"], best["term"]
        assert time.monotonic() < deadline, "no leader"
        time.sleep(0.1)


def _run_scenario(cluster: LocalCluster, kill_leader: bool) -> None:
    leader, _ = _wait_leader(cluster)
    key = "exactly-once"
    with proxy_to(cluster.endpoints[0]) as proxy, \
            KVClient([proxy.endpoint], timeout_s=60, attempt_timeout_s=0.5) as first, \
            KVClient(cluster.endpoints, timeout_s=30) as second, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        first.ping()  # connections up before the timed part
        retried_put = pool.submit(first.put, key, "first")
        assert proxy.dropped_event.wait(30), f"no PutReply seen by the proxy ({proxy.error!r})"
        assert proxy.dropped is not None
        v_first = proxy.dropped.version
        if kill_leader:
            cluster.kill_node(leader)
        v_second = second.put(key, "second")  # straight to the broker, not held
        assert v_second > v_first
        # Let at least one retry be held back, so we know the SDK really retried.
        deadline = time.monotonic() + 10
        while not any(not p.forwarded for p in proxy.puts):
            assert time.monotonic() < deadline, "the SDK never retried"
            time.sleep(0.05)
        proxy.release.set()
        v_retry = retried_put.result(timeout=60)
        assert proxy.error is None, proxy.error
        puts = [p for p in proxy.puts if p.key == key.encode()]
        assert len(puts) >= 2, puts
        assert {(p.client_id, p.request_id) for p in puts} == {(first.client_id, puts[0].request_id)}
        assert any(p.forwarded for p in puts[1:]), "no retry reached the broker"
        assert v_retry == v_first, (
            f"the retry was answered with version {v_retry}, the first application had "
            f"{v_first}: the write was applied twice")
        assert second.get_versioned(key) == (b"second", v_second), (
            "the retried put overwrote the later write: it was applied twice")
        if kill_leader:
            new_leader, _ = _wait_leader(cluster)
            assert new_leader != leader
            cluster.restart_node(leader)
            assert second.get_versioned(key) == (b"second", v_second)
        print(f"\nfirst application v{v_first}, other client v{v_second}, retry answered "
              f"v{v_retry} after {len(puts) - 1} resend(s)"
              + (f"; leader {leader} SIGKILLed in between" if kill_leader else ""))


def test_retried_put_is_applied_once(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=1, port=0, fsync="always",
                      heartbeat_ms=HEARTBEAT_MS, election_timeout_ms=ELECTION_TIMEOUT_MS) as c:
        c.wait_ready(60)
        _run_scenario(c, kill_leader=False)


def test_retried_put_is_applied_once_across_leader_failover(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, port=0, fsync="always",
                      heartbeat_ms=HEARTBEAT_MS, election_timeout_ms=ELECTION_TIMEOUT_MS) as c:
        c.wait_ready(60)
        _run_scenario(c, kill_leader=True)
