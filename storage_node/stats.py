"""A storage node's Prometheus metrics: plain-int tallies the loop feeds, and the
snapshot it publishes once per heartbeat (``zkv-node --metrics-port``).

Theory of operation (the shared machinery is ``protocol/metrics.py``):

- The shell feeds ``NodeStats`` where it already handles a batch: ``wal_synced`` once
  per group commit (fsync latency, entries written), ``snapshot`` once per snapshot,
  and ``reply`` once per answer queued (one dict update next to the msgpack encode the
  reply costs anyway). ``op`` is the type of the request being handled, set once per
  request, so an error answered at once is counted under its op; an error answered
  later (a step-down failing queued writes) counts under whatever ran last, or ``other``.
- ``RaftTracker`` turns the (term, leader) the node sees at each heartbeat into
  counters: every term the node passes through is one election somewhere in its group,
  and every change to a new known leader is a leader change. Two changes inside one
  heartbeat interval count as one, which is fine for a rate.
- ``publish`` (called from the heartbeat) reads the core, the state machine and the
  leader's migration tasks and hands the families to the collector; nothing is built
  when ``--metrics-port`` is off.
"""

from __future__ import annotations

from typing import Any

from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import (
    ADMIN_REPLY_CLASSES,
    ADMIN_REQUEST_CLASSES,
    CasReply,
    CasRequest,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    ExpireReply,
    ExpireRequest,
    GetReply,
    GetRequest,
    PersistRequest,
    PingRequest,
    PongReply,
    PutReply,
    PutRequest,
    PutTtlRequest,
    Role,
    TtlReply,
    TtlRequest,
)
from zkv.protocol.metrics import (
    BATCH_BUCKETS,
    FSYNC_BUCKETS_S,
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
    MultiReply,
    ScanReply,
    ScanRequest,
)
from zkv.protocol.watch import WatchReply, WatchRequest

OPS: dict[type, str] = {
    GetRequest: "get", PutRequest: "put", DeleteRequest: "delete", CasRequest: "cas",
    PingRequest: "ping",
    GetReply: "get", PutReply: "put", DeleteReply: "delete", CasReply: "cas",
    PongReply: "ping",
    **dict.fromkeys(ADMIN_REQUEST_CLASSES, "admin"),
    **dict.fromkeys(ADMIN_REPLY_CLASSES, "admin"),
    MultiGetRequest: "mget", MultiPutRequest: "mset", MultiDeleteRequest: "mdelete",
    ScanRequest: "scan", MultiReply: "batch", ScanReply: "scan",
    # TTL: a put with a TTL answers PutReply (counted as "put" when it succeeds)
    PutTtlRequest: "put", ExpireRequest: "expire", PersistRequest: "expire",
    TtlRequest: "ttl", ExpireReply: "expire", TtlReply: "ttl",
    WatchRequest: "watch", WatchReply: "watch",
}  # fmt: skip


def result_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return f"error_{code}"


class RaftTracker:
    """Elections and leader changes seen by one replica, from what it shows each
    heartbeat (pure: see the module doc)."""

    __slots__ = ("term", "leader_id", "elections", "leader_changes", "became_leader")

    def __init__(self) -> None:
        self.term: int | None = None
        self.leader_id = ""
        self.elections = 0
        self.leader_changes = 0
        self.became_leader = 0

    def observe(self, term: int, leader_id: str, node_id: str) -> None:
        if self.term is not None and term > self.term:
            self.elections += term - self.term
        if leader_id and leader_id != self.leader_id:
            if self.term is not None or self.leader_id:
                self.leader_changes += 1
            if leader_id == node_id:
                self.became_leader += 1
        self.term = term
        if leader_id:
            self.leader_id = leader_id


class NodeStats:
    """What one node counts; ``collector`` is set when ``/metrics`` is served."""

    def __init__(self) -> None:
        self.collector: SnapshotCollector | None = None
        self.op: type | None = None
        self._replies: dict[Any, int] = {}
        self.fsync_s = BucketTally(FSYNC_BUCKETS_S)
        self.batch_entries = BucketTally(BATCH_BUCKETS)
        self.snapshots = Tally()
        self.snapshot_bytes = Tally()
        self.snapshot_last_bytes = 0
        self.raft = RaftTracker()
        #: loop turns that outlasted one heartbeat interval (stalls: heartbeats and acks
        #: waited), and the longest of them
        self.loop_stalls = 0
        self.loop_stall_longest_s = 0.0

    # ------------------------------------------------------------------ loop side

    def reply(self, reply: object) -> None:
        key: Any = type(reply)
        if key is ErrorReply:
            key = (self.op, reply.code)  # type: ignore[attr-defined]
        replies = self._replies
        replies[key] = replies.get(key, 0) + 1

    def wal_synced(self, fsync_s: float | None, entries: int) -> None:
        """One group commit: ``entries`` written, fsynced in ``fsync_s`` (None: the
        policy did not fsync this time)."""
        if fsync_s is not None:
            self.fsync_s.observe(fsync_s)
        if entries:  # not a truncation alone
            self.batch_entries.observe(entries)

    def snapshot(self, kind: str, nbytes: int) -> None:
        self.snapshots.add((kind,))
        self.snapshot_bytes.add((kind,), nbytes)
        self.snapshot_last_bytes = nbytes

    def loop_stalled(self, seconds: float) -> None:
        """A loop turn outlasted one heartbeat interval."""
        self.loop_stalls += 1
        self.loop_stall_longest_s = max(self.loop_stall_longest_s, seconds)

    def requests(self) -> Tally:
        """The reply tally as (op, result) label tuples."""
        out = Tally()
        for key, n in self._replies.items():
            if type(key) is tuple:
                out.add((OPS.get(key[0], "other"), result_name(key[1])), n)
            else:
                out.add((OPS.get(key, "other"), "ok"), n)
        return out

    # ------------------------------------------------------------------ publishing

    def publish(self, node_id: str, shard: int, core: Any, state: Any, tasks: Any,
                disk_full: bool) -> None:
        """Once per heartbeat: track the term and leader, and when served, publish."""
        self.raft.observe(core.term, core.leader_id, node_id)
        if self.collector is not None:
            self.collector.publish(self.families(node_id, shard, core, state, tasks, disk_full))

    def families(self, node_id: str, shard: int, core: Any, state: Any, tasks: Any,
                 disk_full: bool) -> list[Family]:
        applied = state.applied_index
        raft = self.raft
        out = [
            Family("zkv_node_info", "gauge", "This node: its id and shard",
                   ("node", "shard"), (((node_id, str(shard)), 1.0),)),
            self.requests().family("zkv_node_requests", "Client requests answered, by op "
                                   "and result (ok or the error code)", ("op", "result")),
            gauge("zkv_node_raft_term", "Current Raft term", core.term),
            gauge("zkv_node_raft_role", "0 follower, 1 candidate, 2 leader", int(core.role)),
            gauge("zkv_node_raft_last_index", "Last index in this replica's log", core.last_index),
            gauge("zkv_node_raft_commit_index", "Highest index known committed",
                  core.commit_index),
            gauge("zkv_node_raft_applied_index", "Highest index applied to the state machine",
                  applied),
            gauge("zkv_node_raft_apply_lag_entries", "Committed but not yet applied entries",
                  max(0, core.commit_index - applied)),
            counter("zkv_node_raft_elections", "Terms this replica went through (one "
                    "election each)", raft.elections),
            counter("zkv_node_raft_leader_changes", "Times this replica saw a new leader",
                    raft.leader_changes),
            counter("zkv_node_raft_became_leader", "Times this replica became leader",
                    raft.became_leader),
            self.fsync_s.family("zkv_node_wal_fsync_seconds", "WAL fsync latency per group "
                                "commit"),
            self.batch_entries.family("zkv_node_wal_batch_entries", "Entries written per "
                                      "group commit (one write, at most one fsync)"),
            self.snapshots.family("zkv_node_snapshots", "Snapshots taken here or installed "
                                  "from the leader", ("kind",)),
            self.snapshot_bytes.family("zkv_node_snapshot_bytes", "Bytes of the snapshots "
                                       "counted in zkv_node_snapshots", ("kind",)),
            gauge("zkv_node_snapshot_last_bytes", "Size of the last snapshot",
                  self.snapshot_last_bytes),
            counter("zkv_node_loop_stalls", "Loop turns longer than one heartbeat interval "
                    "(heartbeats and acks waited)", self.loop_stalls),
            gauge("zkv_node_loop_stall_longest_seconds", "The longest of those turns "
                  "(0: none)", self.loop_stall_longest_s),
            gauge("zkv_node_keys", "Keys stored", state.key_count),
            gauge("zkv_node_data_bytes", "Bytes of keys and values stored", state.data_bytes),
            gauge("zkv_node_disk_full", "1 while the disk refuses writes", int(disk_full)),
        ]
        out.extend(_follower_lag(core))
        out.extend(_migration(tasks))
        return out


def _follower_lag(core: Any) -> list[Family]:
    if core.role is not Role.LEADER:
        return []
    matches = core.match_indexes()
    last = core.last_index
    return [
        Family("zkv_node_raft_follower_match_index", "gauge", "Leader only: each follower's match "
               "index", ("peer",), tuple(((p,), float(m)) for p, m in sorted(matches.items()))),
        Family("zkv_node_raft_follower_lag_entries", "gauge", "Leader only: entries each follower is "
               "behind the leader's log", ("peer",),
               tuple(((p,), float(max(0, last - m))) for p, m in sorted(matches.items()))),
    ]


def _migration(tasks: Any) -> list[Family]:
    """Source side of migration: the leader's streams to other shards."""
    pushes = list(tasks.pushes.values()) if tasks is not None else []
    listed = sum(len(p.lister.keys or ()) for p in pushes)
    return [
        gauge("zkv_node_migration_streams", "Migration streams this leader runs",
              sum(1 for p in pushes if p.state in ("listing", "sending"))),
        gauge("zkv_node_migration_keys_listed", "Keys the running streams must move", listed),
        gauge("zkv_node_migration_keys_sent", "Keys the target leaders have applied",
              sum(p.sent_keys for p in pushes)),
        gauge("zkv_node_migration_batches_sent", "Stream batches applied at the targets",
              sum(p.batches for p in pushes)),
    ]
