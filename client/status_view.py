"""``zkv status``'s view: the broker's status annotated per shard, and its table.

``annotate_status`` turns the broker's flat node list into shards, each with its leader
(the highest-term claimant), every node's lag behind that leader, the shard's ring
share, its key count and the configuration in force (the leader's voters and learners).
``format_status`` prints that as one table per shard. Fields a node reports only in its
heartbeat's ``extra`` (membership, incarnation, data usage) show as ``-`` when absent.
"""

from __future__ import annotations

from typing import Any

from zkv.protocol.messages import Role


def role_name(role: Any) -> str:
    try:
        return Role(role).name.lower()
    except (ValueError, TypeError):
        return str(role).lower()


def annotate_status(status: dict[str, Any]) -> dict[str, Any]:
    """Add per shard its leader, and per node ``role`` as a name and ``lag`` (entries
    behind the shard leader's last index; None without a leader)."""
    shards: dict[int, dict[str, Any]] = {}
    for node in status.get("nodes", []):
        node["role"] = role_name(node.get("role"))
        shard = shards.setdefault(int(node.get("shard_id", -1)), {"leader": None, "nodes": []})
        shard["nodes"].append(node)
        if node["role"] == "leader":
            best = shard["leader"]
            if best is None or node.get("term", 0) > best.get("term", 0):
                shard["leader"] = node
    for shard in shards.values():
        leader = shard["leader"]
        for node in shard["nodes"]:
            node["lag"] = (None if leader is None else
                           max(0, leader.get("last_index", 0) - node.get("last_index", 0)))
        shard["leader"] = None if leader is None else leader.get("node_id")
        shard["nodes"].sort(key=lambda n: str(n.get("node_id")))
    ring = status.get("ring") or {}
    for sid in ring.get("shards", []):
        shards.setdefault(int(sid), {"leader": None, "nodes": []})
    shares: dict[int, float] = {}
    if ring.get("shards") and ring.get("vnodes"):
        from zkv.protocol.ring import Ring, RingConfig

        shares = Ring(RingConfig(int(ring.get("epoch", 0)), tuple(ring["shards"]),
                                 int(ring["vnodes"]))).shares()
    for sid, shard in shards.items():
        shard["share"] = shares.get(sid, 0.0)
        leader_row = next((n for n in shard["nodes"] if n.get("node_id") == shard["leader"]
                           and shard["leader"] is not None), None)
        shard["keys"] = None if leader_row is None else leader_row.get("key_count")
        if leader_row is not None:  # the configuration in force is the leader's
            shard["voters"] = list(leader_row.get("members") or [])
            shard["learners"] = list(_extra(leader_row, "learners") or [])
    status["shards"] = {str(k): v for k, v in sorted(shards.items())}
    status.pop("nodes", None)
    return status


_COLUMNS = (("node", "node_id"), ("role", "role"), ("term", "term"),
            ("last", "last_index"), ("commit", "commit_index"), ("applied", "applied_index"),
            ("lag", "lag"), ("keys", "key_count"), ("data", "data"), ("pid", "pid"),
            ("age", "age"), ("member", "membership"), ("incarnation", "incarnation"))


def format_status(status: dict[str, Any]) -> str:
    ring = status.get("ring", {})
    lines = [f"broker {status.get('broker_id', '?')}  ring epoch {ring.get('epoch', '?')}  "
             f"shards {ring.get('shards', '?')}  vnodes {ring.get('vnodes', '?')}"]
    for sid, shard in status.get("shards", {}).items():
        leader = shard["leader"] or "NONE"
        keys = shard.get("keys")
        lines.append(f"\nshard {sid}  leader {leader}  ({len(shard['nodes'])} live nodes)  "
                     f"ring share {shard.get('share', 0.0) * 100:.1f}%  "
                     f"keys {'-' if keys is None else keys}")
        if "voters" in shard:
            lines.append(f"  voters {', '.join(shard['voters']) or '-'}  "
                         f"learners {', '.join(shard['learners']) or '-'}")
        rows = [[h for h, _ in _COLUMNS]]
        for node in shard["nodes"]:
            row = []
            for _, name in _COLUMNS:
                v = (_age(node) if name == "age" else _data_usage(node) if name == "data"
                     else node.get(name, _extra(node, name)))
                row.append("-" if v is None else str(v))
            rows.append(row)
        notes = [f"  {n['node_id']}: {_extra(n, 'membership_reason')}" for n in shard["nodes"]
                 if _extra(n, "membership_reason")]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        for row in rows:
            lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        lines.extend(notes)
    return "\n".join(lines)


def _extra(node: dict[str, Any], name: str) -> Any:
    """A field the node reports in its heartbeat's ``extra`` (membership, incarnation)."""
    return (node.get("extra") or {}).get(name)


def _age(node: dict[str, Any]) -> str | None:
    """Time since the broker last heard the node: the broker's ``age_ms`` per status row
    (a node sends no age of its own; the broker measures it from the heartbeats)."""
    age_ms = node.get("age_ms")
    if age_ms is None:
        return None
    return f"{int(age_ms)}ms" if age_ms < 1000 else f"{age_ms / 1000:.1f}s"


def _data_usage(node: dict[str, Any]) -> str | None:
    """Bytes of keys + values against the quota (``--max-data-bytes``), and a full disk."""
    extra = node.get("extra") or {}
    used, quota = extra.get("data_bytes"), extra.get("max_data_bytes")
    if used is None:
        return None
    text = _size(used)
    if quota:
        text += f"/{_size(quota)} ({100 * used / quota:.0f}%)"
    if extra.get("disk_full"):
        text += " DISK FULL"
    return text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"
