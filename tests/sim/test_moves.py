"""Shard moves under chaos (``moves.py``): the real coordinator and the production
cores, many seeds.

    SIM_MOVE_SEEDS=40 pytest tests/sim/test_moves.py   # sweep seeds 0 .. 39 (default 16)
    SIM_MOVE_SEED=7 pytest tests/sim/test_moves.py     # replay exactly one seed
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tests.sim.cluster import SimResult
from tests.sim.moves import run_moves

pytestmark = pytest.mark.sim

REPLAY = "SIM_MOVE_SEED={seed} .venv/bin/pytest tests/sim/test_moves.py -q"


def _seeds() -> list[int]:
    if "SIM_MOVE_SEED" in os.environ:
        return [int(os.environ["SIM_MOVE_SEED"])]
    return list(range(int(os.environ.get("SIM_MOVE_SEEDS", 16))))


def _run_all(seeds: list[int]) -> list[SimResult]:
    workers = int(os.environ.get("SIM_WORKERS", os.cpu_count() or 1))
    if len(seeds) < 4 or workers <= 1:
        return [run_moves(s) for s in seeds]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(run_moves, seeds, chunksize=1)


def test_add_then_remove_a_shard_under_chaos() -> None:
    results = _run_all(_seeds())
    failures = [r for r in results if not r.ok]
    if failures:
        first = failures[0]
        lines = [f"{len(failures)} of {len(results)} seeds failed:"]
        lines += [f"  {r.summary()}\n      replay: {REPLAY.format(seed=r.seed)}" for r in failures]
        lines += ["", f"=== seed {first.seed} ({first.kind}) ===", first.message, ""]
        lines += [f"{k}: {v}" for k, v in first.stats.items()]
        lines += ["--- last events ---", *first.trace]
        pytest.fail("\n".join(lines), pytrace=False)
    deaths = sum(r.stats.get("coordinator_deaths", 0) for r in results)
    assert len(results) < 4 or deaths, "no coordinator died in the whole sweep"
    cached = sum(r.stats.get("cached_after_move", 0) for r in results)
    assert len(results) < 4 or cached, "no write was retried across a move"


def test_a_move_seed_replays_exactly() -> None:
    a, b = run_moves(5), run_moves(5)
    assert a.ok == b.ok and a.stats == b.stats


def test_the_harness_catches_a_fence_that_refuses_nothing(monkeypatch) -> None:
    """Keep the move harness honest: a source that keeps taking writes to fenced keys
    (after the final delta was listed) loses them at the flip; the seeds must show it."""
    from zkv.protocol.errors import ErrorCode
    from zkv.storage_node.ownership import Ownership

    refusal = Ownership.refusal

    def no_fence(self, key):  # type: ignore[no-untyped-def]
        code = refusal(self, key)
        return 0 if code == ErrorCode.UNAVAILABLE else code

    monkeypatch.setattr(Ownership, "refusal", no_fence)
    caught = [r for r in (run_moves(s) for s in range(3)) if not r.ok]
    assert caught, "3 seeds with an open fence and no invariant fired"


def test_the_harness_catches_a_move_that_forgets_sessions(monkeypatch) -> None:
    """A target that drops the source's session table applies a write retried across
    the move a second time; the held writes must show it."""
    from zkv.storage_node.state_machine import KVStateMachine

    monkeypatch.setattr(KVStateMachine, "_merge_sessions", lambda self, state: None)
    caught = [r for r in (run_moves(s) for s in range(2)) if not r.ok]
    assert caught, "2 seeds with sessions left behind and no invariant fired"
