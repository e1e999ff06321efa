"""FailureDetector: when to ask for an election, whom, how often, and the rotation."""

from __future__ import annotations

import pytest

from zkv.broker.failure_detector import FailureDetector, check_timing
from zkv.broker.node_table import NodeTable
from zkv.protocol.messages import Campaign, Heartbeat, Role
from zkv.protocol.ring import RingConfig

pytestmark = pytest.mark.unit

F, L = Role.FOLLOWER, Role.LEADER
HB_S = 0.1
TIMEOUT_S = 1.0


def hb(
    node: str,
    role: Role = F,
    term: int = 1,
    log: tuple[int, int] = (1, 10),
    leader: str = "",
    members: tuple[str, ...] = ("s0r0", "s0r1", "s0r2"),
    shard: int = 0,
) -> Heartbeat:
    return Heartbeat(
        node_id=node, shard_id=shard, role=role, term=term, leader_id=leader,
        last_log_term=log[0], last_index=log[1], commit_index=0, applied_index=0,
        key_count=0, pid=1, peer_addr="", members=members,
        ring=RingConfig(1, (0,), 8), heartbeat_ms=100,
    )  # fmt: skip


class Cluster:
    """Fake time driving a table and a detector: heartbeats from the named nodes only."""

    def __init__(self) -> None:
        self.table = NodeTable(TIMEOUT_S)
        self.fd = FailureDetector("b1", heartbeat_ms=100, election_timeout_ms=1000)
        self.now = 0.0

    def beat(self, *beats: Heartbeat) -> None:
        for b in beats:
            self.table.observe(b, self.now)

    def tick(self) -> list[tuple[str, Campaign]]:
        self.table.tick(self.now)
        return [(o.node_id, o.campaign) for o in self.fd.tick(self.table, self.now)]

    def run(self, seconds: float, beats: list[Heartbeat]) -> list[tuple[float, str, int]]:
        """Advance in heartbeat steps, beating each step; return (time, node, term) sent."""
        sent = []
        for _ in range(round(seconds / HB_S)):
            self.now = round(self.now + HB_S, 6)
            self.beat(*beats)
            sent += [(self.now, node, c.term) for node, c in self.tick()]
        return sent


@pytest.mark.parametrize(
    ("hb_ms", "timeout_ms", "ok"),
    [(100, 1000, True), (100, 300, True), (100, 299, False), (50, 100, False), (0, 1000, False)],
)
def test_timing_relation(hb_ms: int, timeout_ms: int, ok: bool) -> None:
    if ok:
        check_timing(hb_ms, timeout_ms)
        FailureDetector("b", hb_ms, timeout_ms)
    else:
        with pytest.raises(ValueError, match="heartbeat"):
            FailureDetector("b", hb_ms, timeout_ms)


def test_live_leader_means_no_campaign() -> None:
    c = Cluster()
    sent = c.run(5.0, [hb("s0r0", L, 3), hb("s0r1", term=3), hb("s0r2", term=3)])
    assert sent == []


def test_leader_silent_for_timeout_then_best_follower_asked() -> None:
    c = Cluster()
    c.run(1.0, [hb("s0r0", L, 3), hb("s0r1", term=3, log=(3, 7)), hb("s0r2", term=3, log=(3, 9))])
    leader_last = c.now
    sent = c.run(1.5, [hb("s0r1", term=3, log=(3, 7)), hb("s0r2", term=3, log=(3, 9))])
    first_time, node, term = sent[0]
    assert node == "s0r2" and term == 3  # the longer log
    assert first_time == pytest.approx(leader_last + TIMEOUT_S)


@pytest.mark.parametrize(
    ("logs", "best"),
    [
        ({"s0r1": (3, 7), "s0r2": (3, 9)}, "s0r2"),
        ({"s0r1": (4, 2), "s0r2": (3, 9)}, "s0r1"),  # last log term first
        ({"s0r1": (3, 9), "s0r2": (3, 9)}, "s0r1"),  # tie: node id
        ({"s0r2": (0, 0), "s0r1": (0, 0), "s0r0": (0, 0)}, "s0r0"),
    ],
)
def test_candidate_ranking(logs: dict[str, tuple[int, int]], best: str) -> None:
    c = Cluster()
    c.beat(*(hb(n, log=lg, leader="gone") for n, lg in logs.items()))
    c.now = TIMEOUT_S
    c.beat(*(hb(n, log=lg, leader="gone") for n, lg in logs.items()))
    assert [n for n, _ in c.tick()] == [best]


def test_campaign_carries_highest_term_seen_and_broker_id() -> None:
    c = Cluster()
    c.beat(hb("s0r0", L, 3), hb("s0r1", term=5), hb("s0r2", term=4))
    c.now = 1.0
    c.beat(hb("s0r1", term=5), hb("s0r2", term=4))
    [(node, camp)] = c.tick()
    assert camp == Campaign(shard_id=0, term=5, broker_id="b1")


def test_repeats_once_per_heartbeat_and_rotates_after_three_tries() -> None:
    c = Cluster()
    beats = [hb("s0r1", log=(1, 9), leader="x"), hb("s0r2", log=(1, 5), leader="x")]
    sent = c.run(3.0, beats)
    nodes = [n for _, n, _ in sent]
    times = [t for t, _, _ in sent]
    assert all(b - a >= HB_S - 1e-9 for a, b in zip(times, times[1:], strict=False))
    assert nodes[:9] == ["s0r1"] * 3 + ["s0r2"] * 3 + ["s0r1"] * 3


def test_at_most_once_per_heartbeat_even_with_frequent_ticks() -> None:
    c = Cluster()
    beats = [hb("s0r1", leader="x"), hb("s0r2", leader="x")]
    c.beat(*beats)
    sent = []
    for i in range(1, 200):
        c.now = 1.0 + i * 0.01
        c.beat(*beats)
        sent += c.tick()
    assert 19 <= len(sent) <= 20  # ~2 s of ticks every 10 ms


def test_leader_appearing_ends_the_episode() -> None:
    c = Cluster()
    beats = [hb("s0r1", log=(1, 9), leader="x"), hb("s0r2", leader="x")]
    assert c.run(1.2, beats)
    assert c.run(1.0, [hb("s0r1", L, 2), hb("s0r2", term=2)]) == []
    # the new leader dies: a fresh episode starts with the best candidate again
    sent = c.run(1.5, [hb("s0r2", term=2, log=(2, 3))])
    assert sent[0][1] == "s0r2" and sent[0][2] == 2


def test_fresh_shard_elects_once_majority_heard() -> None:
    c = Cluster()
    c.beat(hb("s0r0", term=0, log=(0, 0)))
    assert c.tick() == []  # 1 of 3 members: wait
    c.now = 0.05
    c.beat(hb("s0r1", term=0, log=(0, 0)))
    assert c.tick() == [("s0r0", Campaign(0, 0, "b1"))]


def test_single_replica_shard_elects_at_once() -> None:
    c = Cluster()
    c.beat(hb("s0r0", term=0, log=(0, 0), members=("s0r0",)))
    assert c.tick() == [("s0r0", Campaign(0, 0, "b1"))]


def test_restarted_broker_waits_for_the_named_leader() -> None:
    c = Cluster()
    # followers are heard first and name a leader: no fast path
    c.beat(hb("s0r1", term=4, leader="s0r0"), hb("s0r2", term=4, leader="s0r0"))
    assert c.tick() == []
    c.now = 0.05
    c.beat(hb("s0r0", L, 4))
    assert c.run(3.0, [hb("s0r0", L, 4), hb("s0r1", term=4, leader="s0r0")]) == []


def test_named_leader_never_shows_up() -> None:
    c = Cluster()
    sent = c.run(2.0, [hb("s0r1", term=4, leader="s0r0"), hb("s0r2", term=4, leader="s0r0")])
    assert sent and sent[0][0] == pytest.approx(0.1 + TIMEOUT_S)


def test_no_members_known_waits_full_timeout() -> None:
    c = Cluster()
    sent = c.run(2.0, [hb("s0r0", members=())])
    assert sent[0][0] == pytest.approx(0.1 + TIMEOUT_S)


def test_non_members_are_not_asked() -> None:
    c = Cluster()
    beats = [hb("s0r0", log=(9, 9), members=("s0r1",)), hb("s0r1", members=("s0r1",))]
    c.beat(*beats)
    assert [n for n, _ in c.tick()] == ["s0r1"]


def test_no_live_nodes_no_campaign() -> None:
    c = Cluster()
    c.beat(hb("s0r0", L))
    c.now = 5.0
    assert c.tick() == []


def test_shards_are_independent() -> None:
    c = Cluster()
    c.beat(
        hb("s0r0", L), hb("s0r1"),
        hb("s1r0", shard=1, members=("s1r0",), log=(0, 0)),
    )  # fmt: skip
    assert c.tick() == [("s1r0", Campaign(1, 1, "b1"))]


def test_leader_heard_stepping_down_makes_the_shard_due_at_once() -> None:
    """A leader heard claiming no leadership at its term stepped down (lost its quorum,
    or no broker confirmed it): ask at once rather than an election timeout after its
    last claim. Followers that still hear it ignore the request until their lease ends;
    followers cut from it long ago (the reason it lost its quorum) elect at once."""
    c = Cluster()
    c.beat(hb("s0r0", L, 2), hb("s0r1", term=2))
    assert c.tick() == []
    c.now = 0.1
    c.beat(hb("s0r0", F, 2), hb("s0r1", term=2))
    assert [n for n, _ in c.tick()] == ["s0r0"]


def test_a_leader_claim_and_its_step_down_between_two_ticks_still_count() -> None:
    """A restarted broker may get a node's queued (stale) leader heartbeats and its
    fresh follower ones in one drain: the step-down must still be noticed."""
    c = Cluster()
    c.beat(hb("s0r0", L, 2), hb("s0r1", term=2, leader="s0r0"))
    c.now = 0.05
    c.beat(hb("s0r0", F, 2), hb("s0r1", term=2, leader="s0r0"))
    assert [n for n, _ in c.tick()] == ["s0r0"]


def test_a_stale_non_leader_heartbeat_of_the_leader_does_not_count_as_stepping_down() -> None:
    c = Cluster()
    c.beat(hb("s0r0", F, 1), hb("s0r1", term=2))  # from before its election
    c.now = 0.05
    c.beat(hb("s0r0", L, 2))
    assert c.tick() == []
    c.now = 0.1
    c.table.observe(hb("s0r0", F, 1), c.now)  # a late duplicate of the old heartbeat
    assert c.tick() == []


def test_leader_silent_then_due_timeout_after_its_last_claim() -> None:
    c = Cluster()
    c.beat(hb("s0r0", L, 2), hb("s0r1", term=2))
    c.now = 0.99
    c.beat(hb("s0r1", term=2))
    assert c.tick() == []
    c.now = 1.0
    assert [n for n, _ in c.tick()] == ["s0r1"]


def test_restarted_broker_elects_at_once_when_the_named_leader_stepped_down() -> None:
    """The followers still name a leader that stepped down (no broker heard it for an
    election timeout, e.g. every broker was down): hearing that node as a follower makes
    the name stale, so a majority heard with no live claim elects at once."""
    c = Cluster()
    c.beat(
        hb("s0r0", F, 4, leader=""), hb("s0r1", term=4, leader="s0r0"),
        hb("s0r2", term=4, leader="s0r0"),
    )  # fmt: skip
    assert [n for n, _ in c.tick()] == ["s0r0"]


def test_a_node_that_may_not_vote_is_never_asked_to_stand() -> None:
    """A node whose data dir came back empty (heartbeat extra voter=False) would ignore
    a campaign; the most up-to-date *voter* is asked instead, or nobody."""
    import dataclasses

    c = Cluster()
    wiped = dataclasses.replace(hb("s0r0", log=(1, 50)), extra={"voter": False})
    sent = c.run(3.0, [wiped, hb("s0r1", log=(1, 10))])
    assert sent and {node for _, node, _ in sent} == {"s0r1"}
    alone = Cluster()
    assert alone.run(3.0, [wiped]) == []


def test_a_leader_handing_over_is_not_raced_by_a_campaign() -> None:
    """Found by the rolling-restart test: a leader stopping on SIGTERM steps down when
    its successor's transfer vote reaches it, and says whom it handed over to
    (``handed_to``). A broker that hears the step-down before the successor's first
    heartbeat as leader must wait for it: the campaign it used to send at once (to the
    old leader, the most up-to-date) deposed the successor."""
    import dataclasses

    c = Cluster()
    c.beat(hb("s0r0", L, 2, log=(2, 30)), hb("s0r1", term=2), hb("s0r2", term=2))
    assert c.tick() == []
    c.now = 0.1
    leaving = dataclasses.replace(hb("s0r0", F, 3, log=(2, 31)),
                                  extra={"leaving": True, "handed_to": "s0r1"})
    c.beat(leaving, hb("s0r1", Role.CANDIDATE, 3), hb("s0r2", term=3))
    assert c.tick() == []
    c.now = 0.15
    c.beat(hb("s0r1", L, 3))
    assert c.tick() == []


def test_a_handover_that_never_completes_elects_after_the_timeout_but_not_the_leaver() -> None:
    import dataclasses

    c = Cluster()
    c.beat(hb("s0r0", L, 2, log=(2, 30)), hb("s0r1", term=2), hb("s0r2", term=2))
    c.now = 0.1
    leaving = dataclasses.replace(hb("s0r0", F, 3, log=(2, 31)),
                                  extra={"leaving": True, "handed_to": "s0r1"})
    sent = c.run(2.0, [leaving, hb("s0r1", term=3), hb("s0r2", term=3)])
    assert sent and sent[0][0] == pytest.approx(1.0)  # an election timeout after its claim
    assert {node for _, node, _ in sent} <= {"s0r1", "s0r2"}


def test_a_leaving_node_is_never_asked_to_stand() -> None:
    import dataclasses

    c = Cluster()
    leaving = dataclasses.replace(hb("s0r0", log=(1, 50)), extra={"leaving": True})
    sent = c.run(3.0, [leaving, hb("s0r1", log=(1, 10))])
    assert sent and {node for _, node, _ in sent} == {"s0r1"}


def test_a_named_leader_not_heard_yet_still_waits() -> None:
    c = Cluster()
    c.beat(hb("s0r1", term=4, leader="s0r0"), hb("s0r2", term=4, leader="s0r0"))
    assert c.tick() == []


# --------------------------------------------------------------------------- confirmations


def heard(c: Cluster) -> dict[str, int]:
    return {o.node_id: o.heard.term for o in c.fd.confirmations(c.table, c.now)}


def test_every_node_heard_recently_is_confirmed_with_its_term() -> None:
    c = Cluster()
    c.beat(hb("s0r0", L, 3), hb("s0r1", term=3), hb("s1r0", term=7, shard=1, members=("s1r0",)))
    assert heard(c) == {"s0r0": 3, "s0r1": 3, "s1r0": 7}
    orders = c.fd.confirmations(c.table, c.now)
    assert {o.ident for o in orders} == {b"s0r0", b"s0r1", b"s1r0"}
    assert {o.heard.broker_id for o in orders} == {"b1"}


def test_confirmation_stops_within_three_heartbeats_of_silence() -> None:
    """Not at liveness (an election timeout): a leader cut from the brokers must learn
    it within a few intervals, so that it steps down ~1 election timeout after the cut."""
    c = Cluster()
    c.beat(hb("s0r0", L, 3), hb("s0r1", term=3))
    c.now = 0.29
    c.beat(hb("s0r1", term=3))
    assert heard(c) == {"s0r0": 3, "s0r1": 3}  # two heartbeats lost: still confirmed
    c.now = 0.31
    assert heard(c) == {"s0r1": 3}
    assert c.table.is_live("s0r0", c.now)  # while the table still counts it live


def test_with_no_leader_a_voter_of_a_newer_configuration_is_asked() -> None:
    """Found by the simulator's membership nemesis: the leader (r4) proposed its own
    removal (``replace-replica``: r6 in, r4 out) and crashed before committing it; r5 and
    r6 hold that configuration, r3 lagged far behind with an old one. With no leader the
    view's members are the largest heard (r3's: r1, r3, r4), so the broker asked only r4
    (no voter of its own configuration: it ignores campaigns) and r3 (too far behind to
    win), in turn, forever; r5 or r6 would win at once. A node that is a voter of the
    configuration it holds may be asked; one that is not never is."""
    import dataclasses

    def node(name: str, log: tuple[int, int], members: tuple[str, ...], role: str) -> Heartbeat:
        beat = hb(name, term=7, log=log, members=members)
        return dataclasses.replace(beat, extra={"voter": True, "config_role": role})

    new = ("s0r3", "s0r5", "s0r6")
    beats = [node("s0r3", (6, 18), ("s0r1", "s0r3", "s0r4"), "voter"),
             node("s0r4", (7, 38), new, "none"),
             node("s0r5", (7, 38), new, "voter"), node("s0r6", (7, 38), new, "voter")]
    c = Cluster()
    sent = c.run(4.0, beats)
    asked = [n for _, n, _ in sent]
    assert asked and asked[0] == "s0r5" and "s0r4" not in asked


def test_a_malformed_handed_to_is_read_as_none() -> None:
    import dataclasses

    c = Cluster()
    c.beat(hb("s0r0", L, 2), hb("s0r1", term=2))
    c.now = 0.1
    c.beat(dataclasses.replace(hb("s0r0", F, 2), extra={"handed_to": ["s0r1"]}),
           hb("s0r1", term=2))
    assert [n for n, _ in c.tick()] == ["s0r0"]  # a plain step-down
