"""Identity on disk (storage_node/identity.py): the start decision table, founding, and
the core's rule that a non-voter's data dir never votes nor completes a quorum."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_replica import Group
from zkv.protocol.messages import Role
from zkv.storage_node import identity
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.identity import Founding, Identity, IdentityError, IdentityState
from zkv.storage_node.replica import Replica, ReplicaConfig

KW = dict(cluster_id="c", shard_id=0, node_id="a", incarnation="i1")


@pytest.mark.parametrize(("has_state", "bootstrap", "state"), [
    (True, False, IdentityState.VOTER),  # previous release: adopted
    (True, True, IdentityState.VOTER),  # --bootstrap ignored on a non-empty dir
    (False, True, IdentityState.BOOTSTRAPPING),
    (False, False, IdentityState.WAITING),
])
def test_start_without_identity_file(has_state: bool, bootstrap: bool,
                                     state: IdentityState) -> None:
    ident = identity.decide_start(None, has_state, bootstrap=bootstrap, **KW)  # type: ignore[arg-type]
    assert ident.state is state and ident.incarnation == "i1"
    assert ident.voter == (state is IdentityState.VOTER)
    assert bool(ident.reason) == (not ident.voter)


@pytest.mark.parametrize("recorded", list(IdentityState))
def test_recorded_identity_wins_over_the_flag(recorded: IdentityState) -> None:
    on_disk = Identity("c", 0, "a", "old", recorded)
    for bootstrap in (False, True):
        got = identity.decide_start(on_disk, False, bootstrap=bootstrap, **KW)  # type: ignore[arg-type]
        assert got == on_disk


@pytest.mark.parametrize("other", [Identity("x", 0, "a", "i", IdentityState.VOTER),
                                   Identity("c", 1, "a", "i", IdentityState.VOTER),
                                   Identity("c", 0, "b", "i", IdentityState.VOTER)])
def test_foreign_data_dir_is_refused(other: Identity) -> None:
    with pytest.raises(IdentityError, match="belongs to"):
        identity.decide_start(other, True, bootstrap=True, **KW)  # type: ignore[arg-type]


def test_save_load_roundtrip_and_bad_file(tmp_path: Path) -> None:
    assert identity.load(tmp_path) is None
    ident = Identity("c", 3, "n", "abc", IdentityState.WAITING, "why")
    identity.save(tmp_path, ident)
    assert identity.load(tmp_path) == ident
    assert not (tmp_path / "identity.json.tmp").exists()
    (tmp_path / "identity.json").write_text("{not json")
    with pytest.raises(IdentityError):
        identity.load(tmp_path)


def test_founding_needs_a_pristine_majority() -> None:
    f = Founding("a", ("b", "c"))
    assert not f.founded
    f.on_answer("zz", True)  # not in the initial configuration: ignored
    assert not f.founded
    f.on_answer("b", True)
    assert f.founded and not f.exists


def test_founding_is_off_for_good_once_a_member_is_past_term_0() -> None:
    f = Founding("a", ("b", "c"))
    f.on_answer("b", True)
    f.on_answer("c", False)
    assert f.exists and not f.founded
    f.on_answer("c", True)
    assert not f.founded


def test_single_member_founds_alone() -> None:
    assert Founding("a", ()).founded


# ---------------------------------------------------------------------- core rules


def _wipe(g: Group, node: str, voter: bool) -> None:
    """``node`` comes back with an empty data dir under its old id."""
    members = tuple(g.cores)
    g.cores[node] = Replica(ReplicaConfig(node, members, voter=voter), HardState(0, ""), [])
    g.log[node] = []
    g.applied[node] = []


def _lost_disk_scenario(wiped_votes: bool) -> tuple[Group, list[bytes]]:
    """The issue's scenario on cores: c stopped, writes committed by a+b, b wiped, a
    dies, c resumes and campaigns."""
    g = Group()
    g.elect("a")
    g.advance(0.2)
    g.down.add("c")
    for i in range(20):
        g.cores["a"].propose(b"w%d" % i, g.now)
    g.settle()
    g.advance(0.2)
    committed = [e.data for e in g.applied["a"] if e.data.startswith(b"w")]
    assert len(committed) == 20
    _wipe(g, "b", voter=wiped_votes)
    g.down.add("a")
    g.down.discard("c")
    g.advance(1.2)
    g.elect("c")
    g.advance(0.3)
    return g, committed


def test_wiped_non_voter_refuses_votes_so_no_leader_forgets_writes() -> None:
    g, _ = _lost_disk_scenario(wiped_votes=False)
    assert g.cores["c"].role is not Role.LEADER
    g.cores["b"].campaign(g.now)
    g.settle()
    assert g.cores["b"].role is not Role.LEADER  # a non-voter never stands either


def test_broken_variant_empty_node_allowed_to_vote_loses_committed_writes() -> None:
    """The deliberately broken variant: the wiped node votes as if whole."""
    g, committed = _lost_disk_scenario(wiped_votes=True)
    assert g.cores["c"].role is Role.LEADER
    c_log = [e.data for e in g.log["c"]]
    assert not set(committed) & set(c_log)  # every committed write is gone


def test_leader_does_not_count_a_non_voter_toward_commit() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.2)
    _wipe(g, "b", voter=False)
    g.down.add("c")
    g.advance(0.3)  # b catches up as a non-voter
    before = g.cores["a"].commit_index
    g.cores["a"].propose(b"x", g.now)
    g.settle()
    g.advance(0.2)
    assert [e.data for e in g.log["b"]][-1:] == [b"x"]  # b holds it...
    assert g.cores["a"].commit_index == before  # ...but only a voter majority commits
    g.advance(1.0)
    assert g.cores["a"].role is Role.FOLLOWER  # a non-voter does not keep a leader alive
    g.cores["b"].set_voter(True)  # admitted (founding, or an operator)
    g.down.discard("c")
    g.elect("a")
    g.advance(0.3)
    assert b"x" in [e.data for e in g.applied["a"]]


# ------------------------------------------------- the founding configuration, on disk


def test_founding_and_adoption_record_the_configuration_waiting_does_not() -> None:
    kw = {**KW, "members": ("c", "b")}
    adopted = identity.decide_start(None, True, bootstrap=False, **kw)  # type: ignore[arg-type]
    founding = identity.decide_start(None, False, bootstrap=True, **kw)  # type: ignore[arg-type]
    waiting = identity.decide_start(None, False, bootstrap=False, **kw)  # type: ignore[arg-type]
    assert adopted.founding == founding.founding == ("a", "b", "c")
    assert waiting.founding == ()
    # founding agreed, or found to exist: the record stays
    assert founding.with_state(IdentityState.VOTER).founding == ("a", "b", "c")


def test_founding_roundtrips_and_a_file_written_before_it_loads_without(tmp_path: Path) -> None:
    ident = Identity("c", 0, "a", "i1", IdentityState.VOTER, founding=("a", "b", "c"))
    identity.save(tmp_path, ident)
    assert identity.load(tmp_path) == ident
    (tmp_path / "identity.json").write_text(
        '{"cluster_id": "c", "shard_id": 0, "node_id": "a", "incarnation": "i1", '
        '"state": "voter", "reason": ""}')
    assert identity.load(tmp_path) == Identity("c", 0, "a", "i1", IdentityState.VOTER)
    (tmp_path / "identity.json").write_text(
        '{"cluster_id": "c", "shard_id": 0, "node_id": "a", "incarnation": "i1", '
        '"state": "voter", "founding": "abc"}')
    with pytest.raises(IdentityError, match="founding"):
        identity.load(tmp_path)


def _start(data_dir: Path, peers: tuple[str, ...]) -> tuple[str, ...]:
    """A storage node started on ``data_dir`` with ``--peers`` naming ``peers``: the
    voters its replica starts from."""
    from zkv.protocol.ring import RingConfig
    from zkv.storage_node.fsync_policy import FsyncPolicy
    from zkv.storage_node.node import NodeConfig, StorageNode

    cfg = NodeConfig("a", 0, data_dir, "tcp://127.0.0.1:1", "tcp://127.0.0.1:1",
                     {p: f"tcp://{p}:1" for p in peers}, (), (), RingConfig(1, (0,), 16),
                     FsyncPolicy.parse("never"), background_snapshots=False)
    node = StorageNode(cfg)
    try:
        return node.core.membership.voters
    finally:
        node.wal.close()


def test_a_young_shard_keeps_its_founding_configuration_whatever_peers_says_later(
    tmp_path: Path,
) -> None:
    """The hazard the README listed: a node whose log and snapshot hold no configuration
    took its --peers as the configuration, so a supervisor that already names a node
    being added (d) made it count d toward quorums the shard never agreed to. Now the
    founding configuration recorded in the data dir is used."""
    identity.save(tmp_path, Identity("zkv", 0, "a", "i1", IdentityState.VOTER,
                                     founding=("a", "b", "c")))
    assert _start(tmp_path, ("b", "c", "d")) == ("a", "b", "c")
    assert _start(tmp_path, ("b",)) == ("a", "b", "c")


def test_an_identity_without_founding_still_takes_peers(tmp_path: Path) -> None:
    identity.save(tmp_path, Identity("zkv", 0, "a", "i1", IdentityState.VOTER))
    assert _start(tmp_path, ("b", "c", "d")) == ("a", "b", "c", "d")


def test_an_adopted_data_dir_records_peers_as_its_founding_configuration(
    tmp_path: Path,
) -> None:
    from zkv.storage_node import durable_state

    durable_state.save_hard_state(tmp_path, HardState(3, "b"))  # the previous release's
    assert _start(tmp_path, ("b", "c")) == ("a", "b", "c")
    recorded = identity.load(tmp_path)
    assert recorded is not None and recorded.voter and recorded.founding == ("a", "b", "c")
    assert _start(tmp_path, ("b", "c", "d")) == ("a", "b", "c")
