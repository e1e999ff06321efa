"""Boot 2 shards x 3 replicas with 2 brokers; put/get from the host through each broker."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.containers.cluster import ContainerCluster, close_client, is_leader
from tests.containers.workload import keys_for_shard, ring_from_status

pytestmark = [pytest.mark.containers, pytest.mark.timeout(150)]


def test_boot_put_get(cluster_factory: Callable[..., ContainerCluster]) -> None:
    t0 = time.monotonic()
    c = cluster_factory(shards=2, replicas=3, brokers=2)
    print(f"2x3 cluster with 2 brokers converged in {time.monotonic() - t0:.2f}s")

    for broker in c.brokers:
        nodes = c.status(broker)
        assert {n["node_id"] for n in nodes} == {f"s{s}r{r}" for s in (0, 1) for r in range(3)}
        for shard in (0, 1):
            assert sum(1 for n in nodes if n["shard_id"] == shard and is_leader(n["role"])) == 1

    client = c.client(timeout_s=10)
    try:
        ring = ring_from_status(client.status(), shards=2)
        for shard in (0, 1):
            for key in keys_for_shard(shard, 3, ring, prefix=f"boot{shard}-"):
                version = client.put(key, f"v-{key}")
                assert version > 0
                assert client.get(key) == f"v-{key}".encode()
    finally:
        close_client(client)

    # every broker routes to every shard
    for broker in c.brokers:
        one = c.client([broker], timeout_s=10)
        try:
            for shard in (0, 1):
                key = keys_for_shard(shard, 1, ring, prefix=f"via-{broker}-")[0]
                one.put(key, broker)
                assert one.get(key) == broker.encode()
        finally:
            close_client(one)
