"""Watchers under a leader kill and a broker kill (issue 15, item 2), against real
processes.

The issue's scenario as written: a 1-shard x 3-replica ``LocalCluster`` with 2 brokers,
4 watchers on overlapping prefixes (``""``, ``a``, ``ab`` and ``ab/``) while 8 clients
put and delete keys under ``a/``, ``ab/`` and ``b/``; the nemesis SIGKILLs the shard
leader (and restarts it) twice and SIGKILLs a broker once. Every other watcher also
stops and resumes from its last event's token with a new client every 100 events (a
client reconnect). Each writer finally writes ``ab/end-<w>``; a watcher stops once it
has seen all eight.

Checked for each watcher: its events are exactly the acknowledged writes on its prefix
(puts with their value and version, deletes that removed a key with their version),
plus possibly some writes whose outcome was unknown, each at most once; no event
repeats; per key, versions strictly increase in event order.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zkv.client import AsyncKVClient, Event, KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import KVError

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

RUN_S = 12.0
WRITERS = 8
PREFIXES = ("", "a", "ab", "ab/")


@dataclass
class History:
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: acknowledged: (kind, key, value, version)
    acked: list[tuple[str, str, str, int]] = field(default_factory=list)
    #: outcome unknown: (kind, key, value)
    unknown: list[tuple[str, str, str]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)


def _writer(endpoints: list[str], h: History, wid: int, stop: threading.Event) -> None:
    rng = random.Random(wid)
    keys = [f"{p}{wid}-{i}" for p in ("a/", "ab/", "b/") for i in range(5)]
    with KVClient(endpoints, timeout_s=5) as kv:
        i = 0
        while not stop.is_set():
            key = rng.choice(keys)
            i += 1
            value = f"{wid}-{i}"
            try:
                if rng.random() < 0.8:
                    version = kv.put(key, value)
                    rec = ("put", key, value, version)
                else:
                    value = ""
                    deleted, version = kv.delete_versioned(key)
                    if not deleted:
                        continue
                    rec = ("delete", key, value, version)
            except KVError:
                with h.lock:
                    h.unknown.append(("put" if value else "delete", key, value))
                continue
            with h.lock:
                h.acked.append(rec)
            time.sleep(0.005)
        for _ in range(50):
            try:
                version = kv.put(f"ab/end-{wid}", "end")
                break
            except KVError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"writer {wid} could not write its end marker")
        with h.lock:
            h.acked.append(("put", f"ab/end-{wid}", "end", version))
            h.faults.append(f"{time.time():.3f} writer {wid} done after {i} writes")


def _watcher(endpoints: list[str], prefix: str, out: list[Event], resume_every: int,
             ready: threading.Event) -> None:
    token = "0:0"
    ends: set[bytes] = set()
    while len(ends) < WRITERS:
        with KVClient(endpoints, timeout_s=5) as kv:
            ready.set()
            for n, ev in enumerate(kv.watch(prefix, start=token), 1):
                out.append(ev)
                token = ev.token
                if ev.key.startswith(b"ab/end-"):
                    ends.add(ev.key)
                    if len(ends) == WRITERS:
                        return
                if resume_every and n >= resume_every:
                    break  # a new client resumes from the token


def _nemesis(cluster: LocalCluster, h: History, stop: threading.Event) -> None:
    for round_ in range(2):
        if stop.wait(2.5):
            return
        leader = cluster.leader_of(0, 10)
        h.faults.append(f"{time.time():.3f} SIGKILL {leader}")
        cluster.kill_node(leader, signal.SIGKILL)
        if round_ == 0:
            cluster.kill_broker(1, signal.SIGKILL)
            h.faults.append(f"{time.time():.3f} SIGKILL broker 1")
        if stop.wait(2.0):
            return
        cluster.restart_node(leader)
        h.faults.append(f"{time.time():.3f} restarted {leader}")


def _check(prefix: str, events: list[Event], h: History) -> None:
    p = prefix.encode()
    want = [a for a in h.acked if a[1].startswith(prefix)]
    maybe = {(k, key, v) for k, key, v in h.unknown if key.startswith(prefix)}
    got = [(e.kind, e.key.decode(), e.value.decode(), e.version) for e in events]
    assert all(e.key.startswith(p) for e in events)
    assert len(set(got)) == len(got), "an event repeated"
    missing = set(want) - set(got)
    assert not missing, f"{prefix}: acknowledged writes not seen: {sorted(missing)[:5]}"
    extra = [g for g in got if g not in set(want)]
    assert all(g[:3] in maybe for g in extra), f"{prefix}: unexplained: {extra[:5]}"
    puts = [(key, v) for kind, key, v, _ in got if kind == "put"]
    assert len(puts) == len(set(puts)), "a put (values are unique) appeared twice"
    last: dict[str, int] = {}
    for kind, key, _v, version in got:
        assert version > last.get(key, 0), f"{key}: version {version} after {last[key]}"
        last[key] = version
        assert kind in ("put", "delete")


def test_watchers_see_exactly_the_committed_writes_under_faults(tmp_path: Path) -> None:
    h = History()
    with LocalCluster(tmp_path / "data", shards=1, replicas=3, brokers=2, port=0,
                      fsync="never", heartbeat_ms=50, election_timeout_ms=500) as cluster:
        cluster.wait_ready(30)
        endpoints = cluster.endpoints
        seen: dict[str, list[Event]] = {p: [] for p in PREFIXES}
        ready = [threading.Event() for _ in PREFIXES]
        # the watchers (and half the writers) start on broker 1, the one killed
        behind = endpoints[1:] + endpoints[:1]
        watchers = [threading.Thread(target=_watcher, daemon=True,
                                     args=(behind, p, seen[p], 100 if i % 2 else 0, ready[i]))
                    for i, p in enumerate(PREFIXES)]
        for t in watchers:
            t.start()
        for r in ready:
            r.wait(10)
        stop = threading.Event()
        threads = [threading.Thread(target=_writer,
                                    args=(behind if w % 2 else endpoints, h, w, stop))
                   for w in range(WRITERS)]
        threads.append(threading.Thread(target=_nemesis, args=(cluster, h, stop)))
        for t in threads:
            t.start()
        time.sleep(RUN_S)
        stop.set()
        for t in threads:
            t.join(60)
        for t in watchers:
            t.join(60)
        print(f"{len(h.acked)} acknowledged writes, {len(h.unknown)} unknown; "
              f"events seen: { {p: len(e) for p, e in seen.items()} }; faults: {h.faults}")
        assert len(h.faults) >= 4 + WRITERS, h.faults
        assert not _dups(h), f"two acknowledged writes got one version: {_dups(h)}"
        ends = {p: sorted(e.key.decode() for e in evs if e.key.startswith(b"ab/end-"))
                for p, evs in seen.items()}
        acked_ends = [a for a in h.acked if a[1].startswith("ab/end-")]
        assert not any(t.is_alive() for t in watchers), (
            f"a watcher did not see the end: {ends}, acked {acked_ends}, "
            f"last events { {p: evs[-3:] for p, evs in seen.items()} }, "
            f"dup versions: {_dups(h)} faults {h.faults}")
        assert len(h.acked) > 300
        for p in PREFIXES:
            _check(p, seen[p], h)


def _cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zkv.client.cli", "--endpoint",
                           cluster.endpoint, *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_watch_and_compaction_after_a_restart_from_a_snapshot(tmp_path: Path) -> None:
    """``zkv watch`` prints events from a token; after every node restarts from a
    snapshot, the history before it is gone: a watch from before it is compacted and
    names the token to restart from, which then works."""
    data = tmp_path / "data"
    args = dict(shards=1, replicas=3, brokers=1, port=0, fsync="always", heartbeat_ms=50,
                election_timeout_ms=500, node_args=("--snapshot-entries", "50"))
    with LocalCluster(data, **args) as cluster:  # type: ignore[arg-type]
        cluster.wait_ready(30)
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            kv.put("w/1", "one")
            kv.put("x/1", "other")
            kv.delete("w/1")
        out = _cli(cluster, "watch", "w/", "--start", "0:0", "--count", "2", "--json")
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(e["kind"], e["key"], e["value"]) for e in lines] == [
            ("put", "w/1", "one"), ("delete", "w/1", "")]
        assert asyncio.run(_async_watch(cluster.endpoint)) == [
            ("put", b"w/1", b"one"), ("delete", b"w/1", b"")]
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            for i in range(120):  # past two snapshots
                kv.put(f"w/{i}", "v")
    with LocalCluster(data, **args) as cluster:  # type: ignore[arg-type]
        cluster.wait_ready(30)
        out = _cli(cluster, "watch", "w/", "--start", "0:0", "--count", "1")
        assert out.returncode == 1 and "compacted" in out.stderr, out.stderr
        token = out.stderr.rsplit("--start ", 1)[1].strip()
        with KVClient(cluster.endpoint, timeout_s=10) as kv:
            kv.put("w/after", "new")
            events = kv.watch("w/", start=token)
            ev = next(events)
            while ev.key != b"w/after":  # entries replayed after the snapshot, if any
                ev = next(events)
            assert ev.kind == "put" and ev.value == b"new"


async def _async_watch(endpoint: str) -> list[tuple[str, bytes, bytes]]:
    out = []
    async with AsyncKVClient(endpoint, timeout_s=10) as kv:
        async for ev in kv.watch("w/", start="0:0"):
            out.append((ev.kind, ev.key, ev.value))
            if len(out) == 2:
                break
    return out


def _dups(h: History) -> list[tuple[str, str, str, int]]:
    by: dict[int, list[tuple[str, str, str, int]]] = {}
    for a in h.acked:
        by.setdefault(a[3], []).append(a)
    return [x for v in by.values() if len(v) > 1 for x in v][:10]
