"""Pause the leader of shard 0 (and broker1, which still routes to it) past the election
timeout, write through the new leader, send a read and a write into the paused path,
then unpause: the old leader must acknowledge no stale read and no write it cannot
commit. Background load and the linearizability checker cover the rest."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.containers.cluster import SECURITY, ContainerCluster, close_client
from tests.containers.workload import (
    Load,
    check_history,
    final_reads,
    keys_for_shard,
    ring_from_status,
)

pytestmark = [pytest.mark.containers, pytest.mark.timeout(240)]


@SECURITY
def test_pause_leader_no_stale_answers(
    cluster_factory: Callable[..., ContainerCluster], secure: bool
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=2, replicas=3, brokers=2, election_timeout_ms=1000, secure=secure)
    admin = c.client(["broker0"], timeout_s=10)
    ring = ring_from_status(admin.status(), shards=2)
    keys = keys_for_shard(0, 3, ring, prefix="pause-")
    probe_key = keys_for_shard(0, 1, ring, prefix="pauseprobe-")[0]
    history = History()
    load = Load(history, lambda: c.client(timeout_s=6), keys, processes=2, name="P").start()

    op = history.invoke(100, "put", probe_key, b"v1")
    history.ok(op, admin.put(probe_key, b"v1"))
    old = c.leader_of(0)
    assert old is not None

    c.pause(old)
    c.pause("broker1")
    paused_at = time.monotonic()
    new = c.wait_for_leader(0, not_in={old}, broker="broker0", timeout_s=20)
    op = history.invoke(100, "put", probe_key, b"v2")
    history.ok(op, admin.put(probe_key, b"v2"))

    # A read and a write invoked now, queued behind the paused broker1 -> old leader.
    answers: dict[str, Any] = {}

    def via_paused(kind: str) -> None:
        client = c.client(["broker1"], timeout_s=8)
        op = history.invoke(200 + len(kind), kind, probe_key, b"v3" if kind == "put" else None)
        try:
            if kind == "put":
                answers[kind] = client.put(probe_key, b"v3")
            else:
                found = client.get_versioned(probe_key)
                answers[kind] = found if found is not None else (None, 0)
            history.ok(op, answers[kind])
        except Exception as exc:
            answers[kind] = exc
            (history.info if kind == "put" else history.fail)(op)
        finally:
            close_client(client)

    probes = [threading.Thread(target=via_paused, args=(k,)) for k in ("get", "put")]
    for t in probes:
        t.start()
    time.sleep(max(0.0, 2.5 - (time.monotonic() - paused_at)))  # 2.5 x election timeout
    c.unpause(old)
    c.unpause("broker1")
    for t in probes:
        t.join(15)
    time.sleep(2.0)
    stats = load.stop()
    print(
        f"new leader {new}; paused-path answers {answers}; load {stats.ops} ops "
        f"{dict(stats.errors)}"
    )

    got = answers.get("get")
    if isinstance(got, tuple):
        assert got[0] in (b"v2", b"v3"), f"stale read from the paused path: {got}"
    try:
        me = c.wait_caught_up(0, old, timeout_s=20)
        print(f"old leader {old} after unpause: role {me.get('role')} term {me.get('term')}")
        final_reads(history, admin, [*keys, probe_key])
        if isinstance(answers.get("put"), int):
            final = admin.get(probe_key)
            assert final == b"v3", f"write acknowledged via the paused path is lost: {final}"
        result = check_history(history)
        assert result.ok, f"history not linearizable: {result}"
    finally:
        close_client(admin)
