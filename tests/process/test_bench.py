"""``zkv bench`` runs: the raw zmq load generator against a fake broker on a real socket,
and ``zkv bench --endpoint A,B`` against a started 2-broker cluster (issue 9, item 6:
the comma-separated endpoint that ``zkv cluster up --brokers 2`` prints used to fail with
a zmq error). Every run is bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.fake_broker import DROP, FakeBroker
from zkv.client.cli import main
from zkv.ops.bench import BenchResult, run_bench
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import ErrorCode
from zkv.protocol.messages import ErrorReply, PutRequest

pytestmark = [pytest.mark.process, pytest.mark.timeout(90)]


def test_run_bench_against_fake_broker_is_bounded() -> None:
    ticks: list[tuple[float, int, int]] = []
    with FakeBroker() as b:
        start = time.monotonic()
        r = run_bench(b.endpoint, concurrency=16, duration_s=1.2, warmup_s=0.2, keys=50,
                      value_size=10, read_ratio=0.5, seed=3,
                      progress=lambda *a: ticks.append(a))
        assert time.monotonic() - start < 4
    assert isinstance(r, BenchResult)
    assert r.ops > 100 and r.ops_s > 0 and not r.errors
    assert r.latency_ms["all"]["count"] == r.ops
    assert r.latency_ms["get"]["count"] + r.latency_ms["put"]["count"] == r.ops
    assert ticks and ticks[0][1] >= 0
    json.dumps(r.to_dict())
    assert "throughput" in r.format()


def test_replies_during_the_warmup_are_counted_apart() -> None:
    """What a run cost (``bench.ab_builds`` reads CPU from before the generator starts
    to after it ends) is per request answered in all that time, the warmup's too."""
    with FakeBroker() as b:
        warm = run_bench(b.endpoint, concurrency=8, duration_s=0.5, warmup_s=0.5, keys=10,
                         check=False)
        cold = run_bench(b.endpoint, concurrency=8, duration_s=0.5, warmup_s=0, keys=10,
                         check=False)
    assert warm.warmup_ops > 50 and warm.ops > 50
    assert cold.warmup_ops == 0
    assert json.loads(json.dumps(warm.to_dict()))["warmup_ops"] == warm.warmup_ops


def test_error_codes_and_lost_replies_are_counted() -> None:
    def hook(ident: bytes, msg: object, seen: int) -> object:
        if isinstance(msg, PutRequest):
            return ErrorReply(msg.request_id, ErrorCode.NO_LEADER)
        return None

    with FakeBroker(hook) as b:
        r = run_bench(b.endpoint, concurrency=4, duration_s=0.5, warmup_s=0, read_ratio=0.5,
                      check=False)
    assert r.errors.get("NO_LEADER", 0) > 0
    assert "put" not in r.latency_ms


def test_bench_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker() as b:
        code = main(["--endpoint", b.endpoint, "bench", "--concurrency", "8", "--duration",
                     "0.5", "--warmup", "0", "--keys", "10", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["concurrency"] == 8 and result["ops"] > 0


def test_bench_dead_endpoint_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(lambda i, m, s: DROP) as b:
        start = time.monotonic()
        code = main(["--endpoint", b.endpoint, "bench", "--duration", "30"])
        assert time.monotonic() - start < 5
    assert code == 3
    assert "timeout" in capsys.readouterr().err


def test_bench_spreads_over_two_fake_brokers(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker(broker_id="f0") as b0, FakeBroker(broker_id="f1") as b1:
        code = main(["--endpoint", f"{b0.endpoint},{b1.endpoint}", "bench", "--concurrency",
                     "8", "--duration", "0.5", "--warmup", "0", "--keys", "10", "--json"])
        assert code == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        assert result["endpoint"] == f"{b0.endpoint},{b1.endpoint}" and result["ops"] > 0
        assert len(b0.requests(PutRequest)) > 10 and len(b1.requests(PutRequest)) > 10


def test_bench_with_a_dead_second_broker_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeBroker() as live, FakeBroker(lambda i, m, s: DROP) as dead:
        start = time.monotonic()
        code = main(["--endpoint", f"{live.endpoint},{dead.endpoint}", "bench",
                     "--duration", "30"])
        assert time.monotonic() - start < 5
    assert code == 3
    assert "timeout" in capsys.readouterr().err


def test_zkv_bench_against_a_two_broker_cluster(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=2, port=0,
                      fsync="never", heartbeat_ms=50, election_timeout_ms=500) as c:
        c.wait_ready(30)
        assert "," in c.endpoint  # what `zkv cluster up --brokers 2` prints
        out = subprocess.run(
            [sys.executable, "-m", "zkv.client.cli", "--endpoint", c.endpoint, "bench",
             "--concurrency", "16", "--duration", "1", "--warmup", "0.2", "--keys", "100",
             "--json"],
            capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["endpoint"] == c.endpoint
    assert result["ops"] > 0 and not result["errors"], result
    assert result["latency_ms"]["put"]["count"] > 0


def test_bench_env_endpoint_with_two_brokers(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=1, replicas=1, brokers=2, port=0,
                      fsync="never", heartbeat_ms=50, election_timeout_ms=500) as c:
        c.wait_ready(30)
        env = {**os.environ, "ZKV_ENDPOINT": c.endpoint}
        out = subprocess.run(
            [sys.executable, "-m", "zkv.client.cli", "bench", "--concurrency", "4",
             "--duration", "0.5", "--warmup", "0", "--keys", "10"],
            capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert f"endpoint {c.endpoint}" in out.stdout and "errors: none" in out.stdout



def test_watch_fanout_bench_delivers_every_write_once_to_every_watcher() -> None:
    """``bench/watch_fanout.py`` briefly (10 watchers, 2 s of writes per phase): every
    watcher got every acknowledged write exactly once, and the run stops by itself."""
    repo = Path(__file__).resolve().parents[2]
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "bench.watch_fanout", "--watchers", "10", "--writers", "4",
         "--rate", "300", "--duration", "2", "--drain", "10", "--json"],
        capture_output=True, text=True, timeout=80, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - start < 80
    result = json.loads(out.stdout)
    assert [r["watchers"] for r in result["phases"]] == [0, 1, 10]
    for r in result["phases"]:
        assert r["writes_acked"] > 100, r
        if not r["watchers"]:
            continue
        assert r["missing"] == 0 and r["duplicates"] == 0 and not r["errors"], r
        assert r["watchers_complete"] == r["watchers"], r
        assert r["events_total"] == r["watchers"] * r["writes_acked"] + r["unacked_delivered"]
        assert r["events_s"] > 0 and r["lag_samples"] > 0 and r["polls_s"] > 0, r


def test_round_trips_bench_reports_the_relay_the_disk_and_both_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``make bench``'s last part (issue 14, target 3), short: every figure is there."""
    from bench import round_trips

    assert round_trips.main(["--rounds", "1", "--duration", "0.5", "--warmup", "0.2",
                             "--syncs", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["best_p50_ms"]
    assert set(best) == {"relay", "fdatasync", "put", "get", "put_floor",
                         "put_floor_unsynced"}
    assert all(v > 0 for v in best.values()), best
    assert out["put_floor_ratio"] == pytest.approx(best["put_floor"] / out["put_bound_ms"])
    # both sides of the put's bound: the same bare path with and without its syncs
    assert out["put_floor_unsynced_ratio"] == pytest.approx(
        best["put_floor_unsynced"] / out["put_bound_ms"])
    assert out["put_over_floor"] == pytest.approx(best["put"] / best["put_floor"])
    assert out["put_bound_ms"] == pytest.approx(2 * best["relay"] + best["fdatasync"])
    assert out["get_ratio"] == pytest.approx(best["get"] / best["relay"])
    assert isinstance(out["put_ok"], bool) and isinstance(out["get_ok"], bool)
    shared = out["fdatasync_shared_p50_ms"]
    assert shared > 0
    assert out["put_ratio_shared_disk"] == pytest.approx(
        best["put"] / (2 * best["relay"] + shared))


def test_put_floor_acks_a_put_only_once_it_is_synced_by_a_majority(tmp_path: Path) -> None:
    """``bench/put_floor.py`` is a floor only if it does the durable minimum: every
    acknowledged put is in the leader's file and in at least one follower's (a follower
    may still be syncing the last one); its files go when it stops."""
    from bench.put_floor import Floor
    from zkv.client import KVClient

    keys = [f"floor-key-{i:02d}".encode() for i in range(20)]
    with Floor(tmp_path) as floor, KVClient(floor.endpoint, timeout_s=5.0, retries=0) as client:
        for i, key in enumerate(keys):
            assert client.put(key, b"v" * 100) == i + 1
        assert floor.dir is not None
        files = {p.name: p.read_bytes() for p in floor.dir.iterdir()}
    # a follower slow to start (a loaded machine) may not have its file yet: a put
    # waits for one follower, not both
    assert ({"floor-leader.log"} <= set(files)
            <= {"floor-leader.log", "floor-f0.log", "floor-f1.log"})
    assert all(key in files["floor-leader.log"] for key in keys)
    # followers append in order: the one that acked the last put holds every put
    assert any(all(key in files.get(f, b"") for key in keys)
               for f in ("floor-f0.log", "floor-f1.log"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["always", "direct"])
def test_write_floor_acks_a_write_only_once_a_majority_of_its_shard_synced_it(
    tmp_path: Path, mode: str,
) -> None:
    """``bench/write_floor.py`` (target 1's floor) is a floor only if it does the
    durable minimum: every acknowledged put is in its leader's file and in at least one
    of that leader's two followers' files; both leaders take writes; its files go when
    it stops."""
    from bench.write_floor import WriteFloor
    from zkv.client import KVClient

    keys = [f"write-floor-{i:02d}".encode() for i in range(20)]
    with (WriteFloor(tmp_path, mode) as floor,
          KVClient(floor.endpoint, timeout_s=5.0, retries=0) as client):
        versions = [client.put(key, b"v" * 100) for key in keys]
        assert floor.dir is not None
        files = {p.name: p.read_bytes() for p in floor.dir.iterdir()}
    assert all(v >= 1 for v in versions)
    # a follower that is slow to start (a loaded machine) may not have its file yet: a
    # write waits for one follower of its shard, not both
    assert ({"floor-L0.log", "floor-L1.log"} <= set(files)
            <= {"floor-L0.log", "floor-L1.log", "floor-f00.log", "floor-f01.log",
                "floor-f10.log", "floor-f11.log"})
    for leader in ("0", "1"):
        mine = [key for key in keys if key in files[f"floor-L{leader}.log"]]
        assert mine, f"leader {leader} took no write"
        assert any(all(key in files.get(f"floor-f{leader}{j}.log", b"") for key in mine)
                   for j in "01")
    assert sum(key in files[f"floor-L{i}.log"] for i in "01" for key in keys) == len(keys)
    assert list(tmp_path.iterdir()) == []


def test_write_floor_compares_fsync_always_and_never_at_each_concurrency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A short run of the whole comparison: every line of its verdict is there."""
    from bench import write_floor

    assert write_floor.main(["--data-dir", str(tmp_path), "--concurrency", "4,8",
                             "--rounds", "1", "--duration", "0.5", "--warmup", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "4 in flight: never" in out and "8 in flight: never" in out
    assert "never with p99 <= 20 ms: best" in out and "always with p99 <= 20 ms" in out
    assert list(tmp_path.iterdir()) == []


def test_ab_builds_counts_the_nodes_group_commits(capsys: pytest.CaptureFixture[str]) -> None:
    """A short A/B of this checkout against itself on 1 x 3 with fsync always: each run
    reads its nodes' /metrics around the load, so it says how many fsyncs a write cost
    and how many entries a group commit carried (docs/performance.md: "Syncs per write,
    counted")."""
    from bench import ab_builds
    from zkv.ops.cluster_spec import free_port_block

    root = str(Path(__file__).resolve().parents[2])
    assert ab_builds.main(["--config", f"a={root}", "--rounds", "1", "--duration", "1",
                           "--concurrency", "8", "--shards", "1", "--replicas", "3",
                           "--port", str(free_port_block(40))]) == 0
    out = capsys.readouterr().out.splitlines()
    run = json.loads(out[0])
    # every write is an entry on each of the 3 nodes, a group commit writes at least one
    # entry and (fsync always) syncs at most once: 0 < fsyncs per write <= 3
    assert 0 < run["fsyncs_per_write"] <= 3, run
    assert run["entries_per_commit"] >= 1, run
    assert "fsyncs per write [" in out[-1] and "entries per group commit [" in out[-1]


def test_stall_bench_times_a_follower_that_catches_up_by_installing_a_snapshot() -> None:
    """``bench/stall.py --install`` briefly (120,000 keys: two snapshots on the leader):
    the restarted follower installs one and catches up, and the run stops by itself.
    (The figures, no stall and no election at 1,000,000 keys, are the README's.)"""
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "bench.stall", "--keys", "120000", "--modes", "", "--install",
         "--json"], capture_output=True, text=True, timeout=240, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = json.loads(out.stdout)
    assert result["mode"] == "install" and result["keys"] == 120_000
    assert result["installs"] >= 1 and result["largest_snapshot_bytes"] > 100_000 * 100
    assert result["caught_up_s"] is not None, result
