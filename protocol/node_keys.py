"""Node keys trusted from committed membership changes (issue 12, item 3). Pure.

Theory of operation
-------------------
A cluster's node-key set is seeded from the files of ``keys/public/nodes`` and extended
only by committed configurations: ``zkv admin add-replica --public-key`` puts the new
member's key in its shard's configuration entry (``storage_node/membership.py``), and
once that entry is committed

- every member of the shard trusts the key, as that member only, for peer traffic, and
  dials that member with it when no certificate of it is published (``dial_key``);
- every member publishes its shard's committed member keys in its heartbeat
  (``heartbeat_field``), and a broker, which accepts heartbeats only from keys it
  already trusts, adds them to its allow-list for backend and heartbeat traffic
  (``broker/learned_keys.py``), again as the member the configuration names.

Rules, the same on nodes and brokers (``trust_map``):
- Files win: a key the files already name keeps the files' role and name, so a
  configuration cannot turn a client's (or another node's) key into a member's.
- A key that a configuration gives to two members is trusted as neither.
- What a configuration gave, the next configuration takes back: a removed member's key
  is trusted no more (its connections already open keep running, as with a removed file).
- A node saves the keys of the latest configuration it saw committed: after a restart
  it knows only its snapshot's configuration as committed until a leader says more,
  and the leader may be a member that only a later configuration names (``newest_keys``).

Why committed only: an uncommitted configuration may still be truncated; trusting its
keys would let a change that never happened open the door, even briefly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NODE = "node"
#: the heartbeat ``extra`` field: ``[config index, {member: z85 key}]``
HEARTBEAT_FIELD = "node_keys"
KEY_LENGTH = 40
#: bound what one heartbeat may make a broker trust
MEMBERS_MAX = 64


@dataclass(frozen=True, slots=True)
class Principal:
    role: str
    name: str

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"


def config_keys(pairs: Iterable[tuple[str, str]]) -> dict[bytes, str]:
    """z85 key (as bytes, like zmq's) -> member id, from a configuration's ``keys``;
    a key given to two members is trusted as neither."""
    owners: dict[bytes, set[str]] = {}
    for node, key in pairs:
        owners.setdefault(key.encode(), set()).add(node)
    return {key: next(iter(nodes)) for key, nodes in owners.items() if len(nodes) == 1}


def trust_map(file_keys: Mapping[bytes, Principal],
              configured: Mapping[bytes, str]) -> dict[bytes, Principal]:
    """Who each key is: the files' keys, plus the configured keys as node principals
    (files win on a key both name)."""
    out = {key: Principal(NODE, node) for key, node in configured.items()}
    out.update(file_keys)
    return out


def dial_key(file_key: bytes | None, config_key: str) -> bytes | None:
    """The key a member must present when we dial it: its published certificate's,
    else the one its committed configuration records; None: we cannot dial it yet."""
    if file_key is not None:
        return file_key
    return config_key.encode() if config_key else None


def newest_keys(known: tuple[int, dict[str, str]],
                saved: tuple[int, dict[str, str]] | None) -> tuple[int, dict[str, str]]:
    """The member keys of the later of two committed configurations: the one the
    replica knows committed, and the one saved on disk (``durable_state``) when a later
    one was seen committed before a restart (ties: the replica's)."""
    return saved if saved is not None and saved[0] > known[0] else known


def heartbeat_field(index: int, keys: Iterable[tuple[str, str]]) -> list[Any]:
    """What a node puts under ``HEARTBEAT_FIELD``: its committed configuration's index
    and member keys."""
    return [index, dict(keys)]


def parse_heartbeat_field(value: object) -> tuple[int, dict[str, str]] | None:
    """The (index, member keys) a heartbeat reports; None when absent or malformed."""
    if type(value) is not list or len(value) != 2:
        return None
    index, keys = value
    if type(index) is not int or index < 0 or type(keys) is not dict or len(keys) > MEMBERS_MAX:
        return None
    for node, key in keys.items():
        if (type(node) is not str or not node or len(node) > 256 or type(key) is not str
                or len(key) != KEY_LENGTH):
            return None
    return index, keys
