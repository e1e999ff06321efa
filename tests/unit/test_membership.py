"""Membership changes through the log (storage_node/membership.py, replica.py): add,
remove, replace, leader removal, learner promotion, snapshots carrying the
configuration, and a deliberately broken variant (two voters changed at once) that
commits two different entries at one index."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.unit.test_replica import Group
from zkv.protocol.messages import Entry, Role, VoteReply, VoteRequest
from zkv.storage_node import membership as mship
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.membership import Membership, MembershipError
from zkv.storage_node.replica import Ready, Replica, ReplicaConfig


def _join(g: Group, node: str, voter: bool = False, lag_max: int = 1000) -> None:
    """Start ``node`` on an empty data dir (a non-voter until promoted)."""
    cfg = ReplicaConfig(node, (*g.cores, node), voter=voter, incarnation=f"inc-{node}",
                        promote_lag_max=lag_max)
    g.cores[node] = Replica(cfg, HardState(0, ""), [])
    for d in (g.log, g.applied, g.reads, g.failed_reads):
        d[node] = []  # type: ignore[index]


def _ready_group() -> Group:
    g = Group()
    g.elect("a")
    g.advance(0.3)  # the no-op of term 1 is committed
    return g


def _confs(g: Group) -> dict[str, Membership]:
    return {n: c.membership for n, c in g.cores.items() if n not in g.down}


def test_configuration_entry_roundtrip_and_garbage() -> None:
    m = Membership(("a", "b"), ("c",), (("c", "tcp://x:1"),), (("c", "b"),), (("a", "i"),))
    data = mship.encode(m)
    assert mship.is_config(data) and mship.decode(data) == m
    conf, state = mship.unwrap_snapshot(mship.wrap_snapshot(m, b"STATE"))
    assert conf == m and state == b"STATE"
    assert mship.unwrap_snapshot(b"\x96plain") == (None, b"\x96plain")
    for bad in (b"\x96\x0b", data[:-3], mship.encode(Membership(("a",)))[:-1]):
        with pytest.raises(Exception):  # noqa: B017 - RemoteProtocolError, checked below
            mship.decode(bad)


def test_add_learner_catches_up_and_is_promoted() -> None:
    g = _ready_group()
    for i in range(30):
        g.cores["a"].propose(b"w%d" % i, g.now)
    g.settle()
    _join(g, "d")
    conf = g.cores["a"].membership
    g.cores["a"].propose_membership(conf.add_learner("d", "tcp://d"), g.now)
    g.settle()
    assert g.cores["a"].membership.learners == ("d",)
    g.advance(0.5)
    final = g.cores["a"].membership
    assert final.voters == ("a", "b", "c", "d") and final.learners == ()
    assert final.incarnations == (("d", "inc-d"),)
    assert g.cores["d"].voter and g.cores["d"].promoted
    assert {n: c.voters for n, c in _confs(g).items()} == {n: final.voters for n in "abcd"}
    assert [e.data for e in g.applied["d"]] == [e.data for e in g.applied["a"]]


def test_two_caught_up_learners_are_promoted_one_change_at_a_time() -> None:
    """The leader proposes one promotion per tick: a second in the same tick would break
    the one-change-at-a-time rule (propose_membership raises out of tick)."""
    g = _ready_group()
    _join(g, "d")
    _join(g, "e")
    g.cut |= {frozenset(("a", "d")), frozenset(("a", "e"))}  # neither catches up yet
    for learner in "de":
        g.cores["a"].propose_membership(g.cores["a"].membership.add_learner(learner, ""), g.now)
        g.settle()
    assert g.cores["a"].membership.learners == ("d", "e")
    g.cut.clear()  # both catch up in the same round of heartbeats
    g.advance(1.0)
    final = g.cores["a"].membership
    assert final.voters == ("a", "b", "c", "d", "e") and final.learners == ()


def test_learner_far_behind_is_not_promoted() -> None:
    g = _ready_group()
    _join(g, "d", lag_max=5)
    g.cut |= {frozenset(("a", "d"))}
    g.cores["a"].propose_membership(g.cores["a"].membership.add_learner("d", ""), g.now)
    for i in range(20):
        g.cores["a"].propose(b"w%d" % i, g.now)
    g.advance(0.5)
    assert g.cores["a"].membership.learners == ("d",)
    assert not g.cores["d"].voter
    g.cut.clear()
    g.advance(0.5)
    assert "d" in g.cores["a"].membership.voters and g.cores["d"].voter


def test_remove_follower_then_commits_with_the_rest() -> None:
    g = _ready_group()
    a = g.cores["a"]
    a.propose_membership(a.membership.remove("c"), g.now)
    g.advance(0.3)
    assert a.membership.voters == ("a", "b") and not a.change_pending()
    g.down.add("c")
    idx = a.propose(b"after", g.now)
    g.settle()
    assert idx is not None and a.commit_index >= idx
    g.down.discard("c")
    g.cores["c"].campaign(g.now + 5)  # a removed node knows it is out: never stands
    g.settle()
    assert g.cores["c"].role is Role.FOLLOWER and g.leader() == "a"


def test_leader_removal_steps_down_after_commit_and_others_elect() -> None:
    g = _ready_group()
    a = g.cores["a"]
    a.propose_membership(a.membership.remove("a"), g.now)
    g.settle()
    g.advance(0.2)
    assert a.role is Role.FOLLOWER  # committed by b and c, then it stepped down
    assert g.cores["b"].membership.voters == ("b", "c")
    assert g.leader() in ("b", "c")  # handed over: no election timeout to wait
    a.campaign(g.now)
    g.settle()
    assert a.role is Role.FOLLOWER


def test_replace_adds_promotes_then_removes_the_old_voter() -> None:
    g = _ready_group()
    g.down.add("c")  # the machine is gone for good
    _join(g, "d")
    a = g.cores["a"]
    a.propose_membership(a.membership.add_learner("d", "tcp://d", replaces="c"), g.now)
    g.advance(1.0)
    assert a.membership.voters == ("a", "b", "d") and a.membership.learners == ()
    assert a.role is Role.LEADER
    a.propose(b"x", g.now)
    g.advance(0.2)
    assert b"x" in [e.data for e in g.applied["d"]]


def test_rules_refuse_a_second_change_early_changes_and_two_voters_at_once() -> None:
    fresh = Replica(ReplicaConfig("a", ("a", "b", "c")), HardState(0, ""), [])
    fresh.campaign(0.0)
    fresh.step("b", VoteReply(1, "b", True, True), 0.0)
    fresh.step("b", VoteReply(1, "b", True), 0.0)
    assert fresh.role is Role.LEADER  # its no-op is not committed: nobody acked it yet
    with pytest.raises(mship.MembershipBusy, match="of this term"):  # for now: UNAVAILABLE
        fresh.propose_membership(fresh.membership.add_learner("d", ""), 0.0)
    g = _ready_group()
    a = g.cores["a"]
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    a.propose_membership(a.membership.add_learner("d", ""), g.now)
    with pytest.raises(mship.MembershipBusy, match="in progress"):
        a.propose_membership(a.membership.add_learner("e", ""), g.now)
    with pytest.raises(MembershipError, match="one change at a time") as refused:
        mship.check_change(Membership(("a", "b", "c")), Membership(("a", "b", "c", "d", "e")))
    assert not isinstance(refused.value, mship.MembershipBusy)  # for good: BAD_REQUEST
    with pytest.raises(MembershipError):
        g.cores["b"].propose_membership(Membership(("b",)), g.now)  # not the leader


def test_single_change_majorities_always_intersect_two_changes_do_not() -> None:
    rng = random.Random(7)
    names = list("abcdefg")
    for _ in range(300):
        old = set(rng.sample(names, rng.randint(1, 6)))
        other = rng.choice([n for n in names if n not in old] or list(old))
        new = old ^ {other} or old
        for m1 in _majorities(old):
            assert all(m1 & m2 for m2 in _majorities(new))
    old, new = {"a", "b", "c"}, {"a", "b", "c", "d", "e"}
    assert any(not (m1 & m2) for m1 in _majorities(old) for m2 in _majorities(new))


def _majorities(voters: set[str]) -> list[set[str]]:
    q = len(voters) // 2 + 1
    return [set(c) for c in itertools.combinations(sorted(voters), q)]


def test_broken_variant_two_voters_at_once_commits_two_entries_at_one_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the one-at-a-time rule switched off, {a,b,c} -> {a,b,c,d,e} lets a commit
    with {a,d,e} while b, which never saw the change, is elected by {b,c} and commits
    something else at the same index."""
    monkeypatch.setattr(mship, "check_change", lambda old, new: None)
    g = _ready_group()
    for n in ("d", "e"):
        _join(g, n, voter=True)  # broken twice over: empty voters counted at once
    a = g.cores["a"]
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    a.propose_membership(Membership(("a", "b", "c", "d", "e")), g.now)
    ia = a.propose(b"from-a", g.now)
    g.settle()
    g.advance(0.2)
    assert ia is not None and a.commit_index >= ia  # committed by a, d, e
    g.cut |= {frozenset((x, y)) for x in "bc" for y in "de"}
    g.advance(1.2)
    g.elect("b")
    b = g.cores["b"]
    assert b.role is Role.LEADER  # by b and c, a majority of {a, b, c}
    b.propose(b"from-b", g.now)
    g.advance(0.3)
    assert b.commit_index >= ia
    assert a.term_at(ia) != b.term_at(ia)  # two different committed entries at one index


def test_snapshot_carries_the_configuration_to_a_new_learner() -> None:
    g = _ready_group()
    a = g.cores["a"]
    a.propose_membership(a.membership.remove("c"), g.now)
    g.advance(0.3)
    for i in range(10):
        a.propose(b"%d" % i, g.now)
    g.advance(0.3)
    a.compacted(a.commit_index, a.term_at(a.commit_index) or 0, b"STATE")
    _join(g, "d")
    a.propose_membership(a.membership.add_learner("d", ""), g.now)
    installed: list[tuple[int, int, bytes]] = []
    original = g.cores["d"].ready

    def spy() -> Ready:
        rd = original()
        if rd.snapshot:
            installed.append(rd.snapshot)
            g.log["d"] = [Entry(0, i + 1, b"") for i in range(rd.snapshot[0])]
        return rd

    g.cores["d"].ready = spy  # type: ignore[method-assign]
    g.advance(1.0)
    assert installed and installed[0][2] == b"STATE"  # the shell sees the state only
    assert g.cores["d"].membership == a.membership
    assert a.membership.voters == ("a", "b", "d")


def test_restart_recovers_the_configuration_from_snapshot_and_log() -> None:
    conf = Membership(("a", "b"), ("z",))
    later = Membership(("a", "b", "z"), (), incarnations=(("z", "i"),))
    snap = (5, 1, mship.wrap_snapshot(conf, b"S"))
    entries = [Entry(1, 6, b"x"), Entry(1, 7, mship.encode(later))]
    core = Replica(ReplicaConfig("z", ("a", "b", "z"), voter=False, incarnation="i"),
                   HardState(1, ""), entries, snap)
    assert core.membership == later and core.membership_at(6) == conf
    assert core.voter  # its own promotion is in its log
    wiped = Replica(ReplicaConfig("z", ("a", "b", "z"), voter=False, incarnation="other"),
                    HardState(1, ""), entries, snap)
    assert not wiped.voter  # a later data dir under the same id is not admitted by it


def test_promotion_does_not_depose_the_leader_before_the_new_voter_answers() -> None:
    """Found by the process test: check-quorum ran against the new (larger) voter set
    before the promoted learner's acks had said it may vote, and deposed the leader."""
    g = _ready_group()
    _join(g, "d", lag_max=0)
    a = g.cores["a"]
    g.down.add("b")  # b is gone: the promotion must commit with a, c and d
    g.advance(1.2)
    g.cut.add(frozenset(("a", "d")))
    a.propose_membership(a.membership.add_learner("d", ""), g.now)
    g.advance(0.3)
    g.cut.clear()
    for _ in range(40):  # until d has caught up and a promotes it (in a tick)
        g.now = round(g.now + 0.01, 6)
        for n in ("a", "c", "d"):
            g.cores[n].tick(g.now)
        if "d" in a.membership.voters:
            break
        g.settle()
    assert "d" in a.membership.voters
    g.cut.add(frozenset(("a", "d")))  # d's first ack as a voter is late
    g.settle()
    g.advance(0.15)
    assert a.role is Role.LEADER  # no answer from d yet: not a reason to step down at once
    g.cut.clear()
    g.advance(0.5)
    assert a.role is Role.LEADER and not a.change_pending()


def test_transfer_leadership_to_a_caught_up_voter_without_election_timeout() -> None:
    g = _ready_group()
    a = g.cores["a"]
    a.propose(b"x", g.now)
    g.settle()
    assert a.transfer_leadership("c", g.now)
    g.settle()
    assert g.leader() == "c" and g.cores["c"].term == 2  # at once: no lease wait
    assert b"x" in [e.data for e in g.log["c"]]


def test_transfer_waits_for_the_target_to_catch_up_and_gives_up_after_a_timeout() -> None:
    g = _ready_group()
    a = g.cores["a"]
    g.cut.add(frozenset(("a", "c")))
    a.propose(b"x", g.now)
    g.settle()
    assert a.transfer_leadership("c", g.now)
    g.advance(0.3)
    assert g.leader() == "a"  # c lacks x: no TimeoutNow yet
    g.cut.clear()
    g.advance(0.3)
    assert g.leader() == "c"
    c = g.cores["c"]
    g.cut.add(frozenset(("c", "b")))
    c.propose(b"y", g.now)
    g.settle()
    c.transfer_leadership("b", g.now)
    g.advance(1.2)
    assert c.role is Role.LEADER or g.leader() != "b"  # never caught up: c gave up
    assert not c.transfer_leadership("zz", g.now)  # not a voter


def test_default_transfer_target_is_the_most_up_to_date_voter() -> None:
    g = _ready_group()
    a = g.cores["a"]
    g.cut.add(frozenset(("a", "b")))
    a.propose(b"x", g.now)
    g.settle()
    assert a.transfer_leadership("", g.now)
    g.settle()
    assert g.leader() == "c"


def test_writes_after_timeout_now_do_not_cost_the_target_its_election() -> None:
    """Found by the rolling-restart test: entries the leader replicated after sending
    TimeoutNow made the third voter's log longer than the target's, so the transfer
    election failed and the shard waited an election timeout."""
    g = _ready_group()
    a = g.cores["a"]
    assert a.transfer_leadership("c", g.now)  # c is caught up: TimeoutNow is queued
    a.propose(b"late", g.now)  # a client write arriving in the same turn
    g.settle()
    assert g.leader() == "c" and g.cores["c"].term == 2
    g.advance(0.3)
    assert b"late" not in [e.data for e in g.applied["c"]]  # never acknowledged either


def test_wiped_voter_is_readmitted_once_caught_up_and_then_counts() -> None:
    g = _ready_group()
    a = g.cores["a"]
    for i in range(10):
        a.propose(b"w%d" % i, g.now)
    g.advance(0.3)
    members = tuple(g.cores)
    g.cores["c"] = Replica(ReplicaConfig("c", members, voter=False, incarnation="new-c"),
                           HardState(0, ""), [])
    g.log["c"], g.applied["c"] = [], []
    g.advance(0.5)
    assert a.membership.incarnations == (("c", "new-c"),)
    assert g.cores["c"].voter and g.cores["c"].promoted
    assert [e.data for e in g.log["c"]][:12] == [e.data for e in g.log["a"]][:12]
    g.down.add("b")  # now c's acks must count: a commits with a and c
    idx = a.propose(b"after", g.now)
    g.advance(0.2)
    assert idx is not None and a.commit_index >= idx


def test_a_readmitted_node_gives_no_second_vote_in_the_term_it_rejoined() -> None:
    """Its predecessor may have voted in this term; the new data dir cannot know."""
    g = _ready_group()
    members = tuple(g.cores)
    g.cores["b"] = Replica(ReplicaConfig("b", members, voter=False, incarnation="new-b"),
                           HardState(0, ""), [])
    g.log["b"], g.applied["b"] = [], []
    g.advance(0.5)
    b = g.cores["b"]
    assert b.voter and b.term == 1 and b.voted_for == "a"
    b.step("c", VoteRequest(1, "c", 99, 1), g.now + 5)  # a late vote request of term 1
    assert not any(isinstance(m, VoteReply) and m.granted for _, m in b.ready().messages)


# ------------------------------------------------------------------ node keys (issue 12)

KEY_D = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # 40 z85 characters
KEY_E = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"


def test_configuration_with_keys_roundtrip_and_old_encoding_unchanged() -> None:
    old = Membership(("a", "b"), ("c",), (("c", "tcp://x:1"),), (), (("a", "i"),))
    old_bytes = mship.encode(old)
    assert old_bytes[:2] == b"\x96\x0b"  # a configuration without keys: the bytes of before
    assert len(msgpack_unpack(old_bytes)) == 6 and mship.decode(old_bytes).keys == ()
    with_keys = old.add_learner("d", "tcp://d:1", key=KEY_D)
    data = mship.encode(with_keys)
    assert mship.is_config(data) and mship.decode(data) == with_keys
    assert with_keys.key_of("d") == KEY_D and with_keys.key_of("a") == ""
    conf, state = mship.unwrap_snapshot(mship.wrap_snapshot(with_keys, b"S"))
    assert conf == with_keys and state == b"S"
    # the state machine takes both forms as its no-op
    from zkv.storage_node.commands import Noop, decode_command
    assert isinstance(decode_command(data), Noop) and isinstance(decode_command(old_bytes), Noop)


def msgpack_unpack(data: bytes) -> list[object]:
    import msgpack

    v = msgpack.unpackb(data, raw=False)
    assert isinstance(v, list)
    return v


def test_bad_member_keys_are_refused() -> None:
    import msgpack

    conf = Membership(("a",))
    for bad in ("short", KEY_D + "x", "é" * 40, KEY_D[:-1] + "~"):
        with pytest.raises(MembershipError, match="public_key"):
            conf.add_learner("d", "tcp://d", key=bad)
    data = msgpack.packb([11, ["a"], [], [], [], [], [["a", "not a key"]]])
    with pytest.raises(Exception, match="z85"):
        mship.decode(data)
    with pytest.raises(Exception):  # noqa: B017 - 8 fields: not a configuration
        mship.decode(msgpack.packb([11, ["a"], [], [], [], [], [], []]))


def test_admin_requests_carry_the_key_and_removal_drops_it() -> None:
    from zkv.protocol.messages import AdminAddReplica, AdminRemoveReplica, AdminReplaceReplica

    conf = Membership(("a", "b", "c"))
    added = mship.change_for(AdminAddReplica(b"", 1, 0, "d", "tcp://d:1", KEY_D), conf)
    assert added is not None and added.keys == (("d", KEY_D),)
    assert mship.change_for(AdminAddReplica(b"", 1, 0, "e", "tcp://e:1"), added).keys == added.keys  # type: ignore[union-attr]
    rep = mship.change_for(AdminReplaceReplica(b"", 1, 0, "a", "e", "tcp://e:1", KEY_E), added)
    assert rep is not None and dict(rep.keys) == {"d": KEY_D, "e": KEY_E}
    with pytest.raises(MembershipError, match="public_key"):
        mship.change_for(AdminAddReplica(b"", 1, 0, "f", "tcp://f:1", "garbage"), conf)
    with pytest.raises(MembershipError, match="public_key"):
        mship.change_for(AdminAddReplica(b"", 1, 0, "f", "tcp://f:1", 7), conf)  # type: ignore[arg-type]
    removed = mship.change_for(AdminRemoveReplica(b"", 1, 0, "d"), rep)
    assert removed is not None and removed.keys == (("e", KEY_E),)
    assert mship.describe(rep)["keys"] == {"d": KEY_D, "e": KEY_E}


def test_committed_membership_is_the_committed_one_not_the_latest() -> None:
    """Keys are trusted from the committed configuration only: an appended but not yet
    committed change (its majority cut off) is not it; once committed it is."""
    g = _ready_group()
    a = g.cores["a"]
    before_index, before = a.committed_membership()
    assert before == a.membership and before.keys == ()
    _join(g, "d")
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    a.propose_membership(a.membership.add_learner("d", "tcp://d", key=KEY_D), g.now)
    g.settle()
    assert a.membership.keys == (("d", KEY_D),)  # in force at once ...
    assert a.committed_membership() == (before_index, before)  # ... but not committed
    g.cut.clear()
    g.advance(0.3)
    index, committed = a.committed_membership()
    assert committed.key_of("d") == KEY_D and index > before_index
    assert g.cores["b"].committed_membership()[1].key_of("d") == KEY_D  # followers too


def test_a_voter_that_lagged_behind_the_change_adding_its_leader_catches_up() -> None:
    """Found by the simulator's membership nemesis (tests/sim/members.py): c misses the
    change that adds d; d then leads. c's configuration does not name d, and a voter
    ignores appends from a non-member (another group's leader, ``Replica.step``), so c
    never caught up again. Its shell knows better: d's connection announced a node of
    this shard (``peer_link``), and once vouched for, d's appends are taken."""
    g = _ready_group()
    g.cut |= {frozenset(("c", n)) for n in "abd"}  # c lags from here on
    _join(g, "d")
    a = g.cores["a"]
    a.propose_membership(a.membership.add_learner("d", "tcp://d"), g.now)
    g.advance(0.5)
    assert a.membership.voters == ("a", "b", "c", "d") and not a.change_pending()
    assert a.transfer_leadership("d", g.now)
    g.advance(0.5)
    d, c = g.cores["d"], g.cores["c"]
    assert g.leader() == "d" and "d" not in c.membership.members
    for i in range(5):
        d.propose(b"after%d" % i, g.now)
    g.cut.clear()
    g.advance(0.5)
    assert c.last_index < d.last_index  # ignored: d is nobody to c
    c.vouch("d")  # its shell saw d's connection announce this shard
    g.advance(0.5)
    assert c.last_index == d.last_index and c.membership == d.membership
    assert [e.data for e in g.applied["c"]] == [e.data for e in g.applied["d"]]


def test_a_vouched_node_is_heard_like_a_member_and_counts_as_the_configuration_says() -> None:
    """Found by the simulator's membership nemesis: b was down through two replacements
    (a by d, then d by e) and c lost its disk; e, the only up-to-date voter, needs b's
    vote, and b's configuration (a, b, c... then b, c, d) does not name e: a voter that
    ignores vote requests from non-members left the shard without a leader for good.
    A node the shell vouched for is heard like a member (its appends, its vote
    requests); its votes count only where our configuration names it a voter, and a
    node nobody vouched for stays ignored."""
    b = Replica(ReplicaConfig("b", ("b", "c", "d")), HardState(3, ""), [Entry(3, 1, b"x")])
    request = VoteRequest(4, "e", 9, 3)
    b.step("zz", request, 100.0)
    b.step("e", request, 100.0)
    assert b.term == 3 and not b.ready().messages  # nobody vouched for either
    b.vouch("e")
    b.step("e", request, 100.0)
    assert [(to, m.granted) for to, m in b.ready().messages
            if isinstance(m, VoteReply)] == [("e", True)]
    c = Replica(ReplicaConfig("c", ("b", "c", "d")), HardState(5, ""), [])
    c.vouch("e")
    c.campaign(200.0)
    c.step("e", VoteReply(6, "e", True, True, "c"), 200.0)
    assert c.role is not Role.LEADER and c._prevote  # e's vote is no vote of c's group


def test_replace_by_a_node_that_already_votes_removes_the_old_one_once_it_counts() -> None:
    """Found by the simulator's membership nemesis: a node that restarts with no
    configuration in its log or snapshot takes its ``--peers`` as its configuration,
    and the supervisor names a node it adds in everyone's ``--peers`` (cluster.json)
    before replace-replica reaches the leader. There the new node is a voter slot, and
    once that node leads it re-admits the new node's data dir. replace-replica then
    found the new node a member ("asked before") and the old one was never removed.
    Now the replacement is recorded, and the old voter goes once the new one counts."""
    from zkv.protocol.messages import AdminReplaceReplica

    members = ("a", "b", "c", "d")
    g = Group(members)
    g.cores["d"] = Replica(ReplicaConfig("d", members, voter=False, incarnation="inc-d"),
                           HardState(0, ""), [])
    g.elect("a")
    g.advance(0.5)
    a = g.cores["a"]
    assert a.membership.incarnations == (("d", "inc-d"),) and g.cores["d"].voter
    req = AdminReplaceReplica(b"", 1, 0, "c", "d", "tcp://d")
    new = mship.change_for(req, a.membership)
    assert new is not None and new.voters == a.membership.voters
    assert new.replaces == (("d", "c"),)
    a.propose_membership(new, g.now)
    g.advance(0.5)
    assert a.membership.voters == ("a", "b", "d") and a.membership.replaces == ()
    assert mship.change_for(req, a.membership) is None  # done


def test_a_replacement_removes_the_old_voter_only_once_the_new_one_counts() -> None:
    g = _ready_group()
    d = "d"
    _join(g, d)
    a = g.cores["a"]
    a.propose_membership(a.membership.add_learner(d, "tcp://d", replaces="c"), g.now)
    g.settle()
    g.cut |= {frozenset(("a", d))}  # d is promoted below but cannot answer as a voter
    a.tick(g.now + 0.05)
    pr = a._progress[d]
    pr.match_index, pr.incarnation = a.last_index, "inc-d"  # it had caught up
    g.advance(0.3)
    assert d in a.membership.voters and "c" in a.membership.voters  # not counted yet
    g.cut.clear()
    g.advance(0.5)
    assert a.membership.voters == ("a", "b", "d")


def test_the_operator_asks_again_for_a_change_its_leader_lost(monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    """Found by the simulator's membership nemesis: a change is answered once proposed
    (``admin_requests.py``); if its leader loses leadership before committing it, the
    next leader's log may not hold it. ``zkv admin remove-replica`` (and add, replace)
    then polled until ``--wait`` ran out. Now, seeing the change neither made nor
    pending nor under way, it asks again (every op is idempotent)."""
    import argparse

    from zkv.ops import membership as ops
    from zkv.protocol.messages import AdminMembersReply, AdminRemoveReplica

    monkeypatch.setattr(ops, "POLL_S", 0.0)

    class LosesTheFirstProposal:
        removes = 0

        def admin(self, req: object, *, timeout: float | None = None) -> AdminMembersReply:
            if isinstance(req, AdminRemoveReplica):
                self.removes += 1
                return AdminMembersReply(0, "a", ("a", "b"), (), {}, {}, {}, True, 9, "")
            voters = ("a", "b", "c") if self.removes < 2 else ("a", "b")
            return AdminMembersReply(0, "a", voters, (), {}, {}, {}, False, 0, "")

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="admin_command")
    ops.add_arguments(sub, argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["remove-replica", "0", "c", "--wait", "1"])
    kv = LosesTheFirstProposal()
    assert ops.run(kv, args, lambda _: None) == 0  # type: ignore[arg-type]
    assert kv.removes == 2


def test_a_learner_is_promoted_only_while_the_voters_that_count_keep_a_quorum() -> None:
    """Found by the simulator's membership nemesis: voters a, b, c with c's data dir
    wiped (a non-voter until re-admitted, which needs it to catch up); the leader
    promoted learner d at once: voters a, b, c, d, quorum 3, of which only a and b
    counted until d saw its promotion. The leader lost leadership before d did: no
    quorum could form again (d does not vote before it sees its promotion, c before it
    is re-admitted). Now, while such a voter is heard (catching up), it is re-admitted
    before any learner is promoted."""
    g = _ready_group()
    a = g.cores["a"]
    _join(g, "d")
    g.cut |= {frozenset(("a", "c")), frozenset(("b", "c"))}
    a._progress["c"].voter = False  # c's acks said so: its data dir came back empty
    a.propose_membership(a.membership.add_learner("d", "tcp://d"), g.now)
    g.advance(0.5)  # c acked within an election timeout: it may be catching up
    assert a.membership.learners == ("d",) and a.membership.voters == ("a", "b", "c")
    g.cut.clear()  # c answers again, as a voter (its acks say so): it counts
    g.advance(0.5)
    assert a.membership.voters == ("a", "b", "c", "d")


def test_a_voter_gone_for_good_is_replaced_under_a_leader_it_never_answered() -> None:
    """The container suite's case: the leader's machine is lost; the new leader never
    heard from it, so its acks do not count. Replacing it must still complete: with
    the learner, the voters that count (b, d and the learner) are a quorum of four."""
    g = _ready_group()
    g.down.add("a")  # the leader's machine is gone for good
    g.advance(1.5)  # b and c stop hearing from it
    g.elect("b")
    g.advance(0.3)
    assert g.leader() == "b"
    new = g.cores["b"]
    assert not new._progress["a"].voter  # never heard: a does not count
    _join(g, "e")
    g.advance(1.0)
    new.propose_membership(new.membership.add_learner("e", "tcp://e", replaces="a"), g.now)
    g.advance(2.0)
    assert set(new.membership.voters) == {"b", "c", "e"} and new.membership.learners == ()
    new.propose(b"after", g.now)
    g.advance(0.5)
    assert b"after" in [e.data for e in g.applied["e"]]


def test_strict_reconfiguration_check_refuses_a_removal_that_leaves_no_healthy_quorum() -> None:
    """etcd's strict reconfiguration check. a leads a, b, c and c is down: removing b
    would leave a and the dead c, one healthy voter of two, so no commit could follow.
    Refused as busy (retried until c is back); removing c itself, or b once c is back,
    is allowed."""
    from zkv.storage_node.membership import MembershipBusy, MembershipUnhealthy

    g = _ready_group()
    a = g.cores["a"]
    g.down.add("c")
    g.advance(1.5)  # c has not acked for more than an election timeout
    with pytest.raises(MembershipUnhealthy, match=r"1 healthy of 2 voters.*retry shortly"):
        a.propose_membership(a.membership.remove("b"), g.now)
    assert issubclass(MembershipUnhealthy, MembershipBusy)  # answered UNAVAILABLE
    with pytest.raises(MembershipUnhealthy):  # the leader removing itself: b alone
        a.propose_membership(a.membership.remove("a"), g.now)
    assert a.membership.voters == ("a", "b", "c") and not a.change_pending()

    g.down.discard("c")
    g.advance(0.5)  # c acks again
    a.propose_membership(a.membership.remove("b"), g.now)
    g.advance(0.5)
    assert a.membership.voters == ("a", "c") and not a.change_pending()


def test_strict_reconfiguration_check_lets_the_dead_voter_itself_be_removed() -> None:
    g = _ready_group()
    a = g.cores["a"]
    g.down.add("c")
    g.advance(1.5)
    a.propose_membership(a.membership.remove("c"), g.now)  # a and b: both healthy
    g.advance(0.5)
    assert a.membership.voters == ("a", "b") and not a.change_pending()


def test_a_replacement_with_one_voter_down_still_completes_under_the_check() -> None:
    """Replacing b while c is down: e is added and promoted, and removing b leaves a, c,
    e with c dead: 2 healthy of 3 is a quorum, so the check lets the leader finish."""
    g = _ready_group()
    a = g.cores["a"]
    _join(g, "e")
    g.advance(1.0)
    a.propose_membership(a.membership.add_learner("e", "tcp://e", replaces="b"), g.now)
    g.down.add("c")
    g.advance(3.0)
    assert set(a.membership.voters) == {"a", "c", "e"}, a.membership


def test_the_operator_is_told_why_a_change_was_refused_until_the_wait_ran_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal for now (the strict reconfiguration check) is retried until ``--wait``
    runs out; the error then carries the leader's reason, and each attempt is bounded
    by what is left of the wait (not the client's whole timeout)."""
    import argparse

    from zkv.ops import membership as ops
    from zkv.protocol.errors import Unavailable
    from zkv.protocol.messages import AdminMembersReply, AdminRemoveReplica

    monkeypatch.setattr(ops, "POLL_S", 0.0)
    why = "removing b would leave 1 healthy of 2 voters, fewer than a quorum (2)"

    class Refuses:
        timeouts: list[float | None] = []

        def admin(self, req: object, *, timeout: float | None = None) -> AdminMembersReply:
            if isinstance(req, AdminRemoveReplica):
                self.timeouts.append(timeout)
                raise Unavailable(why)
            return AdminMembersReply(0, "a", ("a", "b", "c"), (), {}, {}, {}, False, 0, "")

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="admin_command")
    ops.add_arguments(sub, argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["remove-replica", "0", "b", "--wait", "0.2"])
    kv = Refuses()
    with pytest.raises(ValueError, match="the leader's last answer: removing b would leave"):
        ops.run(kv, args, lambda _: None)  # type: ignore[arg-type]
    assert kv.timeouts and all(t is not None and t <= 1.0 for t in kv.timeouts)


def test_a_leaving_leader_that_handed_over_never_stands_again() -> None:
    """Found by the rolling-restart test (a 740 ms gap): a leader stopping on SIGTERM
    handed over to c; a broker heard it step down before it heard c lead and asked it to
    stand. Both other voters had just voted for c (a transfer vote names no leader, so
    no lease held them), granted its pre-vote and vote at the next term, and c stepped
    down; then the old leader exited, and the shard had no leader until the leases ran
    out. A leaving node now never stands, and says whom it handed over to."""
    g = _ready_group()
    a, b, c = (g.cores[n] for n in "abc")
    a.leave()
    assert a.transfer_leadership("c", g.now)
    [(_, to, timeout_now)] = g.process("a")
    assert to == "c"
    c.step("a", timeout_now, g.now)
    requests = [(to, m) for _, to, m in g.process("c")]
    for to, m in requests:  # the transfer vote reaches both voters
        g.cores[to].step("c", m, g.now)
    replies = g.process("a") + g.process("b")
    assert a.role is Role.FOLLOWER and a.handed_to == "c"
    a.campaign(g.now, a.term)  # the broker's order, from the step-down it heard
    late = g.process("a")
    assert late == []  # no pre-vote, no vote request
    for frm, to, m in replies:
        g.cores[to].step(frm, m, g.now)
    g.process("c")
    g.settle()
    assert g.leader() == "c" and c.term == 2
