"""Watch messages: types 130-139, and the resume token.

Flows:

  client -> broker : WatchRequest(shard=s, ...)   routed by shard id (header position 4),
                                                  like an admin request, to s's leader
  leader -> client : WatchReply                    (through the broker)

A watcher polls each shard of the ring: "the events after revision ``after`` whose key
starts with ``prefix`` (equals it, with ``exact``)". A shard's revision is its log index;
every replica records the same events under the same revisions
(``storage_node/watch_history.py``), so the answer does not depend on which replica
gives it. The node answers at once when it has matching events; else it holds the poll
up to ``wait_ms`` (capped at ``WATCH_WAIT_MS_MAX``) and answers as soon as one applies,
or empty when the wait ends. Nothing is ever pushed: a slow watcher only polls less
often, and no writer waits for it.

``WatchReply.revision``: every matching event up to this revision is in the reply (a
page never splits a revision), so the next poll asks ``after=revision``. With
``compacted``, the history no longer reaches back to ``after``: ``revision`` is the
oldest revision a watcher may resume from, after re-reading the keys (etcd's
ErrCompacted).

The resume token is the revision per shard, written ``"0:17,1:9"`` (the client's
``client/watch.py``; ``"0:16+2"``: after the first 2 events of shard 0's next
revision, for a token taken in the middle of a batch).
"""

from __future__ import annotations

from typing import ClassVar

from zkv.protocol.errors import KVError
from zkv.protocol.limits import INT_MAX
from zkv.protocol.record import record

#: Events and bytes (keys + values) per reply, and the longest a poll is held.
WATCH_LIMIT_MAX = 1000
WATCH_REPLY_BYTES_MAX = 4 * 1024 * 1024
WATCH_WAIT_MS_MAX = 10_000

KIND_NAMES = ("put", "delete", "expire")
#: ``after`` meaning "from now": the reply is at once, empty, with the revision the
#: replica has applied (every write acknowledged before it is at or below it).
WATCH_FROM_NOW = INT_MAX


@record
class WatchEvent:
    revision: int
    kind: int  # 0 put, 1 delete, 2 expire (``KIND_NAMES``)
    key: bytes
    value: bytes
    version: int


@record
class WatchRequest:
    TYPE: ClassVar[int] = 130
    client_id: bytes
    request_id: int
    shard: int
    prefix: bytes
    exact: bool
    after: int
    limit: int
    wait_ms: int


@record
class WatchReply:
    TYPE: ClassVar[int] = 131
    request_id: int
    shard: int
    events: tuple[WatchEvent, ...]
    revision: int
    compacted: bool = False


WATCH_MESSAGE_TYPES: tuple[type, ...] = (WatchRequest, WatchReply)


class WatchCompacted(KVError):
    """The history of a shard no longer reaches back to the watcher's token: re-read the
    keys, then watch again from ``token`` (the oldest revisions still held)."""

    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.token = token
