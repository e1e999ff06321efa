"""Partition the leader of shard 0 from its followers, with clients on both sides.

Side A = {old leader, broker1}, side B = {the two followers, broker0} (iptables rules
inside the old leader and broker1; shard 1 and the other links stay up). Clients on A
go through broker1 only, clients on B through broker0 only.
- no write invoked on side A after the cut is acknowledged;
- side B elects a new leader and acknowledges writes (unavailability window logged);
- after healing, the old leader is a follower and catches up; the history is
  linearizable and no acknowledged write is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.containers.cluster import SECURITY, ContainerCluster, close_client
from tests.containers.workload import (
    Load,
    Sequencer,
    check_history,
    final_reads,
    keys_for_shard,
    log_unavailability,
    ring_from_status,
)

pytestmark = [pytest.mark.containers, pytest.mark.timeout(240)]


@SECURITY
def test_partition_leader_from_followers(
    cluster_factory: Callable[..., ContainerCluster], record_property: Callable, secure: bool
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=2, replicas=3, brokers=2, secure=secure)
    admin = c.client(["broker0"], timeout_s=10)
    ring = ring_from_status(admin.status(), shards=2)
    keys = keys_for_shard(0, 4, ring, prefix="part-")
    seq_key = keys_for_shard(0, 1, ring, prefix="partseq-")[0]
    old = c.leader_of(0)
    assert old is not None
    followers = c.followers_of(0, old)

    history = History()
    side_a = Load(history, lambda: c.client(["broker1"], timeout_s=3), keys, name="A").start()
    side_b = Load(history, lambda: c.client(["broker0"], timeout_s=3), keys, name="B").start()
    seq = Sequencer(lambda: c.client(["broker0"], timeout_s=3), seq_key).start()
    time.sleep(1.5)

    c.iptables_drop(old, [*followers, "broker0"])
    c.iptables_drop("broker1", followers)
    cut_at = time.monotonic()
    new = c.wait_for_leader(0, not_in={old}, broker="broker0", timeout_s=20)
    elected_s = time.monotonic() - cut_at
    time.sleep(4.0)

    c.iptables_heal(old)
    c.iptables_heal("broker1")
    healed_at = time.monotonic()
    time.sleep(3.0)
    a, b = side_a.stop(), side_b.stop()
    last = seq.stop()

    # Acknowledged while side A was cut off: nothing may be. A write invoked just before
    # the heal may be retried after it and acknowledged by the new leader (the SDK keeps
    # retrying until its deadline), which is no acknowledgment by the isolated leader.
    acked_on_a = [w for w in a.acked_writes if cut_at <= w.invoked and w.completed < healed_at]
    assert not acked_on_a, (f"isolated leader {old} acknowledged {len(acked_on_a)} writes "
                            f"(cut at {cut_at:.3f}, healed at {healed_at:.3f}): {acked_on_a}")
    window = log_unavailability(f"partition {old}", cut_at, b.first_ack_after(cut_at, keys))
    record_property("unavailability_s", window)
    record_property("election_s", round(elected_s, 3))
    print(
        f"new leader {new} in {elected_s:.2f}s; A: {a.ops} ops {dict(a.errors)}; "
        f"B: {b.ops} ops {dict(b.errors)}"
    )
    assert window is not None, "side B acknowledged nothing after the cut"
    assert a.first_ack_after(healed_at, keys) is not None, "side A never recovered after heal"

    try:
        me = c.wait_caught_up(0, old, timeout_s=20)
        print(f"old leader {old} after heal: role {me.get('role')} term {me.get('term')}")
        final_reads(history, admin, keys)
        seq.verify(admin)
        result = check_history(history)
        assert result.ok, f"history not linearizable: {result}"
    finally:
        close_client(admin)
    assert last > 0
