"""A fake zkv broker for the SDK tests: a thread with a ROUTER that answers from a dict.

``FakeBroker.hook(ident, msg, seen)`` may override the answer to a request: return
``DROP`` to send nothing, a message (or a list of messages / raw frame lists) to send
instead, or ``None`` for the default answer. ``seen`` counts how many times this
(client_id, request_id) arrived, retries included. Writes are deduplicated like a node
does: a retried write gets the reply remembered for its (client_id, request_id).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from zkv.protocol import codec
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    CasReply,
    CasRequest,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    GetReply,
    GetRequest,
    Message,
    PingRequest,
    PongReply,
    PutReply,
    PutRequest,
    StatusReply,
    StatusRequest,
)
from zkv.protocol.ring import RingConfig

DROP = object()
Hook = Callable[[bytes, Any, int], Any]


class FakeBroker:
    def __init__(self, hook: Hook | None = None, broker_id: str = "fake-b0") -> None:
        self.hook = hook
        self.broker_id = broker_id
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.version = 0
        self.received: list[tuple[bytes, Any]] = []
        self.seen: dict[tuple[bytes, int], int] = {}
        self.applied: dict[tuple[bytes, int], Message] = {}
        self.apply_count = 0
        self.status_nodes: tuple[dict[str, Any], ...] = ()
        self.ring: RingConfig | None = RingConfig(1, (0,), 256)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(frames[0], frames[1:])

    def _handle(self, ident: bytes, frames: list[bytes]) -> None:
        msg = codec.decode(frames)
        with self.lock:
            self.received.append((ident, msg))
            key = (getattr(msg, "client_id", b""), msg.request_id)
            self.seen[key] = seen = self.seen.get(key, 0) + 1
        out = self.hook(ident, msg, seen) if self.hook else None
        if out is DROP:
            return
        if out is None:
            out = [self.answer(msg)]
        elif not isinstance(out, list):
            out = [out]
        for item in out:
            reply = item if isinstance(item, list) else codec.encode(item)
            self.sock.send_multipart([ident, *reply])

    def answer(self, msg: Any) -> Message:
        with self.lock:
            if isinstance(msg, (PutRequest, DeleteRequest, CasRequest)):
                key = (msg.client_id, msg.request_id)
                if key not in self.applied:
                    self.applied[key] = self._apply(msg)
                return self.applied[key]
            return self._read(msg)

    def _apply(self, msg: Any) -> Message:
        self.apply_count += 1
        self.version += 1
        if isinstance(msg, PutRequest):
            self.data[msg.key] = (msg.value, self.version)
            return PutReply(msg.request_id, self.version)
        if isinstance(msg, DeleteRequest):
            existed = self.data.pop(msg.key, None) is not None
            return DeleteReply(msg.request_id, existed, self.version)
        current = self.data.get(msg.key, (b"", 0))[1]
        if current != msg.expected_version:
            return CasReply(msg.request_id, False, current)
        self.data[msg.key] = (msg.value, self.version)
        return CasReply(msg.request_id, True, self.version)

    def _read(self, msg: Any) -> Message:
        if isinstance(msg, GetRequest):
            found = self.data.get(msg.key)
            if found is None:
                return GetReply(msg.request_id, False, 0, b"")
            return GetReply(msg.request_id, True, found[1], found[0])
        if isinstance(msg, StatusRequest):
            return StatusReply(msg.request_id, self.broker_id, self.status_nodes, self.ring)
        if isinstance(msg, PingRequest):
            return PongReply(msg.request_id, self.broker_id)
        return ErrorReply(msg.request_id, ErrorCode.BAD_REQUEST, "unexpected")

    def requests(self, kind: type) -> list[Any]:
        with self.lock:
            return [m for _, m in self.received if isinstance(m, kind)]


@pytest.fixture
def broker() -> Any:
    with FakeBroker() as b:
        yield b


def wait_for(cond: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_fake_broker_answers_raw_zmq(broker: FakeBroker) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 2000)
    s.connect(broker.endpoint)
    try:
        s.send_multipart(codec.encode(PingRequest(b"c" * 16, 7)))
        reply = codec.decode(s.recv_multipart())
        assert reply == PongReply(7, "fake-b0")
    finally:
        s.close()
