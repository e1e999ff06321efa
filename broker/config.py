"""The broker's settings and the bounds they default to (declarative).

Every queue and batch the broker keeps has a bound here; ``BrokerConfig`` checks the
relations between settings (``check_timing``: the election timeout against the
heartbeat interval) when it is built, so a bad combination fails at start, not later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zkv.broker.failure_detector import check_timing
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS

#: Messages taken from one socket per wake-up before looking at the others.
BATCH_MAX = 256
#: Requests per RequestBatch: big enough to amortize a message, small enough that the
#: node starts working while the broker is still draining (the two overlap on 2 cores).
FORWARD_BATCH_MAX = 32
#: Per-pipe queue bound towards and from each node, in messages (a RequestBatch of up to
#: FORWARD_BATCH_MAX requests is one). About a second of a node's work: queueing more
#: only turns into client timeouts, while a full pipe answers UNAVAILABLE at once.
#: (100,000 let a flood of clients grow the broker by 500 MB.)
HWM = 1_000
#: Per-client queue bound on the frontend, both directions. A client that stops reading
#: holds at most this many replies in the broker; later replies to it are dropped (it
#: sees timeouts), so no client can grow the broker (Redis's client-output-buffer-limit).
#: Well above any in-flight window the SDK or `zkv bench` uses (<= 256 per socket).
CLIENT_QUEUE_MAX = 1_000


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    broker_id: str
    frontend: str = "tcp://*:5555"
    backend: str = "tcp://*:5556"
    heartbeats: str = "tcp://*:5557"
    heartbeat_ms: int = HEARTBEAT_MS
    election_timeout_ms: int = ELECTION_TIMEOUT_MS
    key_bytes_max: int = KEY_BYTES_MAX
    value_bytes_max: int = VALUE_BYTES_MAX
    batch_max: int = BATCH_MAX
    hwm: int = HWM
    client_queue_max: int = CLIENT_QUEUE_MAX
    #: a ``zkv keys generate`` dir: Curve on every socket, keys checked by ZAP
    keys_dir: Path | None = None

    def __post_init__(self) -> None:
        check_timing(self.heartbeat_ms, self.election_timeout_ms)
        if self.batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        if self.client_queue_max < 1:
            raise ValueError("client_queue_max must be >= 1")
