"""Messages of keys that expire (TTL): types 120-129.

A TTL travels as whole milliseconds (``ttl_ms``), relative: the client's clock never
enters the store. The shard leader turns it into an absolute wall-clock deadline
(its clock + ``ttl_ms``) when it proposes the write, and that deadline is what the log,
the snapshots and migration batches carry (``storage_node/expiry.py``).

- ``PutTtlRequest`` stores a value that expires ``ttl_ms`` from now; answered by
  ``PutReply`` like a put (a plain put or a CAS stores a value with no expiry).
- ``ExpireRequest`` gives an existing key a new expiry; ``PersistRequest`` removes its
  expiry. Both answer ``ExpireReply``: ``found`` (False: the key does not exist or
  already expired, nothing changed) and the key's version, which neither changes: a
  version names a value, and these change only when the value goes away.
- ``TtlRequest`` reads a key's remaining time: ``TtlReply`` with ``found``, the
  version, ``expires`` (False: no expiry) and ``ttl_ms`` (the remaining milliseconds at
  the serving node, >= 1, when ``expires``).

Every request puts ``key`` at header position 4 like the other data requests, so the
broker routes it by key (``DATA_REQUEST_TYPES``).
"""

from __future__ import annotations

from typing import ClassVar

from zkv.protocol.consistency import Consistency
from zkv.protocol.record import record

#: The longest TTL accepted (about 10 years): a deadline must stay far from the codec's
#: integer bound, and a larger TTL is a client bug.
TTL_MS_MAX = 10 * 365 * 24 * 3600 * 1000


@record
class PutTtlRequest:
    TYPE: ClassVar[int] = 120
    BLOB: ClassVar[str] = "value"
    client_id: bytes
    request_id: int
    key: bytes
    lowest_pending: int
    ttl_ms: int
    value: bytes


@record
class ExpireRequest:
    TYPE: ClassVar[int] = 121
    client_id: bytes
    request_id: int
    key: bytes
    lowest_pending: int
    ttl_ms: int


@record
class PersistRequest:
    TYPE: ClassVar[int] = 122
    client_id: bytes
    request_id: int
    key: bytes
    lowest_pending: int


@record
class TtlRequest:
    TYPE: ClassVar[int] = 123
    client_id: bytes
    request_id: int
    key: bytes
    consistency: Consistency = Consistency.LINEARIZABLE


@record
class ExpireReply:
    TYPE: ClassVar[int] = 124
    request_id: int
    found: bool
    version: int


@record
class TtlReply:
    TYPE: ClassVar[int] = 125
    request_id: int
    found: bool
    version: int
    expires: bool
    ttl_ms: int


TTL_WRITE_CLASSES = (PutTtlRequest, ExpireRequest, PersistRequest)
TTL_REQUEST_CLASSES = (*TTL_WRITE_CLASSES, TtlRequest)
TTL_REPLY_CLASSES = (ExpireReply, TtlReply)
TtlWriteRequest = PutTtlRequest | ExpireRequest | PersistRequest
