"""Helpers for the gateway's process and browser tests: a gateway child process on a
free port in front of a ``LocalCluster``, and the shard that owns a key."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from zkv.gateway.process import GatewayProcess
from zkv.ops.cluster import LocalCluster, free_port
from zkv.protocol.ring import Ring, RingConfig


@contextlib.contextmanager
def running_gateway(cluster: LocalCluster, log_dir: Path, *, port: int | None = None,
                    timeout_s: float | None = None, name: str = "gateway",
                    extra_args: tuple[str, ...] = ()) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(cluster.endpoint, port or free_port(), log_path=log_dir / f"{name}.log",
                        timeout_s=timeout_s, extra_args=extra_args)
    why = gw.start()
    assert why is None, why
    try:
        assert gw.wait_healthy(30), (log_dir / f"{name}.log").read_text(errors="replace")
        yield gw
    finally:
        gw.stop()


def ring_of(cluster: LocalCluster) -> Ring:
    ring = cluster.status()["ring"]
    return Ring(RingConfig(int(ring["epoch"]), tuple(ring["shards"]), int(ring["vnodes"])))


def key_on_shard(cluster: LocalCluster, shard: int, prefix: str) -> str:
    ring = ring_of(cluster)
    for i in range(10_000):
        if ring.shard_for(f"{prefix}{i}".encode()) == shard:
            return f"{prefix}{i}"
    raise AssertionError(f"no key for shard {shard}")
