"""Membership on real processes (issue 11): a replica that lost its disk never votes.

The scenario of the issue, 1 shard x 3, fsync always: stop follower C (SIGSTOP); 500
writes acknowledged by leader A and follower B; restart B on an empty data dir (with
``--bootstrap`` again, as a compose file passes it on every start); kill A (before B
is up, so B cannot catch up from it); resume C.
Before identities, C was elected with the wiped B's vote and all 500 writes were gone,
also after A came back. Now B learns from its peers that the shard exists, waits as a
non-voter, C cannot win an election, and once A is back every write is there and B,
caught up, is re-admitted. No term ever has two leaders (checked from every node's log).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from zkv.client import AsyncKVClient, KVClient
from zkv.ops.cluster import LocalCluster, spec_add_replica, spec_remove_replica
from zkv.ops.membership import members
from zkv.protocol.errors import KVError
from zkv.protocol.messages import AdminMembersReply, AdminReplaceReplica

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

WRITES = 500
LEADER_RE = re.compile(r"became leader of shard (\d+) at term (\d+)")


def _cluster(tmp_path: Path) -> LocalCluster:
    return LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=1, port=0,
                        fsync="always", heartbeat_ms=100, election_timeout_ms=600,
                        log_level="INFO")


def _status(cluster: LocalCluster) -> dict[str, Any] | None:
    try:
        return cluster.status(timeout_s=1.0)
    except KVError:
        return None


def _live_leaders(cluster: LocalCluster) -> list[tuple[str, int]]:
    status = _status(cluster) or {"nodes": []}
    return [(n["node_id"], n["term"]) for n in status["nodes"]
            if n["role"] == 2 and n.get("live", True)]


def wait_for(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def membership_of(cluster: LocalCluster, node_id: str) -> str | None:
    status = _status(cluster) or {"nodes": []}
    for n in status["nodes"]:
        if n["node_id"] == node_id and n.get("live", True):
            return str((n.get("extra") or {}).get("membership"))
    return None


def _node(cluster: LocalCluster, node_id: str) -> dict[str, Any]:
    status = _status(cluster) or {"nodes": []}
    return next((n for n in status["nodes"] if n["node_id"] == node_id), {})


def leaders_by_term(cluster: LocalCluster) -> dict[int, set[str]]:
    """Every (term -> leaders) any node's log ever announced."""
    out: dict[int, set[str]] = defaultdict(set)
    for nid in cluster.node_ids:
        text = (cluster.data_dir / "logs" / f"{nid}.log").read_text(errors="replace")
        for m in LEADER_RE.finditer(text):
            out[int(m.group(2))].add(nid)
    return out


async def _write(endpoints: list[str], n: int) -> dict[str, int]:
    async with AsyncKVClient(endpoints, timeout_s=60, max_in_flight=64) as kv:
        versions = await asyncio.gather(*(kv.put(f"k{i:04d}", f"v{i}") for i in range(n)))
    return {f"k{i:04d}": v for i, v in enumerate(versions)}


async def _read(endpoints: list[str], keys: list[str]) -> list[tuple[bytes, int] | None]:
    async with AsyncKVClient(endpoints, timeout_s=60, max_in_flight=64) as kv:
        return list(await asyncio.gather(*(kv.get_versioned(k) for k in keys)))


def wipe_and_restart(cluster: LocalCluster, node_id: str) -> None:
    cluster.kill_node(node_id, signal.SIGKILL)
    d = cluster.data_dir / node_id
    shutil.rmtree(d)
    d.mkdir()
    cluster.restart_node(node_id)


def test_wiped_follower_never_votes_and_no_acknowledged_write_is_lost(tmp_path: Path) -> None:
    with _cluster(tmp_path) as cluster:
        cluster.wait_ready(timeout=60)
        a = cluster.leader_of(0)
        b, c = sorted(n for n in cluster.node_ids if n != a)
        assert wait_for("three voters", lambda: all(
            membership_of(cluster, n) == "voter" for n in cluster.node_ids))

        cluster.kill_node(c, signal.SIGSTOP)
        versions = asyncio.run(asyncio.wait_for(_write(cluster.endpoints, WRITES), 120))
        assert len(versions) == WRITES  # acknowledged by A and B

        wipe_and_restart(cluster, b)
        cluster.kill_node(a, signal.SIGKILL)  # before B could catch up from A
        cluster.kill_node(c, signal.SIGCONT)
        assert wait_for(f"{b} waiting as a non-voter",
                        lambda: membership_of(cluster, b) == "waiting", 30)
        log_b = (cluster.data_dir / "logs" / f"{b}.log").read_text()
        assert "this shard exists already" in log_b  # C told it; --bootstrap did nothing
        # C's campaigns need B's vote, which a wiped data dir does not give: no leader
        time.sleep(4.0)
        assert _live_leaders(cluster) == [], "a leader was elected without A's log"
        assert membership_of(cluster, b) == "waiting"

        cluster.restart_node(a)
        leader = wait_for("a leader once A is back", lambda: _live_leaders(cluster), 60)
        assert leader[0][0] in (a, c)
        keys = sorted(versions)
        got = asyncio.run(asyncio.wait_for(_read(cluster.endpoints, keys), 120))
        lost = [k for k, g in zip(keys, got, strict=True) if g is None or g[1] != versions[k]]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
        # with a leader again, the wiped node catches up and is re-admitted
        assert wait_for(f"{b} re-admitted", lambda: membership_of(cluster, b) == "voter", 60)

    two = {t: ls for t, ls in leaders_by_term(cluster).items() if len(ls) > 1}
    assert not two, f"two leaders in a term: {two}"


def test_previous_release_data_dir_is_adopted_as_voter(tmp_path: Path) -> None:
    """Data dirs with a log but no identity file (the previous release) keep voting."""
    with _cluster(tmp_path) as cluster:
        cluster.wait_ready(timeout=60)
        versions = asyncio.run(asyncio.wait_for(_write(cluster.endpoints, 50), 60))
        top = max(versions.values())
        wait_for("every node holding the writes", lambda: all(
            _node(cluster, n).get("last_index", 0) >= top for n in cluster.node_ids))
        old = {n: _node(cluster, n)["extra"]["incarnation"] for n in cluster.node_ids}
        for nid in cluster.node_ids:
            cluster.kill_node(nid, signal.SIGKILL)
            (cluster.data_dir / nid / "identity.json").unlink()
        for nid in cluster.node_ids:
            cluster.restart_node(nid)

        def adopted(n: str) -> bool:
            extra = _node(cluster, n).get("extra", {})
            return extra.get("incarnation") not in (None, old[n]) and extra["voter"] is True

        wait_for("every node adopted as a voter", lambda: all(map(adopted, cluster.node_ids)))
        cluster.wait_ready(timeout=60)
        got = asyncio.run(asyncio.wait_for(_read(cluster.endpoints, sorted(versions)), 60))
        assert all(g is not None for g in got)
        for nid in cluster.node_ids:
            assert "adopted data dir" in (cluster.data_dir / "logs" / f"{nid}.log").read_text()


def _members(kv: KVClient, shard: int = 0) -> AdminMembersReply:
    return members(kv, shard)


def test_replace_replica_restores_three_voters_after_the_scenario(tmp_path: Path) -> None:
    """The wiped node waits as a non-voter; ``replace-replica`` with a new node id
    brings the shard back to three voters, and the new voter holds every write."""
    with _cluster(tmp_path) as cluster:
        cluster.wait_ready(timeout=60)
        a = cluster.leader_of(0)
        b = sorted(n for n in cluster.node_ids if n != a)[0]
        versions = asyncio.run(asyncio.wait_for(_write(cluster.endpoints, WRITES), 120))
        wipe_and_restart(cluster, b)
        log_b = cluster.data_dir / "logs" / f"{b}.log"
        assert wait_for(f"{b} refusing to found", lambda: "exists already" in log_b.read_text())

        addr = spec_add_replica(cluster.data_dir, 0, "s0r9")
        assert cluster.sync_spec() == ["started s0r9 for shard 0"]
        with KVClient(cluster.endpoints, timeout_s=10) as kv:
            kv.admin(AdminReplaceReplica(b"", 0, 0, b, "s0r9", addr))
            kv.admin(AdminReplaceReplica(b"", 0, 0, b, "s0r9", addr))
            wait_for("s0r9 a voter and the wiped node removed", lambda: (
                list((m := _members(kv)).voters) == sorted([*set(cluster.node_ids) - {b}])
                and not m.pending), 120)
        spec_remove_replica(cluster.data_dir, b)
        assert cluster.sync_spec() == [f"stopped {b} (its shard left the cluster)"]
        assert wait_for("s0r9 admitted", lambda: membership_of(cluster, "s0r9") == "voter")
        # the new voter holds everything: stop the old leader, read through the others
        cluster.kill_node(a, signal.SIGKILL)
        wait_for("a new leader", lambda: [x for x in _live_leaders(cluster) if x[0] != a], 60)
        keys = sorted(versions)
        got = asyncio.run(asyncio.wait_for(_read(cluster.endpoints, keys), 120))
        lost = [k for k, g in zip(keys, got, strict=True) if g is None or g[1] != versions[k]]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"


def test_cli_transfer_leader_add_and_remove_replica(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``zkv admin transfer-leader / add-replica --data-dir / remove-replica`` and what
    ``zkv status`` shows (the test plays the supervisor: it syncs cluster.json)."""
    from zkv.client.cli import main

    with _cluster(tmp_path) as cluster:
        cluster.wait_ready(timeout=60)
        ep = ["--endpoint", cluster.endpoint]
        a = cluster.leader_of(0)
        target = sorted(n for n in cluster.node_ids if n != a)[0]
        assert main(["admin", "transfer-leader", "0", "--to", target, *ep]) == 0
        assert wait_for("the new leader", lambda: cluster.leader_of(0) == target, 10)

        result: list[int] = []
        data = str(cluster.data_dir)
        t = threading.Thread(target=lambda: result.append(main(
            ["admin", "add-replica", "0", "--node-id", "s0r5", "--data-dir", data, *ep])))
        t.start()
        wait_for("cluster.json names s0r5", lambda: "s0r5" in cluster.spec_node_ids(), 30)
        cluster.sync_spec()
        t.join(120)
        assert result == [0]
        want = f"voters {', '.join(sorted([*cluster.node_ids]))}  learners -"

        def status_shows_voters() -> bool:
            capsys.readouterr()
            assert main(["status", *ep]) == 0
            out = capsys.readouterr().out
            return want in out and "s0r5: " not in out  # no non-voter note left

        assert wait_for("zkv status with four voters", status_shows_voters, 10)
        assert main(["admin", "remove-replica", "0", "s0r5", "--data-dir", data, *ep]) == 0
        assert "s0r5" not in cluster.spec_node_ids()
        cluster.sync_spec()
        assert wait_for("status without s0r5", lambda: "s0r5" not in (
            _node(cluster, cluster.leader_of(0)).get("members", ["s0r5"])), 30)


def test_cli_remove_replica_is_refused_while_it_would_leave_no_healthy_quorum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """etcd's strict reconfiguration check, through the CLI: with follower C down,
    removing follower B would leave the leader and the dead C, so ``zkv admin
    remove-replica`` is refused until ``--wait`` runs out, says why, and changes
    nothing; removing C itself goes through."""
    from zkv.client.cli import main

    with _cluster(tmp_path) as cluster:
        cluster.wait_ready(timeout=60)
        ep = ["--endpoint", cluster.endpoint]
        a = cluster.leader_of(0)
        b, c = sorted(n for n in cluster.node_ids if n != a)
        cluster.kill_node(c, signal.SIGKILL)
        time.sleep(1.5)  # more than an election timeout (600 ms) since C last acked
        capsys.readouterr()
        assert main(["admin", "remove-replica", "0", b, "--wait", "3", *ep]) != 0
        err = capsys.readouterr().err
        assert f"removing {b} would leave 1 healthy of 2 voters" in err, err
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            assert sorted(members(kv, 0).voters) == sorted([a, b, c])
            kv.put("after-refusal", "1")  # the shard still commits
        assert main(["admin", "remove-replica", "0", c, "--wait", "30", *ep]) == 0
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            m = members(kv, 0)
            assert sorted(m.voters) == sorted([a, b]) and not m.pending
            kv.put("after-removal", "1")
