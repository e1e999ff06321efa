"""Online add-shard in containers, with the source leader SIGKILLed mid-copy.

2 shards x 3 replicas and 2 brokers; 2,000 keys with unique values written from the
host. Then a third group (s2r0..s2r2, started with the initial ring 0,1 and advertising
``tcp://s2rN:7100`` on the cluster network) comes up, and ``Rebalancer.add_shard(2)``
runs from the host through both brokers' published ports while three single-threaded
loads put/get over keys that stay on 0, stay on 1 and move to 2. At the coordinator's
2nd ``batch1`` step (or at ``fence`` if the copy ended first) the leader of source
shard 0 is SIGKILLed (``docker kill``) and started again 2 s later.

Checks: the change completes (``Rebalancer.resume()`` if ``add_shard`` raised: printed);
both brokers route with ring epoch 2 over shards [0, 1, 2]; every key holds its last
acknowledged value (or a write whose outcome is unknown); the history is linearizable;
each shard's leader holds exactly the keys the final ring gives it (counts add up to
the keys present); every replica, the restarted one too, is live at epoch 2 with its
leader's count. Printed: migration time, time under the fence, and the unavailability
each load saw (longest stretch without an acknowledged write; kill -> first ack).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.containers.cluster import ContainerCluster, close_client, make_client
from tests.containers.workload import Acked, Load, check_history, ring_from_status
from zkv.protocol.admin import AdminInfo, AdminInfoReply, AdminReply
from zkv.protocol.ring import Ring, RingConfig

pytestmark = [pytest.mark.containers, pytest.mark.timeout(300)]

KEYS = [f"ak-{i}" for i in range(2000)]
NEW_SHARD = 2
#: Small batches so the copy takes many steps and the kill lands inside it.
BATCH_KEYS = 40
KILL_AT_BATCH = 2
RESTART_AFTER_S = 2.0
#: Everything from the first container start to the last check (image build excluded).
BUDGET_S = 120.0
#: Odd sizes: Load writes on even n over keys[n % len], so an even size would split the
#: keys into write-only and read-only halves.
LOAD_KEYS = 21
PRELOAD_THREADS = 4
PRELOAD_PROCESS = 10_000
FINAL_PROCESS = 20_000


class Overran(AssertionError):
    """A bounded call did not return in time (not a reason to resume)."""


class SourceKill:
    """``on_step`` hook: SIGKILL the leader of shard 0 at the 2nd ``batch1`` step, or at
    ``fence`` if the copy finished before that; start it again ``RESTART_AFTER_S`` later.
    Notes when each step began. Its own errors (and the restart's, in a timer thread) are
    kept for ``join()`` to raise: a broken hook must not pass for a refused step."""

    def __init__(self, cluster: ContainerCluster) -> None:
        self.cluster = cluster
        self.batches = 0
        self.killed: str | None = None
        self.killed_at = 0.0
        self.step = ""
        self.step_at: dict[str, float] = {}
        self.errors: list[BaseException] = []
        self.restarted_at = 0.0
        self._timer: threading.Timer | None = None

    def on_step(self, step: str) -> None:
        self.step_at.setdefault(step, time.monotonic())
        if self.killed is not None or self.errors or step not in ("batch1", "fence"):
            return
        if step == "batch1":
            self.batches += 1
            if self.batches < KILL_AT_BATCH:
                return
        try:
            leader = self.cluster.wait_for_leader(0, timeout_s=10)
            self.cluster.kill(leader)
        except Exception as exc:  # raised by join()
            self.errors.append(exc)
            return
        self.killed_at = time.monotonic()  # the process is gone: nothing more from it
        self.killed, self.step = leader, f"{step} #{self.batches}"
        self._timer = threading.Timer(RESTART_AFTER_S, self._restart, (leader,))
        self._timer.daemon = True
        self._timer.start()

    def _restart(self, name: str) -> None:
        try:
            self.cluster.start(name, timeout_s=30)
            self.restarted_at = time.monotonic()
        except BaseException as exc:  # raised by join()
            self.errors.append(exc)

    def join(self, timeout_s: float) -> None:
        if self._timer is not None:
            self._timer.join(timeout_s)
            assert not self._timer.is_alive(), f"restart of {self.killed} still running"
        if self.errors:
            raise AssertionError(
                f"the fault hook failed (kill or restart of {self.killed or 'the shard 0 leader'})"
            ) from self.errors[0]


def _parallel_puts(endpoints: list[str], history: Any) -> None:
    """Write every key once with a unique value, recorded in the history."""

    def put_slice(i: int) -> None:
        client = make_client(endpoints, timeout_s=10)
        try:
            for key in KEYS[i::PRELOAD_THREADS]:
                value = f"init-{key}".encode()
                op = history.invoke(PRELOAD_PROCESS + i, "put", key, value)
                history.ok(op, client.put(key, value))
        finally:
            close_client(client)

    with ThreadPoolExecutor(PRELOAD_THREADS) as pool:
        list(pool.map(put_slice, range(PRELOAD_THREADS)))


def _parallel_reads(endpoints: list[str], history: Any) -> dict[str, bytes | None]:
    """Read every key once more, into the history; key -> value (None if absent)."""
    found: dict[str, bytes | None] = {}

    def read_slice(i: int) -> None:
        client = make_client(endpoints, timeout_s=15)
        try:
            for key in KEYS[i::PRELOAD_THREADS]:
                op = history.invoke(FINAL_PROCESS + i, "get", key)
                got = client.get_versioned(key)
                history.ok(op, got if got is not None else (None, 0))
                found[key] = None if got is None else got[0]
        finally:
            close_client(client)

    with ThreadPoolExecutor(PRELOAD_THREADS) as pool:
        list(pool.map(read_slice, range(PRELOAD_THREADS)))
    return found


def _run_bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread, at most ``timeout_s``: its result or its exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name=what)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise Overran(f"{what} still running after {timeout_s:.0f}s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _longest_gap_s(acks: list[Acked], start: float, end: float) -> float:
    """The longest stretch of [start, end] without an acknowledged write."""
    times = sorted(a.completed for a in acks if start < a.completed < end)
    points = [start, *times, end]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def _wait_ring(cluster: ContainerCluster, want: dict[str, Any], timeout_s: float) -> None:
    """Every broker reports ring ``want`` (they adopt it from heartbeats)."""
    deadline = time.monotonic() + timeout_s
    for broker in cluster.brokers:
        seen: Any = None
        while True:
            client = cluster.client([broker], timeout_s=2)
            try:
                ring = client.status()["ring"]
                seen = {"epoch": ring["epoch"], "shards": sorted(ring["shards"])}
            except Exception as exc:  # a broker may time out under load: look again
                seen = repr(exc)
            finally:
                close_client(client)
            if seen == want:
                break
            assert time.monotonic() < deadline, f"{broker} ring is {seen}, not {want}"
            time.sleep(0.2)


def _replicas_settled(
    cluster: ContainerCluster, counts: dict[int, int], epoch: int, timeout_s: float
) -> dict[str, tuple[bool, int, int]]:
    """Wait until every node of every shard is live at ``epoch`` with its leader's key
    count; returns node -> (live, ring epoch, key count) as last seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows: dict[str, tuple[bool, int, int]] = {}
        try:
            for n in cluster.status(timeout_s=3):
                rows[n["node_id"]] = (bool(n["live"]), int(n["ring_epoch"]), int(n["key_count"]))
        except Exception:  # look again
            pass
        want = {
            name: (True, epoch, counts[shard])
            for shard, names in cluster.nodes_by_shard.items()
            for name in names
        }
        if all(rows.get(name) == w for name, w in want.items()):
            return rows
        assert time.monotonic() < deadline, f"replicas not settled: {rows}, want {want}"
        time.sleep(0.3)


def _check_last_values(loads: list[Load], found: dict[str, bytes | None]) -> int:
    """Every key holds its last acknowledged value, or a write of unknown outcome (which
    may land any time after its invocation). Returns how many keys the loads wrote."""
    written: dict[str, list[bytes]] = {}
    last: dict[str, Acked] = {}
    for load in loads:  # one thread per load, disjoint keys: one writer per key
        for key, value, _ in load.stats.invoked_writes:
            written.setdefault(key, []).append(value)
        for ack in load.stats.acked_writes:
            if ack.key not in last or ack.completed > last[ack.key].completed:
                last[ack.key] = ack
    for key in KEYS:
        value = found[key]
        if key not in written:
            assert value == f"init-{key}".encode(), f"{key}: {value!r}, not its preload value"
            continue
        acked = {a.value for load in loads for a in load.stats.acked_writes if a.key == key}
        unknown = set(written[key]) - acked
        expected = last[key].value if key in last else f"init-{key}".encode()
        assert value == expected or value in unknown, (
            f"{key}: holds {value!r}; last acknowledged {expected!r}, "
            f"unknown outcomes {sorted(unknown)}"
        )
    return len(written)


def test_add_shard_with_source_leader_killed(
    cluster_factory: Callable[..., ContainerCluster], record_property: Callable
) -> None:
    from tests.support.history import History
    from zkv.ops.rebalance import Rebalancer

    t_start = time.monotonic()
    deadline = t_start + BUDGET_S

    def left_s() -> float:
        return max(1.0, deadline - time.monotonic())

    c = cluster_factory(shards=2, replicas=3, brokers=2)
    endpoints = c.endpoints()
    history = History()
    admin = make_client(endpoints, timeout_s=10)
    loads: list[Load] = []
    try:
        old_ring = ring_from_status(admin.status(), shards=2)
        vnodes = old_ring.config.vnodes
        new_ring = Ring(RingConfig(old_ring.config.epoch + 1, (0, 1, NEW_SHARD), vnodes))
        t0 = time.monotonic()
        _parallel_puts(endpoints, history)
        preload_s = time.monotonic() - t0

        def pick(old: int | None, new: int) -> list[str]:
            return [
                k
                for k in KEYS
                if new_ring.shard_for(k.encode()) == new
                and (old is None or old_ring.shard_for(k.encode()) == old)
            ][:LOAD_KEYS]

        groups = {"stay0": pick(0, 0), "stay1": pick(1, 1), "move": pick(None, NEW_SHARD)}
        assert {old_ring.shard_for(k.encode()) for k in groups["move"]} == {0, 1}

        c.add_shard_group(NEW_SHARD, timeout_s=min(40.0, left_s()))
        group_up_s = time.monotonic() - t0 - preload_s

        loads += [
            Load(history, lambda: c.client(timeout_s=8), keys, processes=1, name=name)
            for name, keys in groups.items()
        ]
        for load in loads:
            load.start()
        time.sleep(1.0)

        fault = SourceKill(c)
        lines: list[str] = []
        coordinator = make_client(endpoints, timeout_s=30)
        rebalancer = Rebalancer(
            coordinator,
            progress=lines.append,
            batch_keys=BATCH_KEYS,
            on_step=fault.on_step,
        )
        resumed = ""
        migrate_at = time.monotonic()
        try:
            try:
                final = _run_bounded(lambda: rebalancer.add_shard(NEW_SHARD), left_s(), "add_shard")
            except Overran:
                raise
            except Exception as exc:  # a refused or stalled step: roll forward
                resumed = f"add_shard raised {type(exc).__name__}: {exc}; resumed"
                print(f"\n{resumed}")
                final = _run_bounded(rebalancer.resume, left_s(), "resume")
            migrate_s = time.monotonic() - migrate_at
            done_at = time.monotonic()
        finally:
            close_client(coordinator)
        fault.join(timeout_s=left_s())
        assert fault.killed is not None, "the source leader was never killed"
        assert final is not None and final.epoch == 2, f"the change ended at {final}"
        assert tuple(final.shards) == (0, 1, NEW_SHARD), final

        want_ring = {"epoch": 2, "shards": [0, 1, NEW_SHARD]}
        _wait_ring(c, want_ring, timeout_s=min(20.0, left_s()))
        time.sleep(1.0)  # let the loads run on the new ring too
        stats = {load.name: load.stop(timeout_s=20) for load in loads}

        found = _parallel_reads(endpoints, history)
        missing = [k for k, v in found.items() if v is None]
        assert not missing, f"{len(missing)} keys vanished, e.g. {missing[:5]}"
        loaded = _check_last_values(loads, found)
        result = check_history(history)
        assert result.ok, f"history not linearizable: {result}"

        counts = {s: _keys(admin.admin(AdminInfo(b"", 0, s))) for s in final.shards}
        expected = {s: 0 for s in final.shards}
        for key in KEYS:
            expected[new_ring.shard_for(key.encode())] += 1
        assert counts == expected, f"leaders hold {counts}, the final ring gives {expected}"
        assert sum(counts.values()) == len(found), counts
        replicas = _replicas_settled(c, counts, epoch=2, timeout_s=min(30.0, left_s()))
    finally:
        for load in loads:  # no-op if stopped already; else do not outlive the test
            with contextlib.suppress(Exception):
                load.stop(timeout_s=10)
        close_client(admin)
    total_s = time.monotonic() - t_start

    gaps = {name: _longest_gap_s(s.acked_writes, migrate_at, done_at) for name, s in stats.items()}
    after_kill = {
        name: (s.first_ack_after(fault.killed_at) or float("nan")) - fault.killed_at
        for name, s in stats.items()
    }
    fence_at = fault.step_at.get("fence", done_at)
    fenced_gap_s = _longest_gap_s(stats["move"].acked_writes, fence_at, done_at)
    rs = rebalancer.stats
    record_property("migration_s", round(migrate_s, 3))
    record_property("fenced_s", round(rs.fenced_s, 3))
    record_property("longest_gap_move_fenced_s", round(fenced_gap_s, 3))
    for name in stats:
        record_property(f"longest_gap_{name}_s", round(gaps[name], 3))
    print(
        f"\npreload {len(KEYS)} keys in {preload_s:.1f}s, shard {NEW_SHARD} group "
        f"up in {group_up_s:.1f}s; killed {fault.killed} at {fault.step}, restarted "
        f"{fault.restarted_at - fault.killed_at:.1f}s later; {resumed or 'no resume needed'}"
    )
    print(
        f"migration {migrate_s:.2f}s ({rs.keys} keys streamed, {rs.bytes / 1e3:.0f} kB, "
        f"fence to flip {rs.fenced_s:.3f}s); leaders' keys {counts}; loads wrote {loaded} keys"
    )
    print(
        f"  load move from the fence to the end ({done_at - fence_at:.2f}s): longest "
        f"stretch without an ack {fenced_gap_s:.2f}s"
    )
    for name, s in stats.items():
        print(
            f"  load {name}: {s.ops} ops, {len(s.acked_writes)} acked writes, errors "
            f"{dict(s.errors)}; longest stretch without an ack during the migration "
            f"{gaps[name]:.2f}s; kill -> first ack {after_kill[name]:.2f}s"
        )
    for line in lines:
        print("  " + line)
    print(f"  replicas {replicas}; total {total_s:.1f}s")
    assert all(s.first_ack_after(done_at) is not None for s in stats.values()), (
        "a load acknowledged nothing after the change"
    )
    assert total_s < BUDGET_S, f"took {total_s:.1f}s, budget {BUDGET_S:.0f}s"


def _keys(reply: AdminReply) -> int:
    assert isinstance(reply, AdminInfoReply), reply
    return reply.keys
