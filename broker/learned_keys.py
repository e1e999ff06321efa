"""Node keys a broker learns from the heartbeats of nodes it already trusts. Pure.

Theory of operation (the rules common to nodes and brokers: ``protocol/node_keys.py``)
--------------------------------------------------------------------------------------
A node whose key is not among the broker's files (``add-replica --public-key``) is let in
once a node the broker already trusts reports a committed configuration naming it. Each
node's heartbeat carries its shard's committed configuration: its index and member keys.

Rules:
- A report counts only from a heartbeat whose connection authenticated as the node the
  heartbeat names (the shell checks the key; ``report`` takes the authenticated id and
  refuses a mismatch again, so the rule is tested here). Trust is never bootstrapped
  from the key being vouched for: a node the broker does not trust cannot reach it.
- Per shard, the report of the highest configuration index wins (ties: the latest). A
  removed member that still runs reports its own, older configuration, which therefore
  cannot keep its key trusted once the shard's other members report the newer one.
- The keys learned are exactly the member keys of each shard's winning report, each
  trusted as the member that configuration names (a key named for two members: neither).
  A member removed by a newer configuration loses its key.
"""

from __future__ import annotations

from collections.abc import Mapping

from zkv.protocol.node_keys import HEARTBEAT_FIELD, config_keys, parse_heartbeat_field


class LearnedKeys:
    """Per shard, the newest committed configuration's member keys (module docstring)."""

    def __init__(self) -> None:
        self._shards: dict[int, tuple[int, dict[str, str]]] = {}
        self._keys: dict[bytes, str] = {}

    def report(self, sender: str | None, node_id: str, shard_id: int,
               extra: Mapping[str, object]) -> bool:
        """A heartbeat of ``node_id`` (shard ``shard_id``) whose connection authenticated
        as node ``sender`` (None: not a node key). True when the keys to trust changed."""
        if sender is None or sender != node_id:
            return False
        got = parse_heartbeat_field(extra.get(HEARTBEAT_FIELD))
        if got is None:
            return False
        index, keys = got
        current = self._shards.get(shard_id)
        if current is not None and (index < current[0] or current == (index, keys)):
            return False
        self._shards[shard_id] = (index, dict(keys))
        learned = config_keys(
            (node, key) for _, members in self._shards.values() for node, key in members.items())
        if learned == self._keys:
            return False
        self._keys = learned
        return True

    @property
    def keys(self) -> dict[bytes, str]:
        """key (z85 bytes) -> the node id it is trusted as."""
        return dict(self._keys)
