"""Replace storage nodes whose disks are gone, under load (issue 11's container proof).

1 shard x 3 replicas + 2 brokers, every node's /data on a named volume. Eight clients
write and read through both brokers the whole time (half try broker0 first, half
broker1), and a sequencer writes 1, 2, 3, ...

1. A follower's host is lost: its container is SIGKILLed and removed, its volume
   deleted.
2. Its id comes back on an empty volume (a wiped disk, with ``--bootstrap`` as a compose
   file passes it on every start), its traffic to and from the leader dropped so that it
   can neither catch up nor be re-admitted while we look. It must not vote: ``zkv
   status`` shows it ``waiting`` with a new incarnation for three election timeouts,
   never a candidate or leader, and the leader and its term stay as they were (a wiped
   node that campaigned would depose the leader); the configuration still binds the
   slot to the lost disk's incarnation, not the new one. Then the host is given up
   (container and volume removed again).
3. A spare (a new host: own volume, no ``--bootstrap``) replaces it, through the CLI as
   an operator runs it: ``zkv admin replace-replica 0 OLD --node-id NEW --peer-addr
   tcp://NEW:7100`` (secure: ``--public-key`` of a pair no other process knows). It must
   become a voter and catch up, and the old id leaves the configuration.
4. The leader's host is lost the same way: the two voters left (one of them the new
   node, so it counts in the quorum) elect a leader, and a second spare replaces the old
   leader.

At the end: three voters, the two new nodes among them and neither old id, every one of
them caught up; no acknowledged write lost (the sequencer and final reads of every key)
and the history linearizable. Timings are recorded as test properties.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.containers.cluster import (
    NODE_PORT,
    SECURITY,
    ContainerCluster,
    close_client,
    make_client,
    wait_until,
)
from tests.containers.workload import (
    Load,
    Sequencer,
    check_history,
    final_reads,
    longest_ack_gap,
)
from zkv.client.status_view import role_name

# func_only: a first run also builds the image, which is not the test's time
pytestmark = [pytest.mark.containers, pytest.mark.timeout(240, func_only=True)]

CLIENTS = 8
KEYS = [f"rv{i}" for i in range(8)]
ELECTION_MS = 1000
#: how long the wiped node is watched not voting: three election timeouts
WATCH_S = 3 * ELECTION_MS / 1000
#: how long a "retry shortly" answer to replace-replica is retried
RETRY_S = 20.0


def _wait(what: str, timeout_s: float, probe: Callable[[], Any]) -> Any:
    return wait_until(what, timeout_s, probe)


def _members(admin: Any) -> Any:
    from zkv.ops.membership import members

    return members(admin, 0)


def _watch_wiped_node(c: ContainerCluster, admin: Any, node: str, leader: str,
                      old_incarnation: str) -> str:
    """Step 2: ``node`` on a blank disk, cut from ``leader``, must wait and not vote.
    Returns its new incarnation."""
    c.start_empty(node, drop=[leader])
    row = _wait(f"{node} on a blank disk in zkv status", 20, lambda: (
        (r := c.rows().get(node)) is not None
        and r.get("incarnation") not in (None, old_incarnation) and r))
    new_incarnation = str(row["incarnation"])
    term = c.rows()[leader]["term"]
    until = time.monotonic() + WATCH_S
    polls = 0
    while time.monotonic() < until:
        rows = c.rows()
        me = rows[node]
        assert me.get("incarnation") == new_incarnation, me
        assert me.get("voter") is False and me.get("membership") in ("bootstrapping", "waiting"), (
            f"{node} on a blank disk became a voter: {me}")
        assert role_name(me.get("role")) == "follower", f"{node} on a blank disk campaigned: {me}"
        assert c.leader_of(0) == leader and rows[leader]["term"] == term, (
            f"the shard's leader changed while {node} waited on a blank disk: "
            f"{ {n: (r.get('role'), r.get('term')) for n, r in rows.items()} }")
        polls += 1
        time.sleep(0.2)
    assert polls >= 5
    assert c.rows()[node].get("membership") == "waiting", c.rows()[node]
    shown = c.cli("status", "--json", timeout_s=30)
    assert shown.returncode == 0, shown.stderr
    nodes = {n["node_id"]: n for n in json.loads(shown.stdout)["shards"]["0"]["nodes"]}
    assert (nodes[node]["extra"]["membership"], nodes[node]["extra"]["voter"]) == (
        "waiting", False), nodes[node]
    conf = _members(admin)
    assert node in conf.voters and conf.incarnations.get(node) != new_incarnation, conf
    return new_incarnation


def _replace(c: ContainerCluster, admin: Any, old: str, new: str) -> tuple[float, int]:
    """Step 3: a spare ``new`` replaces the lost ``old`` through the CLI. Returns the
    seconds from the first command to ``new`` a caught-up voter, and how many times the
    leader said "retry shortly" (a leader just elected has no entry of its term
    committed yet, or a change is still pending): the operator then runs it again."""
    public_key = c.add_spare(0, new)
    started = time.monotonic()
    key_args = ["--public-key", str(public_key)] if public_key is not None else []
    retries = 0
    while True:
        proc = c.cli("admin", "replace-replica", "0", old, "--node-id", new,
                     "--peer-addr", f"tcp://{new}:{NODE_PORT}", *key_args, "--wait", "60")
        if (proc.returncode == 0 or "retry shortly" not in proc.stderr
                or time.monotonic() > started + RETRY_S):
            break
        retries += 1
        time.sleep(0.5)
    assert proc.returncode == 0, (
        f"replace-replica {old} -> {new} failed ({proc.returncode}, after {retries} "
        f"retries):\n{proc.stdout}\n{proc.stderr}")
    c.replaced(0, old, new)
    conf = _members(admin)
    assert new in conf.voters and old not in (*conf.voters, *conf.learners), conf
    c.wait_caught_up(0, new, timeout_s=30)
    row = _wait(f"{new} a voter in zkv status", 10, lambda: (
        (r := c.rows().get(new)) is not None and r.get("voter") is True and r))
    assert row.get("membership") == "voter", row
    return time.monotonic() - started, retries


@SECURITY
def test_replace_lost_disks_under_load(
    cluster_factory: Callable[..., ContainerCluster],
    record_property: Callable[[str, object], None],
    secure: bool,
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=1, replicas=3, brokers=2, secure=secure, volumes=True,
                        election_timeout_ms=ELECTION_MS)
    orders = itertools.cycle([c.brokers, list(reversed(c.brokers))])
    history = History()
    load = Load(history, lambda: c.client(next(orders), timeout_s=8), KEYS,
                processes=CLIENTS, name="rv").start()
    seq = Sequencer(lambda: c.client(timeout_s=8), "rvseq").start()
    admin = make_client(c.endpoints(), timeout_s=10, keys=c.admin_keys)
    try:
        time.sleep(1.5)
        leader = c.wait_for_leader(0)
        follower = c.followers_of(0, leader)[0]
        old_incarnation = str(c.rows()[follower]["incarnation"])

        # 1-2. the follower's disk is lost; its id back on a blank disk does not vote
        c.lose(follower)
        wiped = _watch_wiped_node(c, admin, follower, leader, old_incarnation)
        c.lose(follower)  # the host is given up

        # 3. a spare replaces it
        follower_s, follower_retries = _replace(c, admin, follower, "s0r3")

        # 4. the leader's disk is lost: the voters left, the new one included, elect a
        # leader; a second spare replaces the old leader
        time.sleep(1.0)
        fault_at = time.monotonic()
        c.lose(leader)
        new_leader = c.wait_for_leader(0, not_in={leader}, timeout_s=20)
        elected_s = time.monotonic() - fault_at
        leader_s, leader_retries = _replace(c, admin, leader, "s0r4")
        time.sleep(1.0)
        settled_at = time.monotonic()
    finally:
        stats = load.stop()
        last = seq.stop()

    try:
        conf = _members(admin)
        assert sorted(conf.voters) == sorted(c.nodes_by_shard[0]), conf
        assert {"s0r3", "s0r4"} <= set(conf.voters) and not conf.learners, conf
        assert not {leader, follower} & set(conf.voters), conf
        for node in c.nodes_by_shard[0]:
            if node != c.leader_of(0):
                c.wait_caught_up(0, node, timeout_s=20)
        final_reads(history, admin, KEYS)
        final = seq.verify(admin)
        result = check_history(history)
    finally:
        close_client(admin)
    # the longest time without an acknowledged write, from the leader's loss until its
    # replacement was a caught-up voter (and a second more)
    gap, _ = longest_ack_gap(stats, KEYS, fault_at, settled_at)
    for name, value in (("replace_follower_s", follower_s), ("replace_leader_s", leader_s),
                        ("election_s", elected_s), ("leader_loss_gap_s", gap)):
        record_property(name, round(value, 3))
    record_property("replace_retries", follower_retries + leader_retries)
    print(f"\nwiped {follower} waited as a non-voter (incarnation {wiped}, was "
          f"{old_incarnation}); replaced by s0r3 in {follower_s:.2f}s; leader {leader} "
          f"lost, {new_leader} elected in {elected_s:.2f}s (longest gap between "
          f"acknowledged writes {gap:.2f}s), replaced by s0r4 in {leader_s:.2f}s; "
          f"replace-replica retried {follower_retries} + {leader_retries} times; voters "
          f"{sorted(conf.voters)}; load {stats.ops} ops, {len(stats.acked_writes)} "
          f"acknowledged writes, errors {dict(stats.errors)}; sequencer {final} (last "
          f"acknowledged {last})")
    assert result.ok, f"history not linearizable: {result}"
    assert last > 0 and set(stats.errors) <= {"Timeout"}, f"clients saw {dict(stats.errors)}"

