"""``protocol/drain.py``: a drain asks whether another message waits instead of
receiving until ``zmq.Again``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zkv.protocol.drain import more_waiting


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    server.bind("inproc://drain")
    client.connect("inproc://drain")
    yield server, client
    server.close(0)
    client.close(0)
    ctx.term()


def _wait_for_input(sock: zmq.Socket[Any]) -> None:
    assert sock.poll(2000, zmq.POLLIN), "the message did not arrive"


def test_an_empty_socket_has_nothing_waiting(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    server, _ = pair
    assert more_waiting(server) is False


def test_a_lone_message_read_whole_leaves_nothing_waiting(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    server, client = pair
    client.send_multipart([b"header", b"value"])
    _wait_for_input(server)
    assert more_waiting(server) is True
    assert server.recv_multipart(zmq.NOBLOCK)[1:] == [b"header", b"value"]
    assert more_waiting(server) is False  # the drain ends here, no zmq.Again raised
    with pytest.raises(zmq.Again):
        server.recv(zmq.NOBLOCK)


def test_a_second_message_is_seen_waiting_after_the_first(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    server, client = pair
    client.send(b"one")
    client.send(b"two")
    _wait_for_input(server)
    deadline = time.monotonic() + 2
    server.recv_multipart(zmq.NOBLOCK)
    while not more_waiting(server):  # inproc delivers both at once; allow a moment
        assert time.monotonic() < deadline, "the second message was not seen waiting"
        time.sleep(0.001)
    assert server.recv_multipart(zmq.NOBLOCK)[1] == b"two"
    assert more_waiting(server) is False
