"""What batches and scans do to, and read from, a shard's state. Pure.

Rules (the state machine calls ``apply_multi_write`` for a MULTI_WRITE entry; the node
calls ``multi_get_reply`` and ``scan_page`` once a read may be served):

- A batch write is one log entry, applied atomically: if any of its keys is not served
  here now (``Ownership.refusal``: another shard's, or fenced for a move), nothing is
  written, nothing is recorded in the session table, and the answer is that refusal for
  the whole part (its retry is applied by the right owner). Otherwise every key is
  written at version ``index + version_offset`` (one entry, one version), each write to
  a leaving key noted for the move like a single write's.
- Exactly once, per key: the part's (client id, request id) goes through the session
  table like a single write, which remembers, per key written under that request id, a
  hash of the key and its result (``sessions.MultiCached``). A retry answers the keys
  already written from there and writes only the others. Why per key and not per part:
  the SDK's next round resends only the keys still pending, split by a newer ring, so
  a shard may see the same request id again with other keys; and a ring change merges
  the source's session table into the target's, so the target may hold a record of
  the same request id for keys written at the source (the records are merged, see
  ``sessions.merge_session_state``). A key written once under a request id is never
  written again under it, wherever it moved.
- Reads (``multi_get_reply``): per key, a refusal code, or found/version/value. Values
  stop at ``MULTI_REPLY_BYTES_MAX`` bytes; keys past it answer ``UNAVAILABLE`` and the SDK
  asks again for them.
- A scan page (``scan_page``): keys with ``prefix`` strictly after ``after``, in byte
  order, that this shard owns under its ring (``WRONG_SHARD`` keys are skipped: copies a
  new owner holds before its ring names it, or leftovers a source has yet to drop). A
  key in the page's range that is fenced (moving right now) makes the page
  ``UNAVAILABLE``: the new owner may take writes to it any moment, so neither side can
  answer for it. The page ends at ``limit`` keys, ``SCAN_REPLY_BYTES_MAX`` bytes or
  ``SCAN_EXAMINED_MAX`` keys examined; ``next_after`` is then the last key examined
  (every owned key up to it is in the page), or None when the prefix is exhausted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from zkv.protocol.errors import ErrorCode
from zkv.protocol.limits import MULTI_REPLY_BYTES_MAX, SCAN_EXAMINED_MAX, SCAN_REPLY_BYTES_MAX
from zkv.protocol.messages import ErrorReply
from zkv.protocol.multikey import KeyResult, MultiReply, ScanReply
from zkv.protocol.ring import RingConfig
from zkv.storage_node.multikey_commands import MultiKind, MultiWrite, key_hash
from zkv.storage_node.ownership import Ownership
from zkv.storage_node.sessions import MultiCached, SessionStatus, SessionTable
from zkv.storage_node.watch_history import DELETE, EXPIRE, PUT

if TYPE_CHECKING:
    from zkv.storage_node.expiry import ExpiryIndex
    from zkv.storage_node.state_machine import KeyTable
    from zkv.storage_node.watch_history import WatchHistory

__all__ = ["apply_multi_write", "multi_get_reply", "scan_page"]

_VERSION_BYTES = 8
_WRONG_SHARD = int(ErrorCode.WRONG_SHARD)


def apply_multi_write(index: int, cmd: MultiWrite, data: KeyTable, sessions: SessionTable,
                      ownership: Ownership,
                      expiry: ExpiryIndex | None = None,
                      history: WatchHistory | None = None) -> MultiReply | ErrorReply:
    """Apply one shard's part of a batch write at log ``index`` (see the rules). With
    ``expiry``: a key expired at the batch's stamp is gone before it (a delete of it
    finds nothing), and a key put or deleted loses its TTL, as a single put does. With
    ``history``: one watch event per key written, removed or found expired."""
    seen = sessions.lookup(cmd.client_id, cmd.request_id, cmd.ts_ms)
    if seen is SessionStatus.EXPIRED or not (seen is SessionStatus.NEW
                                             or isinstance(seen, MultiCached)):
        why = ("this batch's session was forgotten; its outcome is unknown"
               if seen is SessionStatus.EXPIRED else "request id already used by a single write")
        code = ErrorCode.SESSION_EXPIRED if seen is SessionStatus.EXPIRED else ErrorCode.BAD_REQUEST
        return ErrorReply(cmd.request_id, code, why)
    hashes = [key_hash(k) for k in cmd.keys]
    done: dict[int, KeyResult] = {}
    if isinstance(seen, MultiCached):
        done = dict(zip(seen.hashes, seen.results, strict=True))
    todo = [i for i, h in enumerate(hashes) if h not in done]
    if not todo:
        return MultiReply(cmd.request_id, cmd.keys, tuple(done[h] for h in hashes))
    for i in todo:
        refused = ownership.refusal(cmd.keys[i])
        if refused:
            return ErrorReply(cmd.request_id, refused, "key not served by this shard now",
                              epoch=ownership.epoch)
    if expiry is not None and len(expiry):
        for i in todo:
            key = cmd.keys[i]
            if (expiry.expired(key, cmd.ts_ms) and data.pop(key, None) is not None
                    and history is not None):
                history.record(index, EXPIRE, key, b"", index + ownership.version_offset)
            expiry.discard(key)  # a put stores a value with no expiry; a delete ends it
    fresh = _write(index, cmd, todo, data, ownership, history)
    new = MultiCached(cmd.request_id, tuple(hashes[i] for i in todo), fresh)
    record = new if not isinstance(seen, MultiCached) else seen.merged(new)
    sessions.record(cmd.client_id, cmd.request_id, cmd.lowest_pending, record)
    done.update(zip(new.hashes, fresh, strict=True))
    return MultiReply(cmd.request_id, cmd.keys, tuple(done[h] for h in hashes))


def _write(index: int, cmd: MultiWrite, todo: list[int], data: KeyTable,
           ownership: Ownership, history: WatchHistory | None) -> tuple[KeyResult, ...]:
    """Write the keys at positions ``todo``, all at one version; their results (and
    their watch events, with ``history``)."""
    noting = ownership.outgoing is not None
    version = index + ownership.version_offset
    results: list[KeyResult] = []
    if cmd.kind is MultiKind.PUT:
        written = KeyResult(0, True, version)
        for i in todo:
            key = cmd.keys[i]
            if noting:
                ownership.note_write(key, index)
            data.put(key, cmd.values[i], version)
            if history is not None:
                history.record(index, PUT, key, cmd.values[i], version)
            results.append(written)
        return tuple(results)
    for i in todo:
        key = cmd.keys[i]
        if key in data:
            if noting:
                ownership.note_write(key, index)
            del data[key]
            if history is not None:
                history.record(index, DELETE, key, b"", version)
            results.append(KeyResult(0, True, version))
        else:
            results.append(KeyResult(0, False, 0))
    return tuple(results)


def multi_get_reply(request_id: int, keys: tuple[bytes, ...], data: KeyTable,
                    ownership: Ownership, ring: RingConfig,
                    reply_bytes_max: int = MULTI_REPLY_BYTES_MAX,
                    expired: Callable[[bytes], bool] | None = None) -> MultiReply:
    """Per-key results of a batch read, as this shard holds them now (a key for which
    ``expired`` says so is absent, swept or not)."""
    results: list[KeyResult] = []
    size = 0
    wrong = False
    for key in keys:
        refused = ownership.refusal(key)
        if refused:
            wrong = wrong or refused == _WRONG_SHARD
            results.append(KeyResult(int(refused)))
            continue
        packed = data.get_packed(key)
        if packed is None or (expired is not None and expired(key)):
            results.append(KeyResult(0, False, 0))
            continue
        size += len(packed)
        if size > reply_bytes_max:
            results.append(KeyResult(int(ErrorCode.UNAVAILABLE)))
            continue
        results.append(KeyResult(0, True, int.from_bytes(packed[-_VERSION_BYTES:], "little"),
                                 packed[:-_VERSION_BYTES]))
    return MultiReply(request_id, keys, tuple(results), ring if wrong else None)


def scan_page(request_id: int, prefix: bytes, after: bytes | None, limit: int,
              keys_only: bool, data: KeyTable, ownership: Ownership, ring: RingConfig,
              reply_bytes_max: int = SCAN_REPLY_BYTES_MAX,
              examined_max: int = SCAN_EXAMINED_MAX,
              expired: Callable[[bytes], bool] | None = None) -> ScanReply | ErrorReply:
    """One shard's page of a scan (see the rules; a key for which ``expired`` says so is
    left out, swept or not)."""
    start = prefix if after is None or after < prefix else after
    keys: list[bytes] = []
    values: list[bytes] = []
    versions: list[int] = []
    size = 0
    examined = 0
    last: bytes | None = None
    exhausted = True
    for key in data.keys_from(start):
        if not key.startswith(prefix):
            break
        if key == after:
            continue
        if examined >= examined_max:
            exhausted = False
            break
        examined += 1
        last = key
        refused = ownership.refusal(key)
        if refused == _WRONG_SHARD:
            continue
        if refused:
            return ErrorReply(request_id, ErrorCode.UNAVAILABLE,
                              "keys in this range are moving to another shard; retry",
                              epoch=ownership.epoch)
        if expired is not None and expired(key):
            continue
        packed = data.get_packed(key)
        assert packed is not None
        keys.append(key)
        versions.append(int.from_bytes(packed[-_VERSION_BYTES:], "little"))
        size += len(key)
        if not keys_only:
            values.append(packed[:-_VERSION_BYTES])
            size += len(packed) - _VERSION_BYTES
        if len(keys) >= limit or size >= reply_bytes_max:
            exhausted = False
            break
    return ScanReply(request_id, tuple(keys), tuple(values), tuple(versions),
                     None if exhausted else last, ring.epoch, ring)
