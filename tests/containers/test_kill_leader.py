"""SIGKILL the leader of shard 0 under client load: a new leader serves, no acknowledged
write is lost, the history is linearizable; the killed node restarts and catches up."""

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
def test_kill_leader_under_load(
    cluster_factory: Callable[..., ContainerCluster], record_property: Callable, secure: bool
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=2, replicas=3, brokers=2, secure=secure)
    admin = c.client(timeout_s=10)
    ring = ring_from_status(admin.status(), shards=2)
    keys = keys_for_shard(0, 4, ring, prefix="kill-")
    seq_key = keys_for_shard(0, 1, ring, prefix="killseq-")[0]

    history = History()
    load = Load(history, lambda: c.client(timeout_s=8), keys, processes=3, name="kill").start()
    seq = Sequencer(lambda: c.client(timeout_s=8), seq_key).start()
    time.sleep(2.0)

    leader = c.leader_of(0)
    assert leader is not None
    fault_at = time.monotonic()
    c.kill(leader)
    new_leader = c.wait_for_leader(0, not_in={leader}, timeout_s=20)
    elected_s = time.monotonic() - fault_at
    time.sleep(3.0)
    stats = load.stop()
    last = seq.stop()

    window = log_unavailability(f"kill {leader}", fault_at, stats.first_ack_after(fault_at, keys))
    record_property("unavailability_s", window)
    record_property("election_s", round(elected_s, 3))
    print(
        f"new leader {new_leader} after {elected_s:.2f}s; ops {stats.ops}, errors {dict(stats.errors)}"
    )
    assert window is not None, "no write acknowledged after the leader was killed"

    # the killed node comes back as a follower and catches up
    c.start(leader)
    try:
        final_reads(history, admin, keys)
        seq.verify(admin)
        result = check_history(history)
        assert result.ok, f"history not linearizable: {result}"
        c.wait_caught_up(0, leader, timeout_s=20)
    finally:
        close_client(admin)
    assert last > 0
