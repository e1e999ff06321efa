"""Clients leave a broker that cannot help (issue 10, item 2), against real processes.

The cluster is 1 shard x 3 replicas with broker b1 (``LocalCluster``). A second broker,
b0, runs beside it, but the nodes are given only b1's addresses: b0 never hears a
heartbeat, so it is a broker cut off from the nodes. It answers every data request with
``NO_LEADER`` (checked first, so the test cannot pass through the silence path). A client
given ``[b0, b1]`` starts on b0; it must move to b1 on that refusal and succeed well
within its timeout, where it used to retry NO_LEADER on b0 until its deadline.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zkv.client import AsyncKVClient, KVClient, Timeout
from zkv.ops.cluster import LocalCluster, free_port_block

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

TIMEOUT_S = 5.0
#: "Well within the timeout": a refusal and a second round trip take milliseconds; the
#: bound leaves room for a loaded test machine and is still far below ``TIMEOUT_S``.
PUT_S_MAX = 1.5


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(b0, b1)`` client endpoints: b0 cut off from the nodes, b1 serving."""
    port = free_port_block(3)
    log = open(tmp_path / "broker-b0.log", "wb")  # noqa: SIM115 - closed below
    b0 = subprocess.Popen(
        [sys.executable, "-m", "zkv.broker.main", "--host", "127.0.0.1", "--port", str(port),
         "--broker-id", "b0", "--heartbeat-ms", "50", "--election-timeout-ms", "500"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=1, port=0,
                          fsync="never", heartbeat_ms=50, election_timeout_ms=500) as c:
            c.wait_ready(30)
            b0_endpoint = f"tcp://127.0.0.1:{port}"
            with KVClient(b0_endpoint, timeout_s=10) as kv:
                assert kv.ping() == "b0"  # b0 is up and answering...
            with KVClient(b0_endpoint, timeout_s=0.3) as kv, pytest.raises(Timeout) as info:
                kv.put("probe", "x")
            assert "NO_LEADER" in str(info.value)  # ...but knows no leader
            yield b0_endpoint, c.endpoint
    finally:
        b0.kill()
        b0.wait(10)
        log.close()


def test_sync_client_moves_to_the_broker_that_hears_a_leader(
    brokers: tuple[str, str],
) -> None:
    b0, b1 = brokers
    for i in range(5):  # a fresh client each time: every put starts on b0
        with KVClient([b0, b1], timeout_s=TIMEOUT_S) as kv:
            start = time.monotonic()
            version = kv.put(f"k{i}", f"v{i}")
            elapsed = time.monotonic() - start
            assert elapsed < PUT_S_MAX, f"put {i} took {elapsed:.3f}s"
            assert kv.switches == 1 and kv.resets == 0
            assert kv.endpoint == b1  # and it stays there
            assert kv.get(f"k{i}") == f"v{i}".encode()
            assert kv.get_versioned(f"k{i}") == (f"v{i}".encode(), version)


def test_async_client_moves_to_the_broker_that_hears_a_leader(
    brokers: tuple[str, str],
) -> None:
    b0, b1 = brokers

    async def main() -> None:
        async with AsyncKVClient([b0, b1], timeout_s=TIMEOUT_S) as kv:
            start = time.monotonic()
            await asyncio.gather(*(kv.put(f"a{i}", str(i)) for i in range(50)))
            elapsed = time.monotonic() - start
            assert elapsed < PUT_S_MAX, f"50 puts took {elapsed:.3f}s"
            assert kv.endpoint == b1 and kv.resets == 0
            got = await asyncio.gather(*(kv.get(f"a{i}") for i in range(50)))
            assert got == [str(i).encode() for i in range(50)]

    asyncio.run(asyncio.wait_for(main(), 30))
