"""Scenario tests of the replica core: messages delivered by hand, time passed by hand."""

from __future__ import annotations

from zkv.protocol.messages import AppendEntries, AppendReply, Entry, Role, VoteReply, VoteRequest
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.replica import Ready, Replica, ReplicaConfig

MEMBERS = ("a", "b", "c")


class Group:
    """Three cores and a mailbox; ``deliver`` moves messages, ``drop`` cuts links."""

    def __init__(self, members: tuple[str, ...] = MEMBERS) -> None:
        self.now = 0.0
        self.cores = {
            m: Replica(ReplicaConfig(m, members), HardState(0, ""), []) for m in members
        }
        self.log: dict[str, list[Entry]] = {m: [] for m in members}
        self.applied: dict[str, list[Entry]] = {m: [] for m in members}
        self.reads: dict[str, list[tuple[object, int]]] = {m: [] for m in members}
        self.failed_reads: dict[str, list[object]] = {m: [] for m in members}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()

    def process(self, node: str) -> list[tuple[str, str, object]]:
        core = self.cores[node]
        out: list[tuple[str, str, object]] = []
        while core.has_ready():
            rd: Ready = core.ready()
            if rd.truncate_from is not None:
                del self.log[node][rd.truncate_from - 1 :]
            self.log[node].extend(rd.entries)
            core.persisted(len(self.log[node]))
            out.extend((node, to, m) for to, m in rd.messages)
            self.applied[node].extend(rd.committed)
            self.reads[node].extend(rd.reads)
            self.failed_reads[node].extend(rd.failed_reads)
        return out

    def settle(self, steps: int = 50) -> None:
        pending: list[tuple[str, str, object]] = []
        for n in self.cores:
            if n not in self.down:
                pending += self.process(n)
        for _ in range(steps):
            if not pending:
                return
            nxt: list[tuple[str, str, object]] = []
            for frm, to, msg in pending:
                if to in self.down or frozenset((frm, to)) in self.cut:
                    continue
                self.cores[to].step(frm, msg, self.now)  # type: ignore[arg-type]
                nxt += self.process(to)
            pending = nxt

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            for n, core in self.cores.items():
                if n not in self.down:
                    core.tick(self.now)
            self.settle()

    def elect(self, node: str) -> None:
        self.cores[node].campaign(self.now)
        self.settle()

    def leader(self) -> str | None:
        leaders = [n for n, c in self.cores.items() if c.role is Role.LEADER and n not in self.down]
        return leaders[0] if len(leaders) == 1 else None


def test_single_member_elects_itself_and_commits() -> None:
    g = Group(("a",))
    g.elect("a")
    assert g.cores["a"].role is Role.LEADER
    idx = g.cores["a"].propose(b"x", g.now)
    g.settle()
    assert idx == 2  # 1 is the new leader's no-op
    assert [e.data for e in g.applied["a"]] == [b"\x91\x00", b"x"]


def test_campaign_elects_and_replicates_to_all() -> None:
    g = Group()
    g.elect("a")
    assert g.leader() == "a"
    assert all(c.term == 1 for c in g.cores.values())
    for i in range(10):
        g.cores["a"].propose(b"v%d" % i, g.now)
    g.settle()
    g.advance(0.2)
    for n in MEMBERS:
        assert [e.data for e in g.applied[n]][1:] == [b"v%d" % i for i in range(10)]


def test_voter_ignores_candidate_while_leader_is_live() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.3)
    g.cores["b"].campaign(g.now)  # broker's mistaken view: a is alive to its followers
    g.settle()
    assert g.leader() == "a" and g.cores["a"].term == 1 and g.cores["b"].term == 1


def test_a_campaign_asked_during_the_lease_does_not_disrupt_a_live_leader() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.3)
    g.cores["b"].campaign(g.now)  # kept until b's lease on a runs out: a keeps renewing it
    g.advance(3.0)
    assert g.leader() == "a" and all(c.term == 1 for c in g.cores.values())


def test_a_campaign_asked_during_the_lease_starts_when_it_runs_out() -> None:
    """The broker stops hearing a dead leader a little before its followers' lease runs
    out; the follower it asks stands at its first tick after the lease, not a
    heartbeat later when the broker asks again."""
    g = Group()
    g.elect("a")
    g.advance(0.3)
    g.down.add("a")
    died = g.now
    election_s = g.cores["b"].config.election_timeout_ms / 1000
    g.advance(election_s - 0.3)
    g.cores["b"].campaign(g.now)  # the broker asks once, while b still heard a lately
    g.settle()
    assert g.cores["b"].role is Role.FOLLOWER and g.cores["b"].term == 1
    while g.leader() != "b":
        assert g.now - died < election_s + 0.15, "b did not stand when its lease ran out"
        g.advance(0.05)
    assert g.cores["b"].term == 2


def test_prevote_does_not_bump_terms_of_an_isolated_node() -> None:
    g = Group()
    g.elect("a")
    g.cut |= {frozenset(("c", "a")), frozenset(("c", "b"))}
    g.advance(1.5)
    for _ in range(5):
        g.cores["c"].campaign(g.now)
        g.advance(1.1)
    assert g.cores["c"].term == 1  # never became a candidate
    g.cut.clear()
    g.advance(0.5)
    assert g.leader() == "a" and g.cores["a"].term == 1


def test_new_leader_after_leader_dies_and_log_is_kept() -> None:
    g = Group()
    g.elect("a")
    g.cores["a"].propose(b"keep", g.now)
    g.settle()
    g.advance(0.2)
    g.down.add("a")
    g.advance(1.1)
    g.elect("b")
    assert g.leader() == "b" and g.cores["b"].term == 2
    g.cores["b"].propose(b"after", g.now)
    g.settle()
    assert [e.data for e in g.applied["b"]][-3:] == [b"keep", b"\x91\x00", b"after"]


def test_leader_without_majority_steps_down_and_commits_nothing() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.2)
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    before = len(g.applied["a"])
    g.cores["a"].propose(b"lost", g.now)
    g.advance(1.2)
    assert g.cores["a"].role is Role.FOLLOWER
    assert len(g.applied["a"]) == before


def test_deposed_leader_truncates_its_uncommitted_suffix() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.2)
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    g.cores["a"].propose(b"orphan", g.now)
    g.settle()
    g.advance(1.2)
    g.elect("b")
    g.cores["b"].propose(b"winner", g.now)
    g.settle()
    g.cut.clear()
    g.advance(0.5)
    datas = [e.data for e in g.log["a"]]
    assert b"orphan" not in datas and b"winner" in datas
    assert [e.data for e in g.applied["a"]] == [e.data for e in g.applied["b"]]


def test_vote_refused_to_candidate_with_shorter_log() -> None:
    core = Replica(ReplicaConfig("a", MEMBERS), HardState(1, ""), [Entry(1, 1, b"x")])
    core.step("b", VoteRequest(2, "b", 0, 0), 10.0)
    rd = core.ready()
    replies = [m for _, m in rd.messages if isinstance(m, VoteReply)]
    assert replies and not replies[0].granted
    assert rd.hard_state == HardState(2, "")  # term adopted, no vote given


def test_vote_is_persisted_before_the_reply_is_sent() -> None:
    core = Replica(ReplicaConfig("a", MEMBERS), HardState(1, ""), [])
    core.step("b", VoteRequest(2, "b", 0, 0), 10.0)
    rd = core.ready()
    assert rd.hard_state == HardState(2, "b")
    assert any(isinstance(m, VoteReply) and m.granted for _, m in rd.messages)


def test_stale_term_append_is_answered_with_our_term() -> None:
    core = Replica(ReplicaConfig("a", MEMBERS), HardState(5, ""), [])
    core.step("b", AppendEntries(3, "b", 0, 0, (), 0, 0), 1.0)
    (to, reply), = core.ready().messages
    assert to == "b" and isinstance(reply, AppendReply) and reply.term == 5 and not reply.success


def test_linearizable_read_waits_for_majority_confirmation() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.2)
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    assert g.cores["a"].read_index("r1", g.now)
    g.settle()
    assert g.reads["a"] == []  # no majority heard the round
    g.cut.clear()
    g.advance(0.2)
    assert [t for t, _ in g.reads["a"]] == ["r1"]


def test_a_single_voter_confirms_a_read_as_it_arrives() -> None:
    """Quorum 1: the leader's own ack is the majority ``_confirm_reads`` would count in
    this turn's round, so a read needs no round, once a commit of its term says its
    commit index is current."""
    g = Group(("a",))
    a = g.cores["a"]
    assert a.read_index_now() is None  # not the leader yet
    a.campaign(g.now)
    assert a.role is Role.LEADER and a.read_index_now() is None  # its no-op not committed
    g.settle()
    assert a.commit_index == 1 and a.read_index_now() == 1
    a.propose(b"w", g.now)
    g.settle()
    assert a.read_index_now() == 2


def test_a_read_needs_its_round_with_more_than_one_voter() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.2)
    assert g.cores["a"].role is Role.LEADER and g.cores["a"].read_index_now() is None
    one = Group(("a",))
    one.elect("a")
    a = one.cores["a"]
    one.down.add("d")
    a.propose_membership(a.membership.add_learner("d", "tcp://d"), one.now)
    one.settle()
    assert a.read_index_now() is not None  # a learner does not vote: still quorum 1
    a.propose_membership(a.membership.promote("d", "inc-d"), one.now)
    # the voter being added counts from its entry on, before it commits: quorum 2
    assert a.membership.voters == ("a", "d") and a.read_index_now() is None


def test_reads_fail_when_leadership_is_lost() -> None:
    g = Group()
    g.elect("a")
    g.advance(0.2)
    g.cut |= {frozenset(("a", "b")), frozenset(("a", "c"))}
    g.cores["a"].read_index("r1", g.now)
    g.advance(1.2)
    assert g.failed_reads["a"] == ["r1"]


def test_lagging_follower_catches_up_by_snapshot() -> None:
    g = Group()
    g.elect("a")
    g.down.add("c")
    for i in range(20):
        g.cores["a"].propose(b"%d" % i, g.now)
    g.settle()
    leader = g.cores["a"]
    snap_index = leader.commit_index
    leader.compacted(snap_index, leader.term_at(snap_index) or 0, b"STATE")
    assert leader.snap_index == snap_index
    g.down.discard("c")
    installed: list[tuple[int, int, bytes]] = []
    original = g.cores["c"].ready

    def spy() -> Ready:
        rd = original()
        if rd.snapshot:
            installed.append(rd.snapshot)
            g.log["c"] = [Entry(0, i + 1, b"") for i in range(rd.snapshot[0])]
        return rd

    g.cores["c"].ready = spy  # type: ignore[method-assign]
    g.advance(0.5)
    assert installed and installed[0][0] == snap_index and installed[0][2] == b"STATE"
    assert g.cores["c"].commit_index == leader.commit_index
    # once on disk, the shell hands over its map of the file: what c streams from then
    follower = g.cores["c"]
    follower.snapshot_saved(snap_index - 1, b"OTHER")  # not the newest: nothing changes
    assert follower._snap_wire == b"STATE"
    follower.snapshot_saved(snap_index, b"STATE, longer")  # not what was installed
    assert follower._snap_wire == b"STATE"
    follower.snapshot_saved(snap_index, b"state")  # (the map reads the same bytes)
    assert follower._snap_wire == b"state"


def test_absurd_terms_are_ignored_not_adopted() -> None:
    from zkv.storage_node.replica import TERM_MAX

    core = Replica(ReplicaConfig("a", ("a",)), HardState(1, ""), [])
    core.campaign(1.0, known_term=TERM_MAX)
    assert core.term == 1 and core.role is Role.FOLLOWER
    core3 = Replica(ReplicaConfig("a", MEMBERS), HardState(1, ""), [])
    core3.step("b", VoteRequest(TERM_MAX, "b", 0, 0), 1.0)
    assert core3.term == 1 and not core3.ready().messages


def test_an_append_that_contradicts_committed_entries_is_refused_not_a_crash() -> None:
    """Network input never trips an assertion (invariant 6): a forged or misrouted
    AppendEntries at our term whose entries conflict with what we committed is refused
    (a real leader never sends one: its log contains every committed entry)."""
    g = Group()
    g.elect("a")
    for i in range(3):
        g.cores["a"].propose(b"w%d" % i, g.now)
        g.settle()
    b = g.cores["b"]
    committed = b.commit_index
    assert committed >= 3
    term = b.term
    forged = AppendEntries(term, "a", 0, 0, (Entry(term + 1, 1, b"forged"),), committed, 0)
    b.step("a", forged, g.now)  # must not raise
    assert b.commit_index == committed
    assert b.term_at(1) == term or b.term_at(1) != term + 1
    rd = b.ready()
    assert rd.truncate_from is None and not rd.entries


def test_a_voter_ignores_appends_from_a_node_outside_its_group() -> None:
    """A connection that reached a node of another shard (a stale address now used by
    another group) must not feed it that group's log."""
    g = Group()
    g.elect("a")
    g.cores["a"].propose(b"x", g.now)
    g.settle()
    b = g.cores["b"]
    last, term = b.last_index, b.term
    stranger = AppendEntries(term + 5, "zz", last, b.last_term, (Entry(term + 5, last + 1, b"y"),),
                             last + 1, 0)
    b.step("zz", stranger, g.now)
    assert b.term == term and b.last_index == last and b.leader_id == "a"


def _candidate_in_term_2(name: str = "c") -> Replica:
    core = Replica(ReplicaConfig(name, MEMBERS), HardState(1, ""), [])
    core.campaign(10.0)  # a pre-vote round first
    core.step("b", VoteReply(2, "b", True, True, name), 10.0)
    assert core.role is Role.CANDIDATE and core.term == 2
    return core


def test_a_vote_for_another_candidate_delivered_here_does_not_count() -> None:
    """Two candidates in term 2; b votes for a, but its reply reaches c (a stale address
    c now answers on): c must not count it, or c would lead with b's vote for a."""
    c = _candidate_in_term_2()
    c.step("b", VoteReply(2, "b", True, False, "a"), 10.0)
    assert c.role is Role.CANDIDATE
    c.step("b", VoteReply(2, "b", True, False, "c"), 10.0)
    assert c.role is Role.LEADER


def test_a_pre_vote_for_another_candidate_does_not_count_either() -> None:
    core = Replica(ReplicaConfig("c", MEMBERS), HardState(1, ""), [])
    core.campaign(10.0)
    core.step("b", VoteReply(2, "b", True, True, "a"), 10.0)
    assert core.role is Role.FOLLOWER and core.term == 1


def test_vote_replies_name_the_candidate_they_answer() -> None:
    core = Replica(ReplicaConfig("a", MEMBERS), HardState(1, ""), [])
    core.step("b", VoteRequest(2, "b", 0, 0), 10.0)
    replies = [m for _, m in core.ready().messages if isinstance(m, VoteReply)]
    assert replies and all(m.candidate == "b" for m in replies)


def test_a_vote_from_an_older_node_without_a_candidate_still_counts() -> None:
    c = _candidate_in_term_2()
    c.step("b", VoteReply(2, "b", True, False), 10.0)
    assert c.role is Role.LEADER


def _vote_requests(out: list[tuple[str, str, object]], pre_vote: bool) -> list[str]:
    return [to for _, to, m in out if type(m) is VoteRequest and m.pre_vote is pre_vote]


def test_a_lost_pre_vote_is_asked_again_a_heartbeat_later_not_an_election_later() -> None:
    """With message loss, one lost pre-vote request or reply used to cost a whole election
    timeout: the pre-candidate waited for the broker to ask again. It now asks the peers
    that have not granted again every heartbeat interval (Raft retries an RPC that got
    no answer), so the election ends a heartbeat after the loss."""
    g = Group()
    g.down.add("c")
    g.cut.add(frozenset(("a", "b")))  # the pre-vote to b is lost
    g.elect("a")
    assert g.leader() is None
    g.cut.clear()
    g.advance(0.15)  # more than a heartbeat (100 ms), far less than an election (0.7 s)
    assert g.leader() == "a" and g.cores["a"].term == 1


def test_a_lost_vote_is_asked_again_with_the_same_term() -> None:
    """The same for the real vote: the candidate asks again at its term, the voter that
    already granted it grants again (idempotent), and nobody's term moves."""
    g = Group()
    g.down.add("c")
    a = g.cores["a"]
    a.campaign(g.now)
    out = g.process("a")
    assert sorted(_vote_requests(out, True)) == ["b", "c"]
    g.cores["b"].step("a", next(m for _, to, m in out if to == "b"), g.now)  # type: ignore[arg-type]
    for _, _, m in g.process("b"):
        a.step("b", m, g.now)  # type: ignore[arg-type]
    out = g.process("a")
    assert a.role is Role.CANDIDATE and a.term == 1
    request = next(m for _, to, m in out if to == "b")
    g.cores["b"].step("a", request, g.now)  # type: ignore[arg-type]
    g.process("b")  # b grants; its reply is lost
    assert g.cores["b"].voted_for == "a"
    g.now = 0.11
    a.tick(g.now)
    again = g.process("a")
    assert sorted(_vote_requests(again, False)) == ["b", "c"]  # not yet granted: asked again
    assert all(m.term == 1 for _, _, m in again)  # type: ignore[attr-defined]
    g.cores["b"].step("a", next(m for _, to, m in again if to == "b"), g.now)  # type: ignore[arg-type]
    for _, _, m in g.process("b"):
        a.step("b", m, g.now)  # type: ignore[arg-type]
    g.settle()
    assert g.leader() == "a" and {c.term for n, c in g.cores.items() if n != "c"} == {1}


def test_vote_requests_are_not_repeated_faster_than_a_heartbeat_nor_past_the_election() -> None:
    g = Group()
    g.down.update(("b", "c"))
    a = g.cores["a"]
    a.campaign(g.now)
    assert len(_vote_requests(g.process("a"), True)) == 2
    sent = 0
    for i in range(1, 60):  # 20 ms ticks up to 1.2 s: the election times out at 0.7 s
        g.now = i * 0.02
        a.tick(g.now)
        sent += len(_vote_requests(g.process("a"), True))
    # a resend every 100 ms to each of 2 peers while the pre-vote runs (< 0.7 s)
    assert 0 < sent <= 2 * 6, sent
    assert a.role is Role.FOLLOWER and not a._prevote
