"""A shard's configuration (voters, learners, their peer addresses) and the rules for
changing it through the log. Pure.

Choice: single-server changes, not joint consensus. Each change moves one node into or
out of the voter set (adding or removing a learner does not touch it at all), and any
two majorities of configurations that differ by one voter intersect, so no two leaders
can be elected from the old and new configurations at once (Ongaro's thesis, 4.1). It
is a fraction of joint consensus' code (no C_old,new state, no two-quorum commits), and
a replacement is simply three such steps (add learner, promote it, remove the old).

Rules (enforced by ``Replica.propose_membership`` and ``check_change``):
- A configuration takes effect as soon as it is in a node's log, committed or not, and
  is undone if that entry is truncated. The quorum for commits, reads and elections is
  always a majority of the current configuration's voters.
- The known fix for single-server changes (Ongaro, raft-dev 2015): a leader starts a
  change only after it has committed an entry of its own term (its no-op). Without it,
  two overlapping changes proposed by leaders of different terms can each commit with
  disjoint majorities.
- At most one change in flight: a new one only once the previous configuration entry is
  committed.
- A change differs from the current configuration by one node's status.
- Learners receive the log (or a snapshot) but neither vote nor count. The leader
  promotes a learner only once its log is within ``promote_lag_max`` entries of its own,
  and only while no voter whose data dir came back empty is catching up (it is
  re-admitted first) and the voters that count, the learner with them, are a quorum of
  the configuration with the learner: so a voter gone for good can still be replaced.
  Until the promoted learner holds its promotion it does not vote (as in etcd, whose
  raft has the same window), so a leader lost in that window with a voter gone leaves
  the shard waiting for the old leader to come back;
  a learner added to replace a voter (``replaces``) has that voter removed once it is
  promoted and counts (its acks say its data dir votes). A replacement by a node that
  is a voter already (a leader whose log held no configuration took its ``--peers``,
  which named the node being added, as its configuration) is recorded as such, and
  the old voter goes the same way.
- A voter whose data dir cannot vote (it lost its disk, or started after the shard was
  founded: ``identity.py``) keeps its slot but counts for nothing; once its log is
  within ``promote_lag_max`` of the leader's, the leader re-admits it by binding the
  slot to its new incarnation (voters unchanged). Safe for the reason promotion is:
  while it was empty it neither voted nor counted, so every entry committed meanwhile
  is on a majority without it, and it votes again only once it holds nearly all of
  them (a candidate still needs an up-to-date majority).
- A leader not among the voters of a committed configuration steps down.
- The configuration is part of snapshots: a snapshot carries the configuration in force
  at its last index (``wrap_snapshot``).

Identity (``identity.py``): a learner's data dir is a non-voter until a configuration
promotes *that data dir*: promotion records the learner's incarnation (which it sends
in its acks while a non-voter), and a node flips its identity to voter only on seeing
its own (id, incarnation) among the voters. A wiped node replaying an old promotion of
its id meets an older incarnation and stays a non-voter.

Node keys (issue 12): with Curve, a member added by ``add-replica --public-key`` carries
its public key (z85 text) in ``keys``. Once the configuration is *committed* the shard's
members trust that key as that member (and dial it with it), and brokers learn it from
their heartbeats (``protocol/node_keys.py``); removing the member drops its key. A
configuration without keys is exactly what it was before keys existed.

Wire form of a configuration entry: msgpack
``[11, voters, learners, addrs, replaces, incarnations]``, plus a trailing ``keys``
(pairs of node id and z85 key) only when some member has one, so a configuration without
keys encodes, and older entries decode, as before (op 11 in ``commands.py``, applied as
a no-op by the state machine).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from zkv.protocol.admin import AdminAddReplica, AdminRemoveReplica, AdminReplaceReplica
from zkv.protocol.errors import RemoteProtocolError

CONFIG_OP = 11
#: msgpack fixarray(6) or (7: with keys), then positive fixint 11
CONFIG_PREFIXES = frozenset((b"\x96\x0b", b"\x97\x0b"))
#: a Curve public key in z85 text: 40 characters of the z85 alphabet
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_SNAP_MAGIC = b"ZKVM"


class MembershipError(ValueError):
    """A change the rules forbid (the caller's request is wrong, not the data)."""


class MembershipBusy(MembershipError):
    """A change the rules forbid only for now (a new leader has not committed an entry
    of its term yet, or another change is under way): answered ``UNAVAILABLE``, which
    clients retry, rather than ``BAD_REQUEST``, which they must not."""


class MembershipUnhealthy(MembershipBusy):
    """A removal the strict reconfiguration check refuses for now: the voters left that
    are healthy would be no quorum (``replica_membership._unhealthy_removal``). Retried
    like any busy refusal: it passes once enough voters are back."""


@dataclass(frozen=True, slots=True)
class Membership:
    voters: tuple[str, ...]
    learners: tuple[str, ...] = ()
    #: (node id, peer address), sorted: how every member reaches a new member
    addrs: tuple[tuple[str, str], ...] = ()
    #: (learner, voter to remove once the learner is a voter)
    replaces: tuple[tuple[str, str], ...] = ()
    #: (voter, incarnation of the data dir it was promoted with): only that data dir
    #: may vote under this id; founders and adopted voters are voters by their own
    #: identity file and need no entry
    incarnations: tuple[tuple[str, str], ...] = ()
    #: (member, its Curve public key in z85 text), sorted: for members whose key is not
    #: among the files of ``keys/public/nodes`` (``add-replica --public-key``)
    keys: tuple[tuple[str, str], ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return self.voters + self.learners

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def addr_of(self, node: str) -> str:
        return dict(self.addrs).get(node, "")

    def key_of(self, node: str) -> str:
        return dict(self.keys).get(node, "")

    def with_addr(self, node: str, addr: str) -> tuple[tuple[str, str], ...]:
        out = dict(self.addrs)
        if addr:
            out[node] = addr
        return tuple(sorted(out.items()))

    # ------------------------------------------------------------------ changes

    def add_learner(self, node: str, addr: str, replaces: str = "", key: str = "") -> Membership:
        if node in self.members:
            raise MembershipError(f"{node} is already a member")
        if replaces and replaces not in self.voters:
            raise MembershipError(f"{replaces} is not a voter")
        if key and not is_public_key(key):
            raise MembershipError("public_key must be a Curve public key (40 characters z85)")
        reps = self.replaces + (((node, replaces),) if replaces else ())
        keys = tuple(sorted({**dict(self.keys), node: key}.items())) if key else self.keys
        return replace(self, learners=self.learners + (node,), addrs=self.with_addr(node, addr),
                       replaces=reps, keys=keys)

    def promote(self, node: str, incarnation: str) -> Membership:
        if node not in self.learners:
            raise MembershipError(f"{node} is not a learner")
        if not incarnation:
            raise MembershipError(f"{node} has not told its incarnation yet")
        learners = tuple(n for n in self.learners if n != node)
        incs = tuple(sorted({**dict(self.incarnations), node: incarnation}.items()))
        return replace(self, voters=tuple(sorted(self.voters + (node,))), learners=learners,
                       incarnations=incs)

    def readmit(self, node: str, incarnation: str) -> Membership:
        """Bind voter ``node``'s slot to a new data dir (voters unchanged)."""
        if node not in self.voters:
            raise MembershipError(f"{node} is not a voter")
        incs = tuple(sorted({**dict(self.incarnations), node: incarnation}.items()))
        return replace(self, incarnations=incs)

    def admits(self, node: str, incarnation: str) -> bool:
        """Whether this configuration promoted ``node``'s data dir ``incarnation``."""
        return node in self.voters and (node, incarnation) in self.incarnations

    def remove(self, node: str) -> Membership:
        if node not in self.members:
            raise MembershipError(f"{node} is not a member")
        voters = tuple(n for n in self.voters if n != node)
        if not voters:
            raise MembershipError("cannot remove the last voter")
        return Membership(
            voters, tuple(n for n in self.learners if n != node),
            tuple(a for a in self.addrs if a[0] != node),
            tuple(r for r in self.replaces if node not in r),
            tuple(i for i in self.incarnations if i[0] != node),
            tuple(k for k in self.keys if k[0] != node),  # a removed member's key goes too
        )


def check_change(old: Membership, new: Membership) -> None:
    """Raise ``MembershipError`` unless ``new`` changes at most one voter of ``old``."""
    if len(set(old.voters) ^ set(new.voters)) > 1:
        raise MembershipError(
            f"voters {sorted(old.voters)} -> {sorted(new.voters)}: one change at a time")


# ---------------------------------------------------------------------- encoding


def is_public_key(text: str) -> bool:
    """Whether ``text`` looks like a Curve public key in z85 (40 characters)."""
    return _Z85_KEY.fullmatch(text) is not None


def encode(m: Membership) -> bytes:
    fields: list[object] = [
        CONFIG_OP, list(m.voters), list(m.learners), [list(a) for a in m.addrs],
        [list(r) for r in m.replaces], [list(i) for i in m.incarnations]]
    if m.keys:  # only then: a configuration without keys keeps its old bytes
        fields.append([list(k) for k in m.keys])
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def is_config(data: bytes) -> bool:
    return data[:2] in CONFIG_PREFIXES


def decode(data: bytes) -> Membership:
    """A configuration entry's data; anything malformed raises ``RemoteProtocolError``."""
    try:
        v = msgpack.unpackb(data, raw=False)
        if type(v) is not list or len(v) not in (6, 7):
            raise ValueError("a configuration is an array of 6 or 7")
        op, voters, learners, addrs, reps, incs = v[:6]
        if op != CONFIG_OP:
            raise ValueError("not a configuration")
        keys = _pairs(v[6]) if len(v) == 7 else ()
        if not all(is_public_key(k) for _, k in keys):
            raise ValueError("a member key must be a z85 Curve public key")
        m = Membership(_names(voters), _names(learners), _pairs(addrs), _pairs(reps),
                       _pairs(incs), keys)
    except Exception as exc:  # msgpack and unpacking raise many types on garbage
        raise RemoteProtocolError(f"bad configuration entry: {exc}") from exc
    if not m.voters:
        raise RemoteProtocolError("a configuration needs a voter")
    return m


def _names(v: object) -> tuple[str, ...]:
    if type(v) is not list or not all(type(x) is str for x in v):
        raise ValueError("names must be a list of str")
    return tuple(v)


def _pairs(v: object) -> tuple[tuple[str, str], ...]:
    if type(v) is not list:
        raise ValueError("pairs must be a list")
    out = []
    for p in v:
        if type(p) is not list or len(p) != 2 or not all(type(x) is str for x in p):
            raise ValueError("a pair must be [str, str]")
        out.append((p[0], p[1]))
    return tuple(out)


def wrap_snapshot(m: Membership | None, data: bytes) -> bytes:
    """Snapshot bytes carrying the configuration in force at the snapshot's index."""
    if m is None:
        return data
    conf = encode(m)
    return _SNAP_MAGIC + struct.pack(">I", len(conf)) + conf + data


def snapshot_config(blob: Any) -> Membership | None:
    """The configuration at the head of a snapshot (None for one written before
    configurations), reading only the head: ``blob`` may be a map of a large file."""
    if len(blob) < 8 or blob[:4] != _SNAP_MAGIC:
        return None
    (n,) = struct.unpack(">I", blob[4:8])
    return decode(bytes(blob[8 : 8 + n]))


def snapshot_state(blob: Any) -> memoryview:
    """The state part of a snapshot, as a view: nothing copied (a snapshot from the
    leader may be hundreds of megabytes; ``snapshot_loader.py`` reads the view)."""
    view = memoryview(blob)
    if len(blob) < 8 or blob[:4] != _SNAP_MAGIC:
        return view
    (n,) = struct.unpack(">I", blob[4:8])
    return view[8 + n :]


def unwrap_snapshot(blob: bytes) -> tuple[Membership | None, bytes]:
    """(configuration or None for a snapshot written before configurations, state)."""
    return snapshot_config(blob), bytes(snapshot_state(blob))


# ---------------------------------------------------------------------- admin ops


def change_for(req: object, conf: Membership) -> Membership | None:
    """The configuration an admin request (``protocol.admin``: add, remove or replace a
    replica) asks for, or None when it is already in effect (requests are retried, so
    each is idempotent). Bad arguments raise ``MembershipError``."""
    node = _arg(getattr(req, "node_id", ""), "node_id")
    if isinstance(req, AdminAddReplica):
        if node in conf.members:
            return None
        return conf.add_learner(node, _arg(req.peer_addr, "peer_addr"),
                                key=_key_arg(req.public_key))
    if isinstance(req, AdminRemoveReplica):
        return conf.remove(node) if node in conf.members else None
    if isinstance(req, AdminReplaceReplica):
        old = _arg(req.old_id, "old_id")
        if old == node:
            raise MembershipError("replace with a new node id (or remove, then add)")
        if node in conf.voters and old in conf.members and (node, old) not in conf.replaces:
            # the new node votes already (the leader took --peers naming it as its
            # configuration, and re-admitted its data dir): what is left is to remove
            # the old one, which the leader does once the new one counts
            return replace(conf, replaces=conf.replaces + ((node, old),))
        if node in conf.members or old not in conf.members:
            return None  # asked before: under way (learner) or done (old removed)
        return conf.add_learner(node, _arg(req.peer_addr, "peer_addr"), replaces=old,
                                key=_key_arg(req.public_key))
    raise MembershipError(f"not a membership change: {type(req).__name__}")


def _arg(v: object, name: str) -> str:
    if type(v) is not str or not v or len(v) > 256:
        raise MembershipError(f"{name} must be a non-empty string")
    return v


def _key_arg(v: object) -> str:
    if type(v) is not str or (v and not is_public_key(v)):
        raise MembershipError("public_key must be a Curve public key (40 characters z85)")
    return v


def describe(conf: Membership) -> dict[str, object]:
    return {"voters": list(conf.voters), "learners": list(conf.learners),
            "addrs": dict(conf.addrs), "replaces": dict(conf.replaces),
            "incarnations": dict(conf.incarnations), "keys": dict(conf.keys)}
