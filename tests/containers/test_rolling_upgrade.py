"""Rolling upgrade from the previous release's image, under load (issue 11's container
proof: "a rolling upgrade from the previous release's image (data dirs adopted, no
failed write)").

2 shards x 3 replicas + 2 brokers, all started from ``zkv:previous`` (the previous
release, built from the repository's history: protocol version 1, that release's flags,
256 vnodes per shard by default), each node's /data on a named volume as compose runs
them. Eight clients of this release's SDK (its requests go out as version 1, which the
old brokers read) write and read keys of both shards through both brokers the whole
time, and a sequencer writes 1, 2, 3, ...

The upgrade follows README "Rolling upgrade": the storage nodes first (per shard the
followers, then the leader), then the brokers one at a time. Each member is stopped as
an orchestrator stops it (SIGTERM), its container replaced by this release's image on
the same volume with this release's command (``--bootstrap`` too, as a compose file
passes it on every start: it counts only on an empty data dir), and the next step
starts once it is back (a node: caught up with its shard's leader, or elected leader
again and applied what it committed; a broker: it lists every node and a leader per
shard).

At the end every container runs this release; every node adopted its data dir (it logs
so, and ``zkv status`` shows it a voter with an incarnation); no write failed (clients
saw no error of any kind); no acknowledged write is lost (the sequencer, final reads of
every key) and the history is linearizable. The longest time without an acknowledged
write and each member's downtime are recorded as test properties.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from tests.containers.cluster import (
    BROKER_PORT,
    DATA_DIR,
    NODE_PORT,
    ContainerCluster,
    close_client,
    make_client,
)
from tests.containers.workload import (
    Load,
    Sequencer,
    check_history,
    final_reads,
    longest_ack_gap,
)

# func_only: a first run also builds both images, which is not the test's time
pytestmark = [pytest.mark.containers, pytest.mark.timeout(420, func_only=True)]

CLIENTS = 8
KEYS = [f"ru{i}" for i in range(16)]
SHARDS = 2
TIMING = ["--heartbeat-ms", "100", "--election-timeout-ms", "1000"]


def _previous_node(node_id: str, shard: int, peers: dict[str, str],
                   backends: list[str]) -> list[str]:
    """A storage node as the previous release takes it (no --bootstrap, no security)."""
    return [
        "zkv-node", "--node-id", node_id, "--shard", str(shard), "--data-dir", DATA_DIR,
        "--listen", f"tcp://0.0.0.0:{NODE_PORT}", "--advertise", f"tcp://{node_id}:{NODE_PORT}",
        "--peers", ",".join(f"{p}={a}" for p, a in peers.items()),
        "--brokers", ",".join(backends),
        "--shards", ",".join(str(s) for s in range(SHARDS)), "--fsync", "always", *TIMING,
    ]  # fmt: skip


def _previous_broker(broker_id: str) -> list[str]:
    return ["zkv-broker", "--host", "0.0.0.0", "--port", str(BROKER_PORT),
            "--broker-id", broker_id, *TIMING]


def test_rolling_upgrade_from_the_previous_release_under_load(
    cluster_factory: Callable[..., ContainerCluster],
    zkv_image: str,
    zkv_previous_image: str,
    record_property: Callable[[str, object], None],
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=SHARDS, replicas=3, brokers=2, volumes=True,
                        image=zkv_previous_image, node_command=_previous_node,
                        broker_command=_previous_broker, election_timeout_ms=1000)
    orders = itertools.cycle([c.brokers, list(reversed(c.brokers))])
    history = History()
    load = Load(history, lambda: c.client(next(orders), timeout_s=8), KEYS,
                processes=CLIENTS, name="ru").start()
    seq = Sequencer(lambda: c.client(timeout_s=8), "ruseq").start()
    downtime: dict[str, float] = {}
    try:
        time.sleep(2.0)
        upgrade_at = time.monotonic()
        for shard in range(SHARDS):
            leader = c.wait_for_leader(shard)
            for node in [*c.followers_of(shard, leader), leader]:
                # this release's command: the same flags, plus --bootstrap (ignored on a
                # data dir with state) and --insecure (plaintext on the private network)
                command = [*c.members[node].command, "--bootstrap", "--insecure"]
                downtime[node] = c.upgrade(node, zkv_image, command)
                c.wait_for_leader(shard, timeout_s=20)
                c.wait_caught_up(shard, node, timeout_s=30)
        for broker in c.brokers:
            downtime[broker] = c.upgrade(broker, zkv_image,
                                         [*c.members[broker].command, "--insecure"])
            c.wait_converged(timeout_s=30, brokers=[broker])
        time.sleep(1.0)
        upgraded_at = time.monotonic()
    finally:
        stats = load.stop()
        last = seq.stop()

    admin = make_client(c.endpoints(), timeout_s=10)
    try:
        for m in c.members.values():
            m.container.reload()
            assert zkv_image in m.container.image.tags, (m.name, m.container.image.tags)
        rows = c.rows()
        for shard, nodes in c.nodes_by_shard.items():
            for node in nodes:
                row = rows[node]
                assert row.get("voter") is True and row.get("membership") == "voter", row
                assert row.get("incarnation"), row
                assert "adopted data dir written before identities" in c.logs(node, tail=2000), (
                    f"{node} did not adopt its data dir:\n{c.logs(node)}")
                if node != c.leader_of(shard):
                    c.wait_caught_up(shard, node, timeout_s=20)
        final_reads(history, admin, KEYS)
        final = seq.verify(admin)
        result = check_history(history)
    finally:
        close_client(admin)
    gap, _ = longest_ack_gap(stats, KEYS, upgrade_at, upgraded_at)
    record_property("upgrade_s", round(upgraded_at - upgrade_at, 3))
    record_property("longest_ack_gap_s", round(gap, 3))
    for name, seconds in downtime.items():
        record_property(f"down_{name}_s", round(seconds, 3))
    print(f"\nrolling upgrade of {len(downtime)} members in {upgraded_at - upgrade_at:.1f}s; "
          f"longest gap between acknowledged writes {gap:.2f}s; downtime per member "
          f"{ {n: round(s, 1) for n, s in downtime.items()} }; load {stats.ops} ops, "
          f"{len(stats.acked_writes)} acknowledged writes, errors {dict(stats.errors)}; "
          f"sequencer {final} (last acknowledged {last}, errors {dict(seq.errors)})")
    assert result.ok, f"history not linearizable: {result}"
    assert last > 0 and not stats.errors and not seq.errors, (
        f"a write or read failed during the upgrade: clients {dict(stats.errors)}, "
        f"sequencer {dict(seq.errors)}")
