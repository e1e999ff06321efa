"""A data dir's identity, and whether its node may vote. Rules pure; file I/O at the end.

Why: a node that comes back with an empty data dir under its old id has forgotten its
log and its votes. Letting it vote can elect a leader without the writes it had
acknowledged, or elect two leaders in one term. So the data dir, not the command line,
says who a node is and whether it is a whole voter (invariant 7).

``identity.json`` (separate from the hard-state file) records ``cluster_id``,
``shard_id``, ``node_id``, a random per-disk ``incarnation``, the shard's ``founding``
configuration (the voters it was founded with: the configuration until a change is in
the log or a snapshot, so a later ``--peers`` cannot redefine a young shard) and
``state``:

- ``voter``: founded the shard, was adopted from the previous release, or was admitted.
- ``bootstrapping``: empty dir started with ``--bootstrap``; founding not yet agreed.
- ``waiting``: an empty dir that must not found the shard (no ``--bootstrap``, or the
  shard exists already): a non-voter until admitted: a leader re-admits a voter slot
  once its log has caught up (membership.py), or it joins by add-replica / replace-replica.

What ``decide_start`` makes of a data dir at start:

=====================================  ========================================
on disk                                result
=====================================  ========================================
identity of this cluster/shard/node    as recorded (``--bootstrap`` ignored)
identity of another cluster/shard/node refuse to start (the data is not ours)
no identity, a log or hard state       adopt (previous release): ``voter``
nothing, ``--bootstrap``               ``bootstrapping`` (peers: ``Founding``)
nothing, no ``--bootstrap``            ``waiting``
=====================================  ========================================

Founding (``Founding``): a bootstrapping node asks each member of the initial
configuration (``--peers``) for its state; a member answers ``pristine`` when its data
dir is empty and bootstrapping too, or when it founded and has never moved past term 0
(it has cast no vote and acknowledged nothing, so nothing can depend on it yet). The
node founds once a majority of the initial configuration, itself included, is pristine.
Any answer of a member past term 0 means the shard exists: founding is off for good and
the node waits. Safety: if an election ever succeeded, a majority of the configuration
holds a term >= 1 durably, so no majority can be pristine afterwards unless a majority
lost its disks (beyond what any quorum system survives). A member that starts only
after the others elected a leader therefore waits, like a wiped one, until the leader
re-admits its slot once it has caught up (``membership.py``).
"""

from __future__ import annotations

import enum
import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path

FILE_NAME = "identity.json"
DEFAULT_CLUSTER_ID = "zkv"


class IdentityState(enum.Enum):
    VOTER = "voter"
    BOOTSTRAPPING = "bootstrapping"
    WAITING = "waiting"


class IdentityError(RuntimeError):
    """The data dir belongs to someone else, or its identity file is unreadable."""


@dataclass(frozen=True, slots=True)
class Identity:
    cluster_id: str
    shard_id: int
    node_id: str
    incarnation: str
    state: IdentityState
    #: why the node is not a voter (for the log and ``zkv status``); "" for voters
    reason: str = ""
    #: the shard's founding configuration (sorted node ids), recorded when this data
    #: dir started to found the shard or was adopted: the configuration while its log
    #: and snapshot hold none, whatever ``--peers`` says later (() : not recorded, as in
    #: identity files written before it was, and for a waiting node, which learns the
    #: configuration from its leader)
    founding: tuple[str, ...] = ()

    @property
    def voter(self) -> bool:
        return self.state is IdentityState.VOTER

    def with_state(self, state: IdentityState, reason: str = "") -> Identity:
        return replace(self, state=state, reason=reason)


def new_incarnation() -> str:
    return secrets.token_hex(8)


def decide_start(
    on_disk: Identity | None,
    has_state: bool,
    *,
    cluster_id: str,
    shard_id: int,
    node_id: str,
    bootstrap: bool,
    incarnation: str,
    members: tuple[str, ...] = (),
) -> Identity:
    """The identity a node starts with (see the table in the module docstring). Raises
    ``IdentityError`` for a data dir of another cluster, shard or node. ``members``:
    the initial configuration (``--peers`` and this node), recorded as ``founding`` by
    a data dir that founds the shard or is adopted."""
    if on_disk is not None:
        mine = (on_disk.cluster_id, on_disk.shard_id, on_disk.node_id)
        if mine != (cluster_id, shard_id, node_id):
            raise IdentityError(
                f"the data dir belongs to cluster {on_disk.cluster_id!r} shard "
                f"{on_disk.shard_id} node {on_disk.node_id!r}, not cluster {cluster_id!r} "
                f"shard {shard_id} node {node_id!r}; give this node an empty data dir and "
                "add it with `zkv admin replace-replica`"
            )
        return on_disk
    founding = tuple(sorted({node_id, *members}))
    new = Identity(cluster_id, shard_id, node_id, incarnation, IdentityState.VOTER)
    if has_state:
        # written by the previous release: it was a voter, it stays one; its
        # configuration was --peers, fixed for its whole life
        return replace(new, founding=founding)
    if bootstrap:
        return replace(new, founding=founding).with_state(
            IdentityState.BOOTSTRAPPING,
            "bootstrapping: waiting for a majority of --peers to agree")
    return new.with_state(IdentityState.WAITING, "empty data dir and no --bootstrap: "
                          "a non-voter until admitted (a leader re-admits it once caught up; or "
                          "zkv admin add-replica / replace-replica)")


def initial_members(ident: Identity, node_id: str, peers: tuple[str, ...]) -> tuple[str, ...]:
    """The configuration a replica starts from while its log and snapshot name none: the
    founding one this data dir recorded, else (an identity file written before it was
    recorded, a waiting node) ``--peers`` and the node itself."""
    return ident.founding or tuple(sorted({node_id, *peers}))


class Founding:
    """A bootstrapping node's tally of its initial configuration's answers. Pure."""

    def __init__(self, node_id: str, members: tuple[str, ...]) -> None:
        self.members = frozenset(members) | {node_id}
        self._pristine = {node_id}
        self.exists = False  # a member past term 0 answered: the shard was founded before

    def on_answer(self, member: str, pristine: bool) -> None:
        if member not in self.members:
            return
        if pristine:
            self._pristine.add(member)
        else:
            self._pristine.discard(member)
            self.exists = True

    @property
    def founded(self) -> bool:
        return not self.exists and len(self._pristine) >= len(self.members) // 2 + 1


# ---------------------------------------------------------------------- files


def load(data_dir: Path) -> Identity | None:
    path = data_dir / FILE_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path}: unreadable identity file ({exc})") from exc
    try:
        founding = raw.get("founding", [])
        if type(founding) is not list or not all(type(n) is str and n for n in founding):
            raise ValueError(f"founding is not a list of node ids: {founding!r}")
        return Identity(str(raw["cluster_id"]), int(raw["shard_id"]), str(raw["node_id"]),
                        str(raw["incarnation"]), IdentityState(raw["state"]),
                        str(raw.get("reason", "")), tuple(founding))
    except (KeyError, TypeError, ValueError) as exc:
        raise IdentityError(f"{path}: bad identity file ({exc})") from exc


def save(data_dir: Path, ident: Identity) -> None:
    """Atomically: temp file, fsync, rename, fsync the directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    body = asdict(ident)
    body["state"] = ident.state.value
    body["founding"] = list(ident.founding)
    tmp = data_dir / (FILE_NAME + ".tmp")
    with tmp.open("w") as f:
        json.dump(body, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_dir / FILE_NAME)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
