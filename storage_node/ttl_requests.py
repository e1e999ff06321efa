"""What a storage node decides about keys that expire (TTL). Pure: every time is an
argument (the wall clock in ms the shell read), used by ``node_requests.py`` and
``node_core.py``.

Rules (the state machine's side is in ``state_machine.py``, the index in ``expiry.py``):

- Stamping. The leader turns a request's relative ``ttl_ms`` into the absolute deadline
  ``ts_ms + 1 + ttl_ms``, ``ts_ms`` being the wall clock the shell read (floored to the
  ms: hence the 1) after receiving the request, so the deadline is never earlier than
  the TTL counted from when the client sent it: on the leader's clock, a key never
  expires early.
- Reading. A read answers a key as absent once its deadline is <= the serving node's
  wall clock (``wall_ms``: the latest the shell gave the core, never older than the
  request), whether or not a sweep removed it yet: on the serving leader a key is never
  visible after its deadline.
- A read that finds a key expired while one of our writes on that key is proposed but
  not yet applied waits for that write (``wait_index``): the write's outcome was
  decided at its own, earlier, stamp (the key alive, say, for a CAS), so answering
  "absent" first would order the read before a write that saw the key alive.
- Sweeping. Once per loop turn the leader proposes at most one ``SweepCommand`` of at
  most ``SWEEP_KEYS_MAX`` due keys, and the next only once it applied the last (or
  lost its term): bounded work per turn and per entry however many keys are due.
  Keys refused here (moving to another shard) are left to their new owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, TtlReply
from zkv.protocol.ttl_messages import (
    TTL_MS_MAX,
    ExpireRequest,
    PersistRequest,
    PutTtlRequest,
    TtlWriteRequest,
)
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.ttl_commands import (
    SWEEP_KEYS_MAX,
    ExpireCommand,
    PutTtlCommand,
    SweepCommand,
)


def ttl_refusal(req: TtlWriteRequest) -> ErrorReply | None:
    """``BAD_REQUEST`` for a TTL out of range (1 ms .. ``TTL_MS_MAX``), else None."""
    if isinstance(req, PersistRequest):
        return None
    if not 1 <= req.ttl_ms <= TTL_MS_MAX:
        return ErrorReply(req.request_id, ErrorCode.BAD_REQUEST,
                          f"ttl_ms must be between 1 and {TTL_MS_MAX}, got {req.ttl_ms}")
    return None


def ttl_command(req: TtlWriteRequest, ts_ms: int) -> PutTtlCommand | ExpireCommand:
    """The command a leader proposes for a TTL write, its deadline stamped from ``ts_ms``."""
    if isinstance(req, PutTtlRequest):
        return PutTtlCommand(req.client_id, req.request_id, req.lowest_pending, ts_ms,
                             req.key, req.value, ts_ms + 1 + req.ttl_ms)
    deadline = ts_ms + 1 + req.ttl_ms if isinstance(req, ExpireRequest) else 0
    return ExpireCommand(req.client_id, req.request_id, req.lowest_pending, ts_ms, req.key,
                         deadline)


def ttl_reply(state: KVStateMachine, request_id: int, key: bytes, now_ms: int) -> TtlReply:
    """A ``TtlRequest``'s answer at wall clock ``now_ms``."""
    found = state.get_live(key, now_ms)
    if found is None:
        return TtlReply(request_id, False, 0, False, 0)
    deadline = state.expiry.get(key)
    if not deadline:
        return TtlReply(request_id, True, found[1], False, 0)
    return TtlReply(request_id, True, found[1], True, deadline - now_ms)


def wait_index(state: KVStateMachine, key: bytes, now_ms: int,
               pending_writes: Mapping[int, Any]) -> int:
    """The log index a read of ``key`` must wait for before answering, 0 for none: the
    highest of our pending writes on ``key`` when the key is in the table but expired."""
    if not pending_writes or key not in state.data or not state.expiry.expired(key, now_ms):
        return 0
    top = 0
    for index, pending in pending_writes.items():
        if index > top and getattr(pending.command, "key", None) == key:
            top = index
    return top


def sweep_command(state: KVStateMachine, now_ms: int,
                  limit: int = SWEEP_KEYS_MAX) -> SweepCommand | None:
    """The sweep to propose at ``now_ms``: up to ``limit`` due keys served here."""
    expiry = state.expiry
    if not len(expiry):
        return None
    own = state.ownership
    keys = [k for k in expiry.due(now_ms, limit) if not own.refusal(k)]
    return SweepCommand(now_ms, tuple(keys)) if keys else None
