"""The broker's Prometheus metrics: per-batch tallies and the snapshot published each
heartbeat (``zkv-broker --metrics-port``; the machinery is ``protocol/metrics.py``).

Theory of operation:

- The broker never decodes a reply, so it cannot pair a reply with its request. It
  times requests per batch instead: ``InflightTimer`` keeps, per node, a FIFO of
  ``[sent_at, items]`` for every forward (a ``RequestBatch`` is one entry), and each
  reply or ``ReplyBatch`` from that node retires that many items from the head, each
  observed at ``now - sent_at``. Rule: the latency *sum* (so the mean) is exact as long
  as every request gets one reply, whatever order the node answers in, because every
  item is retired once at its reply time; the distribution is exact when the node
  answers in order (it does for writes, which commit in log order) and is otherwise a
  reshuffle between requests in flight together. ``now`` is the loop's one clock read:
  the frontend receive and the reply forward of the same loop turn.
- A node that dies leaves items that no reply will retire; ``expire`` drops entries
  older than ``max_age_s`` (the client gave up long ago) and counts them as ``lost``, so
  one dead node skews the FIFO for at most that long. Each FIFO holds at most
  ``ENTRIES_MAX`` entries (oldest dropped as lost): the timer cannot grow the broker.
- In flight = items forwarded and not yet retired, summed over nodes.
- Requests by op are counted in the router (one dict update beside the msgpack unpack
  and blake3 each request costs there), and the broker's own answers by error code.
Pure: no clock, no sockets; the shell passes ``now``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    ADMIN_REQUEST_TYPES,
    CasRequest,
    DeleteRequest,
    ExpireRequest,
    GetRequest,
    PersistRequest,
    PingRequest,
    PutRequest,
    PutTtlRequest,
    StatusRequest,
    TtlRequest,
)
from zkv.protocol.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS_S,
    BucketTally,
    Family,
    SnapshotCollector,
    Tally,
    counter,
    gauge,
)
from zkv.protocol.multikey import (
    MultiDeleteRequest,
    MultiGetRequest,
    MultiPutRequest,
    ScanRequest,
)
from zkv.protocol.watch import WatchRequest

ENTRIES_MAX = 100_000
#: Forwards older than this with no reply are dropped as lost (clients time out sooner).
MAX_AGE_S = 30.0
OP_NAMES = {
    GetRequest.TYPE: "get", PutRequest.TYPE: "put", DeleteRequest.TYPE: "delete",
    CasRequest.TYPE: "cas", PingRequest.TYPE: "ping", StatusRequest.TYPE: "status",
    **dict.fromkeys(ADMIN_REQUEST_TYPES, "admin"),
    MultiGetRequest.TYPE: "mget", MultiPutRequest.TYPE: "mset",
    MultiDeleteRequest.TYPE: "mdelete", ScanRequest.TYPE: "scan",
    PutTtlRequest.TYPE: "put", ExpireRequest.TYPE: "expire", PersistRequest.TYPE: "expire",
    TtlRequest.TYPE: "ttl", WatchRequest.TYPE: "watch",
}  # fmt: skip


class InflightTimer:
    """Per-node FIFOs of forwarded batches, retired by replies (see the module doc)."""

    __slots__ = ("_fifos", "latency", "in_flight", "lost", "entries_max")

    def __init__(self, entries_max: int = ENTRIES_MAX) -> None:
        self._fifos: dict[bytes, deque[list[float]]] = {}
        self.latency = BucketTally(LATENCY_BUCKETS_S)
        self.in_flight = 0
        self.lost = 0
        self.entries_max = entries_max

    def sent(self, node: bytes, items: int, now: float) -> None:
        fifo = self._fifos.get(node)
        if fifo is None:
            fifo = self._fifos[node] = deque()
        elif len(fifo) >= self.entries_max:
            _, n = fifo.popleft()
            self.lost += int(n)
            self.in_flight -= int(n)
        fifo.append([now, items])
        self.in_flight += items

    def answered(self, node: bytes, items: int, now: float, observe: bool = True) -> None:
        """Retire ``items`` from ``node``'s head; replies beyond what is known (a FIFO
        expired or never seen) are ignored."""
        fifo = self._fifos.get(node)
        observe_at = self.latency.observe
        while items > 0 and fifo:
            head = fifo[0]
            take = min(items, int(head[1]))
            if observe:
                observe_at(max(0.0, now - head[0]), take)
            items -= take
            self.in_flight -= take
            if take == head[1]:
                fifo.popleft()
            else:
                head[1] -= take

    def expire(self, now: float, max_age_s: float = MAX_AGE_S) -> None:
        for node, fifo in list(self._fifos.items()):
            while fifo and now - fifo[0][0] > max_age_s:
                _, n = fifo.popleft()
                self.lost += int(n)
                self.in_flight -= int(n)
            if not fifo:
                del self._fifos[node]


class BrokerStats:
    """What the broker counts; ``collector`` is set when ``/metrics`` is served."""

    def __init__(self) -> None:
        self.collector: SnapshotCollector | None = None
        self.timer = InflightTimer()
        self.batch_items = BucketTally(BATCH_BUCKETS)
        self.relayed = 0  # replies from nodes forwarded to clients
        self.leader_changes = 0
        self.campaigns = 0

    def publish(self, router: Any, table: Any, replies_dropped: int, rerouted: int) -> None:
        if self.collector is not None:
            self.collector.publish(self.families(router, table, replies_dropped, rerouted))

    def families(self, router: Any, table: Any, replies_dropped: int, rerouted: int) -> list[Family]:
        ops = Tally()
        for kind, n in router.op_counts.items():
            ops.add((OP_NAMES.get(kind, "other"),), n)
        answers = Tally()
        answers.add(("relayed",), self.relayed)
        for code, n in router.error_counts.items():
            try:
                answers.add((ErrorCode(code).name.lower(),), n)
            except ValueError:
                answers.add((f"error_{code}",), n)
        answers.add(("dropped",), replies_dropped)
        timer = self.timer
        leaders = sum(1 for v in table.leaders.values() if v)
        return [
            ops.family("zkv_broker_requests", "Client requests received, by op", ("op",)),
            answers.family("zkv_broker_replies", "Replies to clients, by result: relayed "
                           "from a node, an error the broker answered itself, or dropped "
                           "(client gone)", ("result",)),
            timer.latency.family("zkv_broker_request_duration_seconds", "Frontend receive "
                                 "to reply forwarded, timed per forwarded batch"),
            self.batch_items.family("zkv_broker_forward_batch_requests", "Requests per "
                                    "message forwarded to a node"),
            gauge("zkv_broker_requests_in_flight", "Requests forwarded and not yet answered",
                  timer.in_flight),
            counter("zkv_broker_requests_lost", "Forwarded requests no reply came back for "
                    "within the timer's bound", timer.lost),
            counter("zkv_broker_rerouted", "Requests a node handed back and the broker "
                    "forwarded to another shard", rerouted),
            counter("zkv_broker_leader_changes", "Shard leader changes seen in heartbeats",
                    self.leader_changes),
            counter("zkv_broker_elections_requested", "Campaign requests sent to nodes of "
                    "leaderless shards", self.campaigns),
            gauge("zkv_broker_nodes", "Storage nodes heard from", len(table.nodes)),
            gauge("zkv_broker_shards_with_leader", "Shards with a live leader", leaders),
            gauge("zkv_broker_ring_epoch", "Ring epoch in force",
                  table.ring.config.epoch if table.ring is not None else 0),
        ]
