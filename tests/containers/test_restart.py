"""Kill and restart a broker and a follower under load: the follower catches up, the
restarted broker serves again within a few heartbeats, and clients (given both
brokers) see no error beyond timeouts the SDK retried past."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.containers.cluster import SECURITY, ContainerCluster, close_client, ping
from tests.containers.workload import (
    Load,
    Sequencer,
    check_history,
    final_reads,
    keys_for_shard,
    ring_from_status,
)

pytestmark = [pytest.mark.containers, pytest.mark.timeout(240)]


@SECURITY
def test_restart_broker_and_follower(
    cluster_factory: Callable[..., ContainerCluster], record_property: Callable, secure: bool
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=2, replicas=3, brokers=2, secure=secure)
    admin = c.client(timeout_s=10)
    ring = ring_from_status(admin.status(), shards=2)
    keys = keys_for_shard(0, 3, ring, prefix="rs0-") + keys_for_shard(1, 3, ring, prefix="rs1-")
    seq_key = keys_for_shard(0, 1, ring, prefix="rsseq-")[0]
    history = History()
    load = Load(history, lambda: c.client(timeout_s=8), keys, processes=3, name="R").start()
    seq = Sequencer(lambda: c.client(timeout_s=8), seq_key).start()
    time.sleep(1.5)

    leader = c.leader_of(0)
    assert leader is not None
    follower = c.followers_of(0, leader)[0]
    c.kill("broker0")
    c.kill(follower)
    time.sleep(3.0)
    t = time.monotonic()
    c.start("broker0")
    broker_back_s = time.monotonic() - t
    c.wait_converged(timeout_s=10, brokers=["broker0"], down=[follower])
    converged_s = time.monotonic() - t
    c.start(follower)
    time.sleep(2.0)
    stats = load.stop()
    last = seq.stop()
    record_property("broker_restart_s", round(broker_back_s, 3))
    record_property("broker_converged_s", round(converged_s, 3))
    print(
        f"broker0 back in {broker_back_s:.2f}s, sees the cluster after {converged_s:.2f}s; "
        f"load {stats.ops} ops {dict(stats.errors)}; sequencer errors {dict(seq.errors)}"
    )

    assert ping(c.broker_endpoint("broker0"), keys=c.client_keys) == "broker0"
    unexpected = {k: v for k, v in stats.errors.items() if k != "Timeout"}
    assert not unexpected, f"clients saw errors other than timeouts: {unexpected}"
    try:
        c.wait_caught_up(0, follower, timeout_s=20)
        final_reads(history, admin, keys)
        seq.verify(admin)
        result = check_history(history)
        assert result.ok, f"history not linearizable: {result}"
    finally:
        close_client(admin)
    assert last > 0
