"""Wire version 1 (the previous release) next to version 2, for rolling upgrades.

Why: a rolling upgrade runs old and new processes side by side (nodes of one shard,
brokers, SDKs). Version 2 changed little of what flows between them during normal
operation: most messages kept their layout, a few gained trailing fields with defaults,
and three carry the ring differently (``Heartbeat``, ``Redirect``, ``StatusReply``:
``RingConfig.to_wire()`` instead of v1's flat epoch/shards/vnodes). So the rule, for
every sender, is the one HTTP/1.x and msgpack-rpc peers use: **send the oldest version
that says the same thing.**

- ``encode`` stamps a message **version 1** when the previous release can read it with
  the same meaning: its type existed in v1, and the fields v1 did not have are absent
  (trailing fields at their default are left out already) or, for the three ring
  carriers, translated to v1's layout. Anything else (a new message type, a vote with
  ``transfer``, an ack with ``voter=False``, the admin and migration messages) goes as
  **version 2**, which the previous release refuses: it drops the frame (a node logs it)
  or answers ``UNSUPPORTED_VERSION`` (a broker), never misreads it.
- ``decode`` reads both: a v1 frame of a ring carrier is translated to v2's fields
  first; a v1 frame of a type that v1 did not have, or with more fields than v1 had, is
  refused.

No state, no negotiation: a process need not know which release its peer runs. What
stays out of reach of this rule is what a log entry or a snapshot means (the previous
release cannot apply a TTL, multi-key or configuration entry, nor load a snapshot of
format 3); README "Rolling upgrade" says what not to use until every node is upgraded.

The field counts below are the previous release's message layouts, written down once
(``git show f8a6183:protocol/messages.py``, tests/support/previous_release.py); never edit them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zkv.protocol.errors import RemoteProtocolError

#: the version the previous release speaks (and the only one it reads)
LEGACY_VERSION = 1

#: type code -> number of fields (blob included) in version 1, for the types whose v2
#: layout is v1's plus trailing fields with defaults
V1_FIELD_COUNTS: dict[int, int] = {
    1: 4,    # GetRequest
    2: 5,    # PutRequest
    3: 4,    # DeleteRequest (+ expected_version)
    4: 6,    # CasRequest
    5: 2,    # StatusRequest
    6: 2,    # PingRequest
    20: 4,   # GetReply
    21: 2,   # PutReply
    22: 3,   # DeleteReply
    23: 3,   # CasReply
    24: 5,   # ErrorReply
    26: 2,   # PongReply
    41: 3,   # Campaign
    42: 1,   # RequestBatch
    43: 1,   # ReplyBatch
    50: 5,   # VoteRequest (+ transfer)
    51: 4,   # VoteReply (+ candidate)
    52: 7,   # AppendEntries
    53: 5,   # AppendReply (+ voter, incarnation)
    54: 7,   # InstallSnapshot
    55: 5,   # SnapshotReply
}

HEARTBEAT, STATUS_REPLY, REDIRECT = 40, 25, 44

# Positions in the v2 header values (after [version, type]).
_HB_RING = 13  # Heartbeat: ..., members, ring, heartbeat_ms, extra


def _flat_ring(ring: Any) -> list[Any]:
    """v2's ``[epoch, [shard, ...], vnodes]`` as v1's three fields."""
    if type(ring) not in (list, tuple) or len(ring) != 3:
        raise RemoteProtocolError("a ring is [epoch, [shard, ...], vnodes]")
    return [ring[0], ring[1], ring[2]]


def _heartbeat_to_v1(values: list[Any]) -> list[Any] | None:
    return [*values[:_HB_RING], *_flat_ring(values[_HB_RING]), *values[_HB_RING + 1:]]


def _heartbeat_from_v1(values: list[Any]) -> list[Any]:
    if len(values) != 18:
        raise RemoteProtocolError("Heartbeat (version 1): wrong number of fields")
    return [*values[:_HB_RING], values[_HB_RING:_HB_RING + 3], *values[_HB_RING + 3:]]


def _redirect_to_v1(values: list[Any]) -> list[Any] | None:
    return [values[0], *_flat_ring(values[1]), *values[2:]]


def _redirect_from_v1(values: list[Any]) -> list[Any]:
    if len(values) != 5:
        raise RemoteProtocolError("Redirect (version 1): wrong number of fields")
    return [values[0], values[1:4], values[4]]


def _status_to_v1(values: list[Any]) -> list[Any] | None:
    ring = values[3]
    if ring is None:
        return None  # v1 always had a ring here: only v2 can say "none yet"
    epoch, shards, vnodes = _flat_ring(ring)
    return [*values[:3], {"epoch": epoch, "shards": shards, "vnodes": vnodes}]


def _status_from_v1(values: list[Any]) -> list[Any]:
    if len(values) != 4 or type(values[3]) is not dict:
        raise RemoteProtocolError("StatusReply (version 1): wrong fields")
    ring = values[3]
    try:
        flat = [ring["epoch"], ring["shards"], ring["vnodes"]]
    except KeyError as exc:
        raise RemoteProtocolError(f"StatusReply (version 1): ring without {exc}") from exc
    return [*values[:3], flat]


#: v2 header values -> v1's, or None when v1 cannot say it
ToV1 = Callable[[list[Any]], list[Any] | None]
#: v1 header values -> v2's (``RemoteProtocolError`` when malformed)
FromV1 = Callable[[list[Any]], list[Any]]

#: type code -> its translations
TRANSLATED: dict[int, tuple[ToV1, FromV1]] = {
    HEARTBEAT: (_heartbeat_to_v1, _heartbeat_from_v1),
    REDIRECT: (_redirect_to_v1, _redirect_from_v1),
    STATUS_REPLY: (_status_to_v1, _status_from_v1),
}
