"""The container harness's "is this node back in its shard" rule (``caught_up``), on
status answers written by hand: no Docker needed.

The rolling-upgrade test once failed because the old leader, restarted on the new
image, won the next election (its log was the longest) and the harness waited for it
to follow a leader other than itself."""

from __future__ import annotations

from typing import Any

from tests.containers.cluster import caught_up
from zkv.protocol.messages import Role


def _row(node: str, role: Role, term: int, commit: int, applied: int,
         shard: int = 0) -> dict[str, Any]:
    return {"node_id": node, "shard_id": shard, "role": int(role), "term": term,
            "commit_index": commit, "applied_index": applied}


def test_a_follower_is_back_once_it_applied_what_the_leader_committed() -> None:
    nodes = [_row("a", Role.LEADER, 2, 100, 100), _row("b", Role.FOLLOWER, 2, 99, 99)]
    assert caught_up(nodes, 0, "b") == (False, "a")
    nodes[1]["applied_index"] = 100
    assert caught_up(nodes, 0, "b") == (True, "a")


def test_a_restarted_node_that_won_the_election_is_back_once_it_applied_its_commits() -> None:
    # the failing run's status: the upgraded old leader, leader again at term 2
    nodes = [_row("s0r0", Role.LEADER, 2, 8059, 8059),
             _row("s0r1", Role.FOLLOWER, 2, 8059, 8058),
             _row("s0r2", Role.FOLLOWER, 2, 8059, 8059)]
    assert caught_up(nodes, 0, "s0r0") == (True, "s0r0")
    nodes[0]["applied_index"] = 8058
    assert caught_up(nodes, 0, "s0r0") == (False, "s0r0")


def test_a_node_still_claiming_an_older_term_is_not_back() -> None:
    nodes = [_row("a", Role.LEADER, 1, 50, 50), _row("b", Role.LEADER, 2, 60, 60)]
    assert caught_up(nodes, 0, "a") == (False, "b")


def test_no_leader_or_no_entry_or_nothing_committed_is_not_back() -> None:
    assert caught_up([_row("b", Role.FOLLOWER, 1, 5, 5)], 0, "b") == (False, None)
    assert caught_up([_row("a", Role.LEADER, 1, 5, 5)], 0, "b") == (False, "a")
    assert caught_up([_row("a", Role.LEADER, 1, 0, 0), _row("b", Role.FOLLOWER, 1, 0, 0)],
                     0, "b") == (False, "a")
    # another shard's leader does not count
    assert caught_up([_row("x", Role.LEADER, 3, 9, 9, shard=1),
                      _row("b", Role.FOLLOWER, 1, 5, 5)], 0, "b") == (False, None)
