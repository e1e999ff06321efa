"""Keys that expire, in the simulator: TTL clients beside the usual ones, under the
full fault plan (crashes, partitions, pauses, loss, duplication). ``ttl_client.py``
holds the checks; the usual invariants and the linearizability of the other clients'
history hold as in every run. ``SIM_TTL_SEEDS=n`` sweeps more seeds."""

from __future__ import annotations

import os

import pytest

from tests.sim.cluster import run_seed
from tests.sim.test_sim import _report

pytestmark = pytest.mark.sim


def test_ttl_rules_hold_under_faults() -> None:
    seeds = range(int(os.environ.get("SIM_TTL_SEEDS", 24)))
    results = [run_seed(s, ttl_clients=2) for s in seeds]
    failures = [r for r in results if not r.ok]
    assert not failures, _report(results)
    reads = sum(r.stats["ttl_reads"] for r in results)
    found = sum(r.stats["ttl_reads_found"] for r in results)
    assert sum(r.stats["ttl_puts"] for r in results) > 50 * len(results)
    assert found > 100 and reads - found > 100  # both sides of the deadline were read


def test_the_ttl_checks_catch_a_deadline_stamped_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not blind: a leader that stamps deadlines 50 ms early is caught."""
    from zkv.storage_node import node_requests, ttl_requests

    real = ttl_requests.ttl_command

    def early(req, ts_ms):  # type: ignore[no-untyped-def]
        return real(req, ts_ms - 50)

    monkeypatch.setattr(node_requests, "ttl_command", early)
    caught = [r for r in (run_seed(s, ttl_clients=2) for s in range(6)) if not r.ok]
    assert caught and all("gone" in r.message for r in caught), [r.summary() for r in caught]


def test_the_ttl_checks_catch_reads_that_wait_for_the_sweep(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """... and so is a node that hides a key only once the sweep removed it."""
    from zkv.storage_node.state_machine import KVStateMachine

    monkeypatch.setattr(KVStateMachine, "get_live", lambda self, key, now_ms: self.get(key))
    caught = [r for r in (run_seed(s, ttl_clients=2) for s in range(6)) if not r.ok]
    assert caught and all("after its ack" in r.message for r in caught), [
        r.summary() for r in caught]


def test_ttl_keys_through_shard_moves_under_chaos() -> None:
    """Deadlines move with their keys (add a shard, then remove one, ``moves.py``): the
    rules hold across the moves, and keys that expire while moving expire at their new
    owner."""
    from tests.sim.moves import run_moves

    results = [run_moves(s, ttl_clients=2)
               for s in range(int(os.environ.get("SIM_TTL_MOVE_SEEDS", 4)))]
    assert all(r.ok for r in results), _report(results)
    assert sum(r.stats["ttl_reads"] for r in results) > 100
