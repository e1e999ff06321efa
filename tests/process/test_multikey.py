"""Batches and scans on real processes (2 shards x 3 replicas, one broker).

- ``test_batches_scans_and_the_cli``: mset/mget/mdelete across shards, a batch write
  resent under the same request id applies once (same versions, no new write), scans
  by prefix with small pages equal a sorted reference, the pipeline, and the CLI verbs
  (``mset``, ``mget``, ``mdel``, ``scan``, ``put KEY -``).
- ``test_batches_and_scans_on_a_secure_cluster``: the same through Curve.
- ``test_batches_across_a_leader_kill_and_over_asyncio_and_http``: msets while shard 0's
  leader is SIGKILLed keep one version per shard part and end at the last acknowledged
  values; the asyncio client and the gateway's ``GET /kv`` read them back.
- ``test_scan_during_add_shard_with_concurrent_writes``: while ``zkv admin add-shard``
  (a real subprocess; this test plays the ``zkv cluster up`` supervisor that starts the
  new nodes) moves keys to a third shard and writers put and delete other keys, scanner
  threads page through the whole key space again and again. Every scan must return
  keys in strictly increasing order (so no key twice), every key present for the whole
  scan (written before, never touched) exactly once, and no key deleted before the
  scan began. At least one scan must overlap the ring change. Two coordinators: the
  real CLI, and the same code in-process pausing 3 s before the old owners drop the
  keys they gave away, with keys deleted at the start of the pause (their stale copies
  stay on the old owners): scans that begin later must not return them. Without the
  ownership filter of scan pages this variant fails (keys twice, deleted keys back).
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import ROOT, ZkvCli
from zkv.client import KVClient
from zkv.ops.cluster import LocalCluster
from zkv.protocol.errors import KVError
from zkv.protocol.multikey import MultiPutRequest, MultiReply
from zkv.protocol.ring import Ring, RingConfig

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]


def _ring(d: dict[str, object]) -> Ring:
    return Ring(RingConfig(int(d["epoch"]), tuple(d["shards"]), int(d["vnodes"])))  # type: ignore[arg-type, call-overload]


def _cli(endpoint: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "zkv.client.cli", "--endpoint", endpoint,
                           *args], cwd=ROOT, input=stdin, capture_output=True, timeout=60,
                          check=False)


def test_batches_scans_and_the_cli(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "data", shards=2, replicas=3, port=0, fsync="never") as c:
        c.wait_ready(60)
        with KVClient(c.endpoints, timeout_s=10) as kv:
            items = {f"user:{i:04d}": f"v{i}" for i in range(300)}
            versions = kv.mset(items)
            assert set(versions) == set(items)
            ring = _ring(kv.status()["ring"])
            by_shard: dict[int, set[int]] = {}
            for key, version in versions.items():
                by_shard.setdefault(ring.shard_for(key.encode()), set()).add(version)
            assert len(by_shard) == 2 and all(len(v) == 1 for v in by_shard.values()), \
                by_shard  # one log entry per shard: one version for all of its keys
            assert kv.mget([*items, "user:none"]) == {
                **{k: v.encode() for k, v in items.items()}, "user:none": None}
            # a batch resent under the same request id applies once
            rid = kv.new_request_id()
            req = MultiPutRequest(kv.client_id, rid, rid, (b"once:a", b"once:b"), (b"1", b"2"))
            first = kv._call(lambda r: req, MultiReply, 5.0, rid)
            again = kv._call(lambda r: req, MultiReply, 5.0, rid)
            assert first.results == again.results
            assert kv.get_versioned("once:a") == (b"1", first.results[0].version)
            deleted = kv.mdelete([f"user:{i:04d}" for i in range(0, 300, 3)] + ["user:none"])
            assert sum(deleted.values()) == 100 and deleted["user:none"] is False
            expected = sorted(k.encode() for i, k in enumerate(items) if i % 3)
            assert [k for k, _ in kv.scan_iter("user:", page_size=17)] == expected
            page = kv.scan("user:", limit=5, keys_only=True)
            assert page.keys == expected[:5] and page.cursor is not None
            assert [k for k, _ in kv.scan_iter("", page_size=1000)] == sorted(
                [*expected, b"once:a", b"once:b"])
            with kv.pipeline() as p:
                for i in range(50):
                    p.put(f"pipe:{i}", str(i))
            assert all(isinstance(v, int) for v in p.results)
            with kv.pipeline() as p:
                for i in range(50):
                    p.get(f"pipe:{i}")
            assert p.results == [str(i).encode() for i in range(50)]
        e = c.endpoint
        assert _cli(e, "mset", "cli:a", "1", "cli:b", "2").returncode == 0
        out = _cli(e, "mget", "cli:a", "cli:b", "cli:c")
        assert out.returncode == 1 and out.stdout == b"cli:a\t1\ncli:b\t2\ncli:c\t(nil)\n"
        assert _cli(e, "put", "cli:c", "-", stdin=b"from\nstdin").returncode == 0
        out = _cli(e, "scan", "cli:", "--limit", "5")
        assert out.stdout == b"cli:a\t1\ncli:b\t2\ncli:c\tfrom\\nstdin\n"
        assert _cli(e, "mdel", "cli:a", "cli:z").stdout == b"cli:a\tdeleted\ncli:z\t(not found)\n"
        assert _cli(e, "scan", "cli:", "--keys-only").stdout == b"cli:b\ncli:c\n"


def test_batches_and_scans_on_a_secure_cluster(tmp_path: Path) -> None:
    """With Curve, the broker puts the client's role stamp before its part idents and
    strips it from the replies: batches and scans work as in plaintext."""
    with LocalCluster(tmp_path / "data", shards=2, replicas=1, port=0, fsync="never",
                      secure=True) as c:
        c.wait_ready(60)
        with KVClient(c.endpoints, timeout_s=10, keys=c.client_keys) as kv:
            kv.mset({f"k{i}": str(i) for i in range(40)})
            assert kv.mget(["k1", "k39", "k40"]) == {"k1": b"1", "k39": b"39", "k40": None}
            assert len(list(kv.scan_iter("k", page_size=7))) == 40
            assert sum(kv.mdelete([f"k{i}" for i in range(10)]).values()) == 10


def test_batches_across_a_leader_kill_and_over_asyncio_and_http(tmp_path: Path) -> None:
    """A writer loops ``mset`` of 20 keys (each round its own values) while shard 0's
    leader is SIGKILLed and restarted: every acknowledged batch's keys on one shard share
    one version (one entry), and at the end every key holds the value of the last
    acknowledged batch (or of a later, unacknowledged one). Then the asyncio client and
    the gateway's ``GET /kv`` read the same keys."""
    import asyncio
    import signal

    keys = [f"kill:{i:02d}" for i in range(20)]
    acked: list[dict[str, int]] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer(endpoints: list[str]) -> None:
        with KVClient(endpoints, timeout_s=15) as kv:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    acked.append({"round": n, **kv.mset({k: f"{n}" for k in keys})})
                except KVError as exc:
                    errors.append(repr(exc))

    with LocalCluster(tmp_path / "data", shards=2, replicas=3, port=0, fsync="always",
                      heartbeat_ms=100, election_timeout_ms=600) as c:
        c.wait_ready(60)
        t = threading.Thread(target=writer, args=(c.endpoints,), daemon=True)
        t.start()
        time.sleep(1.0)
        leader = c.leader_of(0)
        c.kill_node(leader, signal.SIGKILL)
        time.sleep(2.0)
        c.restart_node(leader)
        time.sleep(1.5)
        stop.set()
        t.join(30)
        assert not t.is_alive()
        with KVClient(c.endpoints, timeout_s=15) as kv:
            ring = _ring(kv.status()["ring"])
            final = kv.mget(keys)
        for batch in acked:
            by_shard: dict[int, set[int]] = {}
            for k in keys:
                by_shard.setdefault(ring.shard_for(k.encode()), set()).add(batch[k])
            assert all(len(v) == 1 for v in by_shard.values()), batch
        last = acked[-1]["round"]
        assert all(v is not None and int(v) >= last for v in final.values()), (final, last)

        async def async_reads() -> tuple[dict[object, bytes | None], Any]:
            from zkv.client import AsyncKVClient
            from zkv.gateway.app import create_app

            async with AsyncKVClient(c.endpoints, timeout_s=15) as akv:
                got = await akv.mget(keys)
                app = create_app(c.endpoints)
                app.state.kv_state["kv"] = akv
                import httpx

                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                             base_url="http://t") as http:
                    page = (await http.get("/kv", params={"prefix": "kill:",
                                                          "limit": 50})).json()
            return got, page

        got, page = asyncio.run(async_reads())
        assert got == final
        assert [i["key"] for i in page["items"]] == keys and page["cursor"] is None
    print(f"\n{len(acked)} batches acknowledged across the kill of {leader}; "
          f"errors {errors[:3]} ({len(errors)})")


STABLE = [f"s:{i:05d}".encode() for i in range(1500)]
DELETED = [f"d:{i:05d}".encode() for i in range(300)]
#: deleted while the change is in flight (pause-before-drop: once the new ring is in
#: force, while the old owners still hold copies): scans that begin later must not see them
LATE = [f"l:{i:05d}".encode() for i in range(300)]


def _writer(stop: threading.Event, endpoints: list[str], seed: int, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    with KVClient(endpoints, timeout_s=10, seed=seed) as kv:
        while not stop.is_set():
            key = f"w:{rng.randrange(400):04d}"
            try:
                if rng.random() < 0.6:
                    kv.put(key, "x" * rng.randrange(50))
                elif rng.random() < 0.5:
                    kv.delete(key)
                else:
                    kv.mset({f"w:{rng.randrange(400):04d}": "m" for _ in range(5)})
                counts["ok"] += 1
            except KVError as exc:
                name = type(exc).__name__
                counts[name] = counts.get(name, 0) + 1


def _scanner(stop: threading.Event, endpoints: list[str], seed: int,
             scans: list[tuple[float, float, int]], problems: list[str],
             late_deleted_at: list[float]) -> None:
    rng = random.Random(seed)
    stable, deleted, late = set(STABLE), set(DELETED), set(LATE)
    with KVClient(endpoints, timeout_s=20, seed=seed) as kv:
        while not stop.is_set():
            started = time.monotonic()
            keys: list[bytes] = []
            try:
                for key, _ in kv.scan_iter("", page_size=rng.choice([37, 100, 250])):
                    keys.append(key)
            except KVError as exc:
                problems.append(f"scan failed: {exc!r}")
                return
            ended = time.monotonic()
            if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
                problems.append("keys out of order or repeated")
            seen = set(keys)
            if not stable <= seen:
                problems.append(f"{len(stable - seen)} stable keys missing, e.g. "
                                f"{sorted(stable - seen)[:3]}")
            if seen & deleted:
                problems.append(f"deleted keys returned: {sorted(seen & deleted)[:3]}")
            if late_deleted_at and started > late_deleted_at[0] and seen & late:
                problems.append(f"keys deleted during the change returned: "
                                f"{sorted(seen & late)[:3]}")
            scans.append((started, ended, len(keys)))


def _add_shard_by_cli(cluster: LocalCluster) -> list[str]:
    """``zkv admin add-shard --data-dir`` as a subprocess, this test playing the
    ``zkv cluster up`` supervisor that starts the nodes it adds."""
    def on_line(line: str) -> bool:
        if "waiting for its leader" in line:
            cluster.sync_spec()
        return False

    with ZkvCli("admin", "add-shard", "--data-dir", str(cluster.data_dir),
                "--endpoint", cluster.endpoint) as cli:
        cli.follow(on_line, timeout_s=150)
        code = cli.proc.wait(timeout=10)  # follow read to the end
    assert code == 0, f"add-shard failed ({code}): {cli.lines}"
    return cli.lines


def _add_shard_pausing_before_drop(cluster: LocalCluster,
                                   late_deleted_at: list[float]) -> list[str]:
    """The same coordinator in this process, pausing 3 s once the new ring is in force
    and before the old owners drop the keys they gave away: for those 3 s the old owners
    still hold copies of keys they no longer own, which a scan must not return. The
    ``LATE`` keys are deleted at the start of the pause (the old owners' copies stay)."""
    lines: list[str] = []

    def on_step(step: str) -> None:
        if step == "drop":
            with KVClient(cluster.endpoints, timeout_s=20) as kv:
                kv.mdelete(LATE)
            late_deleted_at.append(time.monotonic())
            time.sleep(3.0)

    cluster.add_shard(progress=lines.append, on_step=on_step)
    return lines


@pytest.mark.parametrize("coordinator", ["cli", "pause-before-drop"])
def test_scan_during_add_shard_with_concurrent_writes(tmp_path: Path, coordinator: str) -> None:
    with LocalCluster(tmp_path / "data", shards=2, replicas=3, port=0, fsync="never",
                      heartbeat_ms=100, election_timeout_ms=600) as cluster:
        cluster.wait_ready(60)
        with KVClient(cluster.endpoints, timeout_s=20) as kv:
            for i in range(0, len(STABLE), 500):
                kv.mset({k: b"stable" for k in STABLE[i:i + 500]})
            kv.mset(dict.fromkeys(DELETED, b"doomed"))
            kv.mdelete(DELETED)
            kv.mset(dict.fromkeys(LATE, b"late"))
        late_deleted_at: list[float] = []
        stop = threading.Event()
        counts = {"ok": 0}
        scans: list[tuple[float, float, int]] = []
        problems: list[str] = []
        threads = [threading.Thread(target=_writer, args=(stop, cluster.endpoints, i, counts),
                                    daemon=True) for i in range(2)]
        threads += [threading.Thread(target=_scanner, daemon=True,
                                     args=(stop, cluster.endpoints, 100 + i, scans, problems,
                                           late_deleted_at))
                    for i in range(2)]
        for t in threads:
            t.start()
        lines: list[str] = []
        try:
            time.sleep(1.0)
            add_started = time.monotonic()
            lines = (_add_shard_by_cli(cluster) if coordinator == "cli"
                     else _add_shard_pausing_before_drop(cluster, late_deleted_at))
            add_ended = time.monotonic()
            time.sleep(1.0)
            n_before_stop = len(scans)
            deadline = time.monotonic() + 30
            while len(scans) < n_before_stop + 2 and time.monotonic() < deadline:
                time.sleep(0.2)  # scans that start after the change as well
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        with KVClient(cluster.endpoints, timeout_s=20) as kv:
            ring = kv.status()["ring"]
            final = [k for k, _ in kv.scan_iter("s:", page_size=500)]
    overlapping = [s for s in scans if s[0] < add_ended and s[1] > add_started]
    after_late = [s for s in scans if late_deleted_at and s[0] > late_deleted_at[0]
                  and s[0] < add_ended]
    print(f"\n{coordinator}: add-shard {add_ended - add_started:.1f}s; {len(scans)} full scans "
          f"({len(overlapping)} overlapping the change), keys per scan "
          f"{min(n for _, _, n in scans)}..{max(n for _, _, n in scans)}; writes {counts}; "
          f"final ring {ring}")
    for line in lines:
        print("  " + line)
    assert not problems, problems[:5]
    assert len(ring["shards"]) == 3, ring
    assert overlapping, "no scan overlapped the ring change"
    if coordinator != "cli":
        assert after_late, "no scan began while the old owners held copies"
    assert final == STABLE
    assert counts["ok"] > 0
