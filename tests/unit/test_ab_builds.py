"""``bench.ab_builds``: the machine-wide CPU (/proc/stat's first line), the concurrency
list, the nodes' group commits (their /metrics), and the verdict at the concurrency that
gives each config its best throughput."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bench.ab_builds import (
    TICK,
    group_commit_figures,
    machine_busy_s,
    make_data_dir,
    node_metrics_urls,
    parse_concurrencies,
    parse_config,
    run_order,
    summarize,
    wal_counts,
)

# cpu  user nice system idle iowait irq softirq steal guest guest_nice
STAT = ("cpu  1000 20 300 5000 40 6 70 9 0 0\n"
        "cpu0 500 10 150 2500 20 3 35 4 0 0\n")


def test_busy_time_counts_user_system_and_interrupts_not_idle_iowait_or_steal() -> None:
    assert machine_busy_s(STAT) == pytest.approx((1000 + 20 + 300 + 6 + 70) / TICK)


def test_busy_time_reads_this_machine() -> None:
    assert machine_busy_s() > 0


def test_concurrencies_are_one_or_a_comma_list_of_positive_counts() -> None:
    assert parse_concurrencies("96") == [96]
    assert parse_concurrencies("96,384,1536") == [96, 384, 1536]
    for bad in ("", "0", "96,x", "-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_concurrencies(bad)


def test_a_config_may_put_its_data_dir_elsewhere(tmp_path: Path) -> None:
    """``DATA_ROOT=/dev/shm`` tells the disk's cost from the code's (docs/performance.md:
    "The disk, not the sync's code path")."""
    name, _root, env = parse_config(f"shm=.:DATA_ROOT={tmp_path},FSYNC=always")
    assert env == {"DATA_ROOT": str(tmp_path), "FSYNC": "always"}
    assert Path(make_data_dir(name, env)).parent == tmp_path
    default = Path(make_data_dir("disk", {}))
    try:
        assert default.parent == Path(tempfile.gettempdir())
    finally:
        default.rmdir()


def _run(name: str, concurrency: int, ops_s: float, p99_ms: float) -> dict[str, Any]:
    return {"name": name, "concurrency": concurrency, "ops_s": ops_s, "p99_ms": p99_ms,
            "cpu_us_per_write": 200.0, "user_us": 150.0, "sys_us": 50.0,
            "machine_us_per_write": 250.0}


RUNS = [
    _run("always", 96, 7_000, 25.0), _run("never", 96, 10_000, 22.0),
    _run("always", 1536, 19_000, 160.0), _run("never", 1536, 20_000, 230.0),
    _run("always", 32, 3_700, 17.0), _run("never", 32, 5_300, 13.0),
    _run("never", 64, 7_800, 18.0),
]


def test_each_config_is_judged_at_its_own_best_concurrency() -> None:
    lines = summarize(RUNS, ["always", "never"])
    assert "32 in flight: always 3,700/s p99 17.0 ms (1.00x); never 5,300/s" in lines[0]
    best = [line for line in lines if line.startswith(("always:", "never:"))]
    assert best[0].startswith("always: best 19,000 writes/s at 1536 in flight (p99 160.0 ms)")
    assert best[1].startswith("never: best 20,000 writes/s at 1536 in flight (p99 230.0 ms), "
                              "1.05x always")


def test_the_p99_bound_picks_the_best_run_within_it_for_each_config() -> None:
    lines = summarize(RUNS, ["always", "never"], p99_max_ms=20)
    assert ("always with p99 <= 20 ms: best 3,700 writes/s at 32 in flight (p99 17.0 ms), "
            "1.00x always") in lines
    assert ("never with p99 <= 20 ms: best 7,800 writes/s at 64 in flight (p99 18.0 ms), "
            "2.11x always") in lines


def test_a_config_with_no_run_within_the_bound_says_so() -> None:
    lines = summarize(RUNS, ["always", "never"], p99_max_ms=10)
    assert "always: no run kept p99 <= 10 ms" in lines
    assert "never: no run kept p99 <= 10 ms" in lines


def test_one_concurrency_prints_no_per_concurrency_lines() -> None:
    lines = summarize([r for r in RUNS if r["concurrency"] == 96], ["always", "never"])
    assert len(lines) == 2 and lines[0].startswith("always: best 7,000 writes/s at 96")


def test_runs_without_the_cluster_cpu_report_the_machine_cpu_alone() -> None:
    """``bench.write_floor`` has no cluster to charge: its verdict lines leave that
    figure out rather than print zeros."""
    runs = [{k: v for k, v in r.items() if k not in ("cpu_us_per_write", "user_us", "sys_us")}
            for r in RUNS]
    lines = summarize(runs, ["never", "always"])
    best = [line for line in lines if line.startswith(("always:", "never:"))]
    assert all("cluster CPU" not in line and "machine CPU us/write [250" in line
               for line in best), best
    assert "cluster CPU us/write [200" in summarize(RUNS, ["never", "always"])[-1]


def test_rounds_alternate_which_config_runs_first_at_each_concurrency() -> None:
    assert run_order(2, [32, 96], ["a", "b"]) == [
        ("a", 32), ("b", 32), ("a", 96), ("b", 96),
        ("b", 32), ("a", 32), ("b", 96), ("a", 96),
    ]
    assert run_order(3, [64], ["a", "b", "c"]) == [
        ("a", 64), ("b", 64), ("c", 64), ("c", 64), ("b", 64), ("a", 64),
        ("a", 64), ("b", 64), ("c", 64),
    ]
    assert run_order(0, [64], ["a"]) == []


def test_the_nodes_metrics_urls_come_from_cluster_ups_stderr() -> None:
    stderr = ("zkv cluster up: 2 shard(s) x 3 replica(s), 1 broker(s), data in /tmp/x\n"
              "zkv cluster up: metrics of b0 on http://127.0.0.1:31101/metrics\n"
              "zkv cluster up: metrics of s0r0 on http://127.0.0.1:27520/metrics\n"
              "zkv cluster up: metrics of s1r2 on http://127.0.0.1:28187/metrics\n")
    assert node_metrics_urls(stderr) == {"s0r0": "http://127.0.0.1:27520/metrics",
                                         "s1r2": "http://127.0.0.1:28187/metrics"}
    assert node_metrics_urls("zkv cluster up: serving on tcp://127.0.0.1:5555\n") == {}


def test_wal_counts_sum_the_group_commit_series_over_their_labels() -> None:
    exposition = """# HELP zkv_node_wal_fsync_seconds WAL fsync latency per group commit
# TYPE zkv_node_wal_fsync_seconds histogram
zkv_node_wal_fsync_seconds_bucket{le="0.001"} 40.0
zkv_node_wal_fsync_seconds_count 50.0
zkv_node_wal_fsync_seconds_sum 0.02
zkv_node_wal_batch_entries_count{node="s0r0"} 60.0
zkv_node_wal_batch_entries_count{node="s0r1"} 4.0
zkv_node_wal_batch_entries_sum 640.0
zkv_node_wal_batch_entries_sum_total 9.0
zkv_node_raft_term 3.0
"""
    assert wal_counts(exposition) == (50.0, 64.0, 640.0)
    assert wal_counts("# an exposition without them\nzkv_node_keys 0.0\n") == (0.0, 0.0, 0.0)


def test_group_commit_figures_are_the_counters_differences_per_write_and_per_commit() -> None:
    """Two scrapes around a run (fsyncs, group commits, entries) and the writes answered
    in it: what a write cost in syncs and what a group commit carried; nothing from a
    run whose scrape failed, and 0 entries per commit for a run that committed none."""
    before, after = (10.0, 20.0, 200.0), (40.0, 120.0, 1100.0)
    assert group_commit_figures(before, after, answered=900) == {
        "fsyncs_per_write": pytest.approx(30 / 900), "entries_per_commit": 9.0}
    assert group_commit_figures(None, after, answered=900) == {}
    assert group_commit_figures(before, None, answered=900) == {}
    assert group_commit_figures(before, before, answered=1) == {
        "fsyncs_per_write": 0.0, "entries_per_commit": 0.0}


def test_runs_with_the_nodes_group_commits_report_them() -> None:
    """What fsync always costs at a concurrency is the syncs a write shares
    (docs/performance.md: "Syncs per write, counted"); a run that could not read them
    says nothing of them."""
    runs = [{**r, "fsyncs_per_write": 0.333, "entries_per_commit": 9.04} for r in RUNS]
    lines = summarize(runs, ["always", "never"])
    assert lines[-1].endswith("fsyncs per write [0.333, 0.333, 0.333, 0.333], "
                              "entries per group commit [9.0, 9.0, 9.0, 9.0]"), lines[-1]
    assert all("fsyncs" not in line for line in summarize(RUNS, ["always", "never"]))
