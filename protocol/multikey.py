"""Batches (mget, mset, mdelete) and prefix scans: the messages, validated by the codec.

Flows (``broker/fanout.py`` has the rules of the split and the merge):

  client -> broker : MultiGetRequest | MultiPutRequest | MultiDeleteRequest | ScanRequest
  broker -> leader of each shard concerned, all at once: the same type, with the keys
                    that shard owns under the broker's ring (a scan goes to every shard),
                    under a fan-out ident of the broker's (``FANOUT_MAGIC``)
  leader -> broker : MultiReply | ScanReply (or ErrorReply), merged by the broker
  broker -> client : one MultiReply | ScanReply

A batch is atomic per shard only: each shard applies its part as one log entry (all of
its keys or none), but shards apply their parts independently, so a reader may see
one shard's part of an ``mset`` before another's, and a part may fail while another
succeeds. Results are per key (``KeyResult``): ``code`` 0 or the ``ErrorCode`` for that
key (``WRONG_SHARD``, ``NO_LEADER``, ``UNAVAILABLE``... are retryable: the SDK asks
again for those keys only, with the same request id for writes, so the shard that
already applied its part answers from its session table).

A scan page: keys in byte order strictly after ``after`` (None: from the start) that
start with ``prefix``, at most ``limit``. A shard answers only keys it owns under its
own ring, in order, and says how far it looked (``next_after``: every key up to it was
reported; None: nothing more). The broker merges the shards' pages (k-way) and keeps
only keys up to the smallest ``next_after``, so its ``next_after`` is a cursor: the next
page starts strictly after it. Every page is linearizable per shard and was answered by
shards that all used the same ring epoch (``epoch``), so each key had exactly one owner.
"""

from __future__ import annotations

from typing import ClassVar

from zkv.protocol.messages import Consistency
from zkv.protocol.record import record
from zkv.protocol.ring import RingConfig

#: Fan-out sub-requests go to nodes under a client ident that starts with these bytes
#: (after the role stamp when secure): replies under it are the broker's to merge. A
#: ROUTER-made client ident starts with 0x00, so none can collide.
FANOUT_MAGIC = b"\xffzkvF"


@record
class KeyResult:
    """One key's outcome. ``code`` 0: done; else an ``ErrorCode`` for this key only.
    ``found``: get: the key exists; delete: it was deleted; put: True."""

    code: int = 0
    found: bool = False
    version: int = 0
    value: bytes = b""


@record
class MultiGetRequest:
    TYPE: ClassVar[int] = 100
    client_id: bytes
    request_id: int
    keys: tuple[bytes, ...]
    consistency: Consistency = Consistency.LINEARIZABLE


@record
class MultiPutRequest:
    """``keys[i]`` gets ``values[i]``; per shard one log entry (atomic per shard)."""

    TYPE: ClassVar[int] = 101
    client_id: bytes
    request_id: int
    lowest_pending: int
    keys: tuple[bytes, ...]
    values: tuple[bytes, ...]


@record
class MultiDeleteRequest:
    TYPE: ClassVar[int] = 102
    client_id: bytes
    request_id: int
    lowest_pending: int
    keys: tuple[bytes, ...]


@record
class ScanRequest:
    """Keys starting with ``prefix``, strictly after ``after`` (None: from the first)."""

    TYPE: ClassVar[int] = 103
    client_id: bytes
    request_id: int
    prefix: bytes
    after: bytes | None
    limit: int
    keys_only: bool = False
    consistency: Consistency = Consistency.LINEARIZABLE


@record
class MultiReply:
    """``results[i]`` is the outcome for ``keys[i]`` (keys echoed, so a reply is read by
    key: the SDK may have asked again for fewer keys meanwhile). ``ring``: the node's
    ring when it refused a key as another shard's (the broker adopts it if newer)."""

    TYPE: ClassVar[int] = 110
    request_id: int
    keys: tuple[bytes, ...]
    results: tuple[KeyResult, ...]
    ring: RingConfig | None = None


@record
class ScanReply:
    """One page: ``keys`` ascending with their ``values`` (empty with ``keys_only``) and
    ``versions``; ``next_after``: continue strictly after this key (None: done);
    ``epoch``: the ring epoch every answering shard filtered by; ``ring``: a shard's."""

    TYPE: ClassVar[int] = 111
    request_id: int
    keys: tuple[bytes, ...]
    values: tuple[bytes, ...]
    versions: tuple[int, ...]
    next_after: bytes | None
    epoch: int
    ring: RingConfig | None = None


MultiRequest = MultiGetRequest | MultiPutRequest | MultiDeleteRequest
FanOutRequest = MultiRequest | ScanRequest
MULTI_REQUEST_CLASSES: tuple[type, ...] = (MultiGetRequest, MultiPutRequest, MultiDeleteRequest)
FANOUT_REQUEST_CLASSES: tuple[type, ...] = (*MULTI_REQUEST_CLASSES, ScanRequest)
MULTIKEY_MESSAGE_TYPES: tuple[type, ...] = (*FANOUT_REQUEST_CLASSES, MultiReply, ScanReply)
FANOUT_REQUEST_TYPES: frozenset[int] = frozenset(
    c.TYPE for c in FANOUT_REQUEST_CLASSES  # type: ignore[attr-defined]
)


def peek_type(header: bytes) -> int:
    """The message type of an encoded header without unpacking it (-1 if it is not a
    short array starting with a small version and type), so the broker can allow a
    batch header more bytes than a single-key one before paying to unpack it."""
    if len(header) < 3 or header[0] & 0xF0 != 0x90 or header[1] >= 0x80 or header[2] >= 0x80:
        return -1
    return header[2]


def request_bytes(req: MultiRequest) -> int:
    """Keys and values a batch request carries (what ``MULTI_REQUEST_BYTES_MAX`` bounds)."""
    n = sum(map(len, req.keys))
    if isinstance(req, MultiPutRequest):
        n += sum(map(len, req.values))
    return n
