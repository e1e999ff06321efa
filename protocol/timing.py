"""The cluster's default timing: how often nodes heartbeat and how long silence means a
dead leader. Broker, node, replica core, local cluster and benchmarks all start here.

Why 700 ms and not etcd's 1000 ms: a leader killed mid-load is replaced after one
election timeout of silence (the brokers' failure detector and the followers' lease both
wait that long), plus up to one heartbeat until the next campaign is sent, plus a
pre-vote, a vote and the new leader's first commit (~50-150 ms on loopback): with 700 ms
the first write after a SIGKILL is acknowledged within 1 s (``make bench-failover``:
p99 851 ms over 20 trials, against 1,174 ms at 1000 ms). Seven heartbeats of silence
still separate a slow leader from a dead one: a 10-minute full-load run of 2 x 3 on two
cores had no election (README, "make bench-failover"). Raise it (``--election-timeout-ms``
on every broker and node alike) where loops can stall longer, e.g. heavily overcommitted
hosts; it must stay >= 3 x the heartbeat.
"""

from __future__ import annotations

HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 700
