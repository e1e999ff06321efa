"""The broker's memory stays bounded when clients send requests and never read replies.

Before the per-client reply bound, each client pipe on the frontend queued up to 100,000
replies, so a handful of clients that never read grew the broker by hundreds of MB (3 GB
in a longer run). Now a client that stops reading loses its replies (it sees timeouts),
and the broker keeps at most ``client_queue_max`` replies per client.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.process.test_broker_process import (  # noqa: F401 -- fixtures
    BrokerProcess,
    Client,
    broker,
    ctx,
    get,
    is_get_reply,
    nodes,
)
from zkv.protocol import codec
from zkv.protocol.messages import GetRequest, Role

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

FLOODERS = 8
REQUESTS_EACH = 25_000
KEY_BYTES = 1000  # the fake node echoes the key, so each reply is ~1 KB
#: The documented bound for this set-up: per client 1,000 queued replies and 1,000
#: unread requests (8 x 2 x 1,000 x ~1 KB = 16 MB), per node pipe 1,000 messages of up
#: to 32 batched requests each way (2 x 32 MB), plus allocator slack. Measured: ~58 MB.
#: Unbounded (100,000 per pipe), the same flood grew the broker by 510 MB.
RSS_GROWTH_BYTES_MAX = 100 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_clients_that_never_read_cannot_grow_the_broker(
    broker: BrokerProcess, ctx: Any, nodes: Any  # noqa: F811 -- the imported fixtures
) -> None:
    nodes(broker, "s0r0", Role.LEADER)
    probe = Client(ctx, broker.frontend)
    probe.until(get(b"warm"), is_get_reply, timeout_s=5)
    assert broker.proc is not None
    pid = broker.proc.pid
    before = rss_bytes(pid)

    flooders = []
    for _ in range(FLOODERS):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 10)  # the client itself buffers almost nothing
        s.setsockopt(zmq.SNDHWM, REQUESTS_EACH)
        s.connect(broker.frontend)
        flooders.append(s)
    key = b"k" * KEY_BYTES
    peak = before
    deadline = time.monotonic() + 60
    for n in range(REQUESTS_EACH):
        for i, s in enumerate(flooders):
            s.send_multipart(codec.encode(GetRequest(b"flood%d" % i, n + 1, key)))
        if n % 1000 == 0:
            peak = max(peak, rss_bytes(pid))
            assert time.monotonic() < deadline, "flood did not finish in time"
    # Let the broker and the fake node work through what was sent.
    settle_until = time.monotonic() + 8
    while time.monotonic() < settle_until:
        peak = max(peak, rss_bytes(pid))
        time.sleep(0.1)

    growth = peak - before
    print(f"broker RSS growth under the flood: {growth / 1e6:.1f} MB")
    assert growth < RSS_GROWTH_BYTES_MAX, f"broker grew by {growth / 1e6:.0f} MB"
    # A well-behaved client is still served, during and after the flood.
    reply, _ = probe.until(get(b"after"), is_get_reply, timeout_s=5)
    assert reply.found
    for s in flooders:
        s.close(linger=0)
    reply, _ = probe.until(get(b"closed"), is_get_reply, timeout_s=5)
    assert reply.found
    assert broker.alive()
