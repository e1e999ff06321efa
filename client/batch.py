"""The SDK's rules for batches and scans, shared by the sync and asyncio clients. Pure.

A batch call (``mget``, ``mset``, ``mdelete``) runs in rounds. Each round sends one
request for the keys still pending (the broker splits it per shard and answers per
key); ``absorb`` files each key's result: done (code 0), to ask again (a retryable
code: ``WRONG_SHARD`` after a ring change, ``NO_LEADER`` during an election,
``UNAVAILABLE`` while a range is fenced or a reply was full...), or failed (any other
code: the call raises that error). Rounds back off like single calls
(``retry.backoff_s``) until the deadline, then raise ``Timeout`` naming how many keys
are left. A write's rounds all carry the same request id, so a shard that applied its
part and whose answer was lost answers again from its session table, and no key is
written twice. A batch is atomic per shard only: see ``protocol/multikey.py``.

A scan page's cursor is the key it ended after (``ScanPage.cursor``); a page may be
empty and still have a cursor (the shards looked that far and found nothing owned),
so iterate until the cursor is None (``scan_iter`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zkv.protocol.errors import (
    RETRYABLE_CODES,
    ErrorCode,
    KVError,
    TooLarge,
    error_for_code,
)
from zkv.protocol.limits import MULTI_KEYS_MAX, MULTI_REQUEST_BYTES_MAX, SCAN_LIMIT_MAX
from zkv.protocol.multikey import KeyResult, MultiReply, ScanReply

#: Items a scan page holds when the caller does not say (at most ``SCAN_LIMIT_MAX``).
SCAN_PAGE_DEFAULT = 100


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One page of a scan: ``keys`` in byte order, their ``values`` (empty lists with
    ``keys_only``) and ``versions``; pass ``cursor`` to the next ``scan`` (None: done)."""

    keys: list[bytes]
    values: list[bytes]
    versions: list[int]
    cursor: bytes | None

    def items(self) -> list[tuple[bytes, bytes]]:
        values = self.values or [b""] * len(self.keys)
        return list(zip(self.keys, values, strict=True))

    @classmethod
    def from_reply(cls, reply: ScanReply) -> ScanPage:
        return cls(list(reply.keys), list(reply.values), list(reply.versions), reply.next_after)


@dataclass(slots=True)
class BatchState:
    """Keys of a batch call still pending and the results so far."""

    pending: list[bytes]
    results: dict[bytes, KeyResult] = field(default_factory=dict)
    last_code: int = 0
    rounds: int = 0

    @classmethod
    def start(cls, keys: list[bytes], values: list[bytes] | None = None) -> BatchState:
        """Check the batch's bounds (``TooLarge``); a key given twice is asked once."""
        unique = list(dict.fromkeys(keys))
        if len(unique) > MULTI_KEYS_MAX:
            raise TooLarge(f"{len(unique)} keys in one batch; the limit is {MULTI_KEYS_MAX}")
        size = sum(map(len, unique)) + (sum(map(len, values)) if values else 0)
        if size > MULTI_REQUEST_BYTES_MAX:
            raise TooLarge(f"batch of {size} bytes; the limit is {MULTI_REQUEST_BYTES_MAX}")
        return cls(unique)

    def absorb(self, reply: MultiReply) -> KVError | None:
        """File a round's per-key results; the error to raise if a key failed for good.
        Keys the reply does not name (or no longer pending) are left as they are."""
        pending = set(self.pending)
        self.rounds += 1
        for key, result in zip(reply.keys, reply.results, strict=False):
            if key not in pending:
                continue
            if result.code == 0:
                self.results[key] = result
            elif result.code in RETRYABLE_CODES:
                self.last_code = result.code
            else:
                return error_for_code(result.code, f"key {key[:64]!r}: {_name(result.code)}")
        self.pending = [k for k in self.pending if k not in self.results]
        return None

    def timeout_message(self) -> str:
        return (f"{len(self.pending)} keys of the batch still unanswered after "
                f"{self.rounds} rounds (last: {_name(self.last_code)})")


def check_limit(limit: int) -> int:
    if type(limit) is not int or not 1 <= limit <= SCAN_LIMIT_MAX:
        raise ValueError(f"limit must be an int in 1..{SCAN_LIMIT_MAX}")
    return limit


def _name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
