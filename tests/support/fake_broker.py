"""A fake zkv broker on a real socket: ``FakeBrokerCore`` behind a ROUTER in a thread.

For the process-level tests that need real TCP (the bench's raw zmq generator, the SDK's
zmq edges); the unit tests use the same core in memory (``tests/support/fake_transport.py``,
which also documents the ``hook`` and ``DROP``).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import zmq

from tests.support.fake_transport import DROP, FakeBrokerCore, Hook
from zkv.protocol.messages import Message

__all__ = ["DROP", "FakeBroker", "broker"]


class FakeBroker(FakeBrokerCore):
    def __init__(self, hook: Hook | None = None, broker_id: str = "fake-b0") -> None:
        super().__init__(hook, broker_id)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.lock = threading.RLock()
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
                with self.lock:
                    replies = self.handle(frames[0], frames[1:])
                for reply in replies:
                    self.sock.send_multipart([frames[0], *reply])

    def answer(self, msg: Any) -> Message:
        with self.lock:  # re-entrant from a hook: answered under the same lock
            return super().answer(msg)

    def requests(self, kind: type) -> list[Any]:
        with self.lock:
            return super().requests(kind)


@pytest.fixture
def broker() -> Any:
    with FakeBroker() as b:
        yield b
