"""Watch history in the simulator: after a run under the full fault plan (crashes and
restarts from snapshot + WAL, partitions, pauses, loss, duplication), every replica's
history equals, over the revisions it still holds, the events of the committed log
replayed into a fresh state machine. That is the rule a watcher's resume relies on:
whichever replica answers (a new leader after a failover, a restarted one), the events
after a revision are the same. ``SIM_WATCH_SEEDS=n`` sweeps more seeds."""

from __future__ import annotations

import os

import pytest

from tests.sim.cluster import SimConfig, World
from zkv.storage_node.state_machine import KVStateMachine

pytestmark = pytest.mark.sim


def _check(world: World) -> int:
    checked = 0
    for shard, ids in world.shard_nodes.items():
        log = sorted((i, data) for (s, i), (_t, data) in world.committed.items() if s == shard)
        ref = KVStateMachine(shard_id=shard, ring=world.ring)
        for index, data in log:
            ref.apply(index, data)
        want = ref.history.poll(0, b"", False, ref.applied_index, 10**9, 10**12)[0]
        for nid in ids:
            h = world.nodes[nid].state.history
            applied = world.nodes[nid].state.applied_index
            got = h.poll(h.floor, b"", False, applied, 10**9, 10**12)[0]
            expected = [e for e in want if h.floor < e[0] <= applied]
            assert got == expected, f"seed {world.cfg.seed}: {nid} differs from the log"
            checked += len(got)
    return checked


def test_every_replica_holds_the_events_of_the_committed_log() -> None:
    total = 0
    restored = 0
    for seed in range(int(os.environ.get("SIM_WATCH_SEEDS", 12))):
        world = World(SimConfig(seed=seed, nodes=5 if seed % 4 == 3 else 3))
        result = world.run()
        assert result.ok, result.summary()
        total += _check(world)
        restored += sum(world.nodes[n].state.history.floor > 0 for n in world.nodes)
    print(f"{total} events checked, {restored} replicas restored from a snapshot")
    assert total > 1000 and restored > 0  # events checked; some replicas from snapshots
