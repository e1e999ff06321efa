"""The key-value state machine a shard's replicas apply committed log entries to.

State: ``key -> (value, version)``, where a key's version is the log index of the entry
that last wrote it, plus the session table (``sessions.py``) that makes retried writes
apply once. Everything here is a pure function of the log, so every replica that
applied the same prefix holds the same state and the same snapshot.

Semantics (``apply``):
- PUT stores the value at version = index: ``PutReply(version=index)``.
- DELETE removes the key: ``DeleteReply(True, index)``, or ``DeleteReply(False, 0)`` if
  it did not exist (nothing was written). With ``expected_version`` > 0 it removes the
  key only if that is its version, else ``DeleteReply(False, current version or 0)``.
- CAS writes only if the key's version equals ``expected_version`` (0: the key must not
  exist): ``CasReply(True, index)``, else ``CasReply(False, current version or 0)``.
- A write whose (client id, request id) was seen returns the cached reply and changes
  nothing; one the session table has forgotten returns ``ErrorReply(SESSION_EXPIRED)``.
- Ring commands (RING_SET, FENCE, MIGRATE_*, DROP_UNOWNED) go to ``ownership.py``,
  whose docstring holds the rules of a ring change; they return an ``Applied``.
- A write to a key this shard does not serve (``Ownership.refusal``) answers
  ``WRONG_SHARD`` / ``UNAVAILABLE`` and changes nothing (not even the session table).
  A key's version is the entry's index plus ``Ownership.version_offset`` (0 unless
  keys migrated in).
- TTL (``ttl_commands.py``, deadlines in ``expiry.py``): a key whose deadline is <= a
  write's ``ts_ms`` (the leader's clock stamped in the entry) is gone for that write,
  and for every later one: it is removed before the write applies, so a CAS with
  ``expected_version`` 0 succeeds on it. PUT and CAS store a value without a deadline
  (a new value starts a new life, as Redis SET does), PUT_TTL one with the entry's
  deadline. EXPIRE_SET changes only the deadline of a live key, not its version (a
  version names a value): ``ExpireReply(found, version)``. EXPIRE_SWEEP removes the
  listed keys expired at its ``now_ms`` and served here (a moving key expires at its
  new owner, which got its deadline). Reads judge expiry by the reader's clock
  (``get_live``); the table may hold an expired key until a sweep or a write removes it.
- Watch (``watch_history.py``): every change of a key's value is recorded as an event
  under its entry's index (``history``); ring commands record nothing. A restored
  snapshot empties the history (it is complete only after the snapshot's index).
- NOOP, and an entry that does not decode (it is in the log already: skipping it is
  the only way forward, and every replica skips it alike), return ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
from loguru import logger

from zkv.protocol.errors import ErrorCode, RemoteProtocolError
from zkv.protocol.messages import (
    Applied,
    CasReply,
    DeleteReply,
    ErrorReply,
    ExpireReply,
    PutReply,
)
from zkv.protocol.multikey import MultiReply
from zkv.protocol.ring import RingConfig
from zkv.storage_node.commands import (
    CasCommand,
    Command,
    DeleteCommand,
    Noop,
    PutCommand,
    SessionCommand,
    decode_command,
)
from zkv.storage_node.expiry import ExpiryIndex
from zkv.storage_node.key_table import KeyTable as KeyTable  # re-exported
from zkv.storage_node.multikey_commands import MultiWrite
from zkv.storage_node.multikey_state import apply_multi_write
from zkv.storage_node.ownership import Ownership
from zkv.storage_node.sessions import (
    CLIENTS_MAX,
    REPLIES_PER_CLIENT_MAX,
    SESSION_TTL_MS,
    MultiCached,
    SessionStatus,
    SessionTable,
    merge_session_state,
)
from zkv.storage_node.ttl_commands import ExpireCommand, PutTtlCommand, SweepCommand
from zkv.storage_node.watch_history import DELETE, EXPIRE, PUT, WatchHistory

ApplyReply = PutReply | DeleteReply | CasReply | ExpireReply | ErrorReply | MultiReply

#: Snapshot layout: ``[4, applied_index, keys, packed values, sessions, ownership,
#: expiry]`` where a packed value is the value then its version as 8 bytes
#: (``KeyTable``'s own representation, so a snapshot is written and loaded without a
#: per-key object) and ``expiry`` is ``[keys, deadlines]`` (``ExpiryIndex.to_state``).
#: Format 3 (4 without ``expiry``: nothing expires), format 2 (``(value, version)``
#: pairs) and format 1 (2 without ``ownership``) still load.
SNAPSHOT_FORMAT = 4
_SNAPSHOT_FORMATS = (1, 2, 3, 4)
_VERSION_BYTES = 8


class KVStateMachine:
    """Keys, values, versions and sessions; see the module docstring for the rules."""

    def __init__(
        self,
        replies_per_client_max: int = REPLIES_PER_CLIENT_MAX,
        clients_max: int = CLIENTS_MAX,
        session_ttl_ms: int = SESSION_TTL_MS,
        shard_id: int | None = None,
        ring: RingConfig | None = None,
    ) -> None:
        self._data = KeyTable()
        #: deadlines of the keys that expire (TTL)
        self._expiry = ExpiryIndex()
        self._sessions = SessionTable(replies_per_client_max, clients_max, session_ttl_ms)
        self._applied_index = 0
        #: ring, fence and migration state; ``shard_id=None``: every key is ours
        self.ownership = Ownership(shard_id, ring)
        #: the recent events, for watchers (watch_history.py)
        self.history = WatchHistory()

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def key_count(self) -> int:
        return len(self._data)

    @property
    def data_bytes(self) -> int:
        """Bytes of keys plus values held: what ``--max-data-bytes`` bounds."""
        return self._data.size_bytes

    @property
    def sessions(self) -> SessionTable:
        return self._sessions

    @property
    def data(self) -> KeyTable:
        """The key table itself (read-only by convention: migration scans it)."""
        return self._data

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        """``(value, version)`` of ``key``, or ``None`` if it is not in the table (an
        expired key not yet removed is still there: readers use ``get_live``)."""
        found: tuple[bytes, int] | None = self._data.get(key)
        return found

    # ------------------------------------------------------------------ TTL

    @property
    def expiry(self) -> ExpiryIndex:
        """The keys' deadlines (read-only by convention: the sweep and migration read it)."""
        return self._expiry

    def get_live(self, key: bytes, now_ms: int) -> tuple[bytes, int] | None:
        """``get`` as a reader at wall-clock ``now_ms`` sees it: an expired key is absent."""
        found: tuple[bytes, int] | None = self._data.get(key)
        if found is not None and self._expiry.expired(key, now_ms):
            return None
        return found

    def _apply_expire(self, index: int, cmd: ExpireCommand) -> ExpireReply:
        current = self._data.get(cmd.key)
        if current is None:
            return ExpireReply(cmd.request_id, False, 0)
        self._expiry.set(cmd.key, cmd.deadline_ms)
        return ExpireReply(cmd.request_id, True, current[1])

    def _apply_sweep(self, cmd: SweepCommand) -> None:
        data, expiry, own = self._data, self._expiry, self.ownership
        index = self._applied_index
        for key in cmd.keys:
            if expiry.expired(key, cmd.now_ms) and not own.refusal(key):
                if own.outgoing is not None:  # the delta must delete it at the target too
                    own.note_write(key, index)
                if data.pop(key, None) is not None:
                    self.history.record(index, EXPIRE, key, b"", index + own.version_offset)
                expiry.discard(key)
        expiry.trim(2 * len(cmd.keys) + 16)  # their heap pairs are the top now

    def apply(self, index: int, data: bytes) -> ApplyReply | Applied | None:
        """Apply the committed entry at ``index``; the reply for its client, if any."""
        try:
            cmd = decode_command(data)
        except RemoteProtocolError as exc:
            if index <= self._applied_index:
                raise AssertionError(f"apply of index {index} after {self._applied_index}") from exc
            self._applied_index = index
            logger.error("log entry {} is not a valid command ({}); skipped", index, exc)
            return None
        return self.apply_command(index, cmd)

    def apply_command(self, index: int, cmd: Command) -> ApplyReply | Applied | None:
        """``apply`` for a command already decoded: the leader keeps the commands it
        proposed, so its hot path never decodes its own log entries again."""
        if index <= self._applied_index:
            raise AssertionError(f"apply of index {index} after {self._applied_index}")
        self._applied_index = index
        t = type(cmd)
        if t is PutCommand or t is DeleteCommand or t is CasCommand:
            return self._apply_write(index, cmd)  # type: ignore[arg-type]
        if t is Noop:
            return None
        if t is MultiWrite:  # a batch's part: multikey_state.py
            return apply_multi_write(index, cmd, self._data, self._sessions,  # type: ignore[arg-type]
                                     self.ownership, self._expiry, self.history)
        if t is PutTtlCommand or t is ExpireCommand:
            return self._apply_write(index, cmd)  # type: ignore[arg-type]
        if t is SweepCommand:
            self._apply_sweep(cmd)  # type: ignore[arg-type]
            return None
        return self.ownership.apply(index, cmd, self._data, self._merge_sessions,  # type: ignore[arg-type]
                                    self._expiry)

    def _merge_sessions(self, state: Any) -> None:
        merge_session_state(self._sessions, state)

    def _apply_write(self, index: int, cmd: SessionCommand) -> ApplyReply:
        sessions = self._sessions
        seen = sessions.lookup(cmd.client_id, cmd.request_id, cmd.ts_ms)
        if seen is not SessionStatus.NEW:
            if isinstance(seen, MultiCached):  # a request id first used by a batch
                return ErrorReply(cmd.request_id, ErrorCode.BAD_REQUEST,
                                  "request id already used by a batch")
            if seen is SessionStatus.EXPIRED:
                return ErrorReply(
                    cmd.request_id, ErrorCode.SESSION_EXPIRED,
                    "this write's session was forgotten; its outcome is unknown",
                )  # fmt: skip
            return seen
        refused = self.ownership.refusal(cmd.key)
        if refused:
            return ErrorReply(cmd.request_id, refused, "key not served by this shard now",
                              epoch=self.ownership.epoch)
        data = self._data
        own = self.ownership
        if own.outgoing is not None:  # a ring change takes this key away: note the write
            own.note_write(cmd.key, index)
        rev = index  # the watch events' revision: the log index
        index += own.version_offset  # the version this write gives its key
        expiry = self._expiry
        ttls = expiry.deadlines  # empty: no key has a TTL (the usual case: skip it all)
        history = self.history
        if ttls and expiry.expired(cmd.key, cmd.ts_ms):  # gone for this write on
            if data.pop(cmd.key, None) is not None:
                history.record(rev, EXPIRE, cmd.key, b"", index)
            expiry.discard(cmd.key)
        reply: PutReply | DeleteReply | CasReply | ExpireReply
        if isinstance(cmd, PutCommand):
            data.put(cmd.key, cmd.value, index)
            history.record(rev, PUT, cmd.key, cmd.value, index)
            if ttls:
                expiry.discard(cmd.key)
            reply = PutReply(cmd.request_id, index)
        elif isinstance(cmd, PutTtlCommand):
            data.put(cmd.key, cmd.value, index)
            history.record(rev, PUT, cmd.key, cmd.value, index)
            expiry.set(cmd.key, cmd.deadline_ms)
            reply = PutReply(cmd.request_id, index)
        elif isinstance(cmd, ExpireCommand):
            reply = self._apply_expire(index, cmd)
        elif isinstance(cmd, DeleteCommand):
            current = data.get(cmd.key)
            if current is None:
                reply = DeleteReply(cmd.request_id, False, 0)
            elif cmd.expected_version and current[1] != cmd.expected_version:
                reply = DeleteReply(cmd.request_id, False, current[1])
            else:
                del data[cmd.key]
                history.record(rev, DELETE, cmd.key, b"", index)
                if ttls:
                    expiry.discard(cmd.key)
                reply = DeleteReply(cmd.request_id, True, index)
        else:
            current = data.get(cmd.key)
            version = 0 if current is None else current[1]
            if version == cmd.expected_version:
                data.put(cmd.key, cmd.value, index)
                history.record(rev, PUT, cmd.key, cmd.value, index)
                if ttls:
                    expiry.discard(cmd.key)
                reply = CasReply(cmd.request_id, True, index)
            else:
                reply = CasReply(cmd.request_id, False, version)
        sessions.record(cmd.client_id, cmd.request_id, cmd.lowest_pending, reply)
        return reply

    # ------------------------------------------------------------------ snapshots

    def snapshot_bytes(self) -> bytes:
        """The whole state as msgpack. Flat lists packed in C: no per-key objects."""
        data = self._data
        state = [
            SNAPSHOT_FORMAT,
            self._applied_index,
            list(data.keys()),
            list(data.packed_values()),
            self._sessions.to_state(),
            self.ownership.to_state(),
            self._expiry.to_state(),
        ]
        packed: bytes = msgpack.packb(state, use_bin_type=True)
        return packed

    def restore(self, snapshot: Any) -> None:
        """Replace the whole state by a snapshot's, decoded in one call (start-up; an
        install from the leader decodes step by step: ``snapshot_loader.py``). A
        malformed snapshot raises ``RemoteProtocolError`` (it may come from a peer) and
        changes nothing."""
        try:
            state: Any = msgpack.unpackb(snapshot, raw=False, use_list=False)
            fmt, applied, keys, values, *rest = state
        except Exception as exc:  # msgpack raises many types on garbage
            raise RemoteProtocolError(f"undecodable snapshot: {exc.__class__.__name__}") from exc
        check_snapshot_head(fmt, applied, len(rest) - 1)
        if type(keys) is not tuple or type(values) is not tuple or len(keys) != len(values):
            raise RemoteProtocolError("snapshot keys and values do not match")
        self.adopt(fmt, applied, key_table_part(fmt, keys, values), tuple(rest))

    def adopt(self, fmt: int, applied: int, table: KeyTable, rest: tuple[Any, ...]) -> None:
        """Replace the whole state by a decoded snapshot's: ``table`` holds its keys,
        ``rest`` its parts after them (sessions, then ownership and deadlines by format;
        the deadlines as their state or as an ``ExpiryIndex`` already built), checked
        here. ``RemoteProtocolError`` if malformed; then nothing changes."""
        sessions_state, *rest_parts = rest
        sessions = SessionTable(
            self._sessions.replies_per_client_max,
            self._sessions.clients_max,
            self._sessions.session_ttl_ms,
        )
        try:
            sessions.load_state(sessions_state)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from exc
        expiry = ExpiryIndex()
        if len(rest_parts) > 1:  # format 4: deadlines (TTL), or the loader's index of them
            try:
                part = rest_parts[1]
                expiry = part if type(part) is ExpiryIndex else ExpiryIndex.from_state(part)
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from exc
        ownership = Ownership(self.ownership.shard_id, None)
        if rest_parts:
            try:
                ownership.load_state(rest_parts[0])
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from exc
        else:  # format 1 predates ring changes: the ring is the initial one
            ownership = self.ownership
        self.ownership = ownership
        self._data = table
        self._expiry = expiry
        self._sessions = sessions
        self._applied_index = applied
        self.history.reset(applied)  # no events before the snapshot

    def __eq__(self, other: object) -> bool:
        """Same keys, values, versions, sessions and applied index (for tests)."""
        if not isinstance(other, KVStateMachine):
            return NotImplemented
        return (
            self._applied_index == other._applied_index
            and self._data == other._data
            and self._expiry == other._expiry
            and self._sessions == other._sessions
            and self.ownership.to_state() == other.ownership.to_state()
        )

    __hash__ = None  # type: ignore[assignment]


def check_snapshot_head(fmt: Any, applied: Any, extra_parts: int) -> None:
    """``RemoteProtocolError`` unless a snapshot's format is known, its applied index
    sane, and it has the parts its format has after the sessions (``extra_parts``)."""
    if fmt not in _SNAPSHOT_FORMATS or extra_parts != min(fmt - 1, 1 + (fmt >= 4)):
        raise RemoteProtocolError(f"unsupported snapshot format {fmt!r}")
    if type(applied) is not int or applied < 0:
        raise RemoteProtocolError(f"unsupported snapshot format {fmt!r}")


def key_table_part(fmt: int, keys: Sequence[Any], values: Sequence[Any],
                   table: KeyTable | None = None) -> KeyTable:
    """``table`` (a new one by default) with a decoded snapshot's keys and values added,
    checked with C-speed passes (no per-key Python loop for format 3 and later);
    ``RemoteProtocolError`` if a key or value is malformed."""
    table = KeyTable() if table is None else table
    bad = RemoteProtocolError("snapshot holds a malformed key or value")
    if keys and set(map(type, keys)) != {bytes}:
        raise bad
    if fmt >= 3:
        if values and (set(map(type, values)) != {bytes}
                       or min(map(len, values)) < _VERSION_BYTES):
            raise bad
        table.add_packed(keys, values)
        return table
    if not all(type(v) is tuple and len(v) == 2 and type(v[0]) is bytes
               and type(v[1]) is int and v[1] >= 0 for v in values):
        raise bad
    for key, (value, version) in zip(keys, values, strict=True):
        table.put(key, value, version)
    return table
