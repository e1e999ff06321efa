"""A/B of builds (or settings) on 2 shards x 3 replicas, writes only (``--shards``,
``--replicas``, ``--read-ratio`` for other shapes, e.g. ``make bench``'s 1 x 1 fsync never
with half gets): which is faster on this machine, measured in one run.

Each ``--config NAME=ROOT[:VAR=VALUE,...]`` is a checkout with its own ``.venv`` (e.g.
the previous release in a ``git worktree``) and environment variables for its
processes (``FSYNC=never`` is the ``--fsync`` flag instead; ``DATA_ROOT=/dev/shm`` puts
the config's data dir there instead of the temp dir, e.g. to tell a disk's cost from the
code's: on tmpfs an fdatasync returns at once). Rounds alternate the order
of the configs; each run starts the config's own ``zkv cluster up`` (2 x 3, heartbeat
100 ms, election timeout 1000 ms) on a fresh data dir, loads it with *this* checkout's
``zkv bench`` (the same generator for all: it speaks protocol version 1, which every
release reads), and measures the cluster's CPU (every process under the supervisor,
from /proc, user and system apart) and the whole machine's (/proc/stat: with the kernel
threads that run fsyncs, the disk's interrupts and the load generator, which no cluster
process is charged for), and the group commits of its storage nodes (their
``/metrics``: fsyncs per write and entries per group commit, the figures that say what
fsync always costs at a concurrency: docs/performance.md, "Syncs per write,
counted"). The best round of each config is compared.

    git worktree add --detach /tmp/zkv-old f8a6183
    (cd /tmp/zkv-old && python3.11 -m venv .venv && .venv/bin/pip install -e .)
    python -m bench.ab_builds --config old=/tmp/zkv-old --config new=. \\
        --config inline=.:ZKV_WAL_SYNC=inline --rounds 4 --duration 8

``--concurrency 96,384,1536`` runs every config at each (in every round), and the
verdict compares each config's best at any of them; ``--p99-ms 20`` adds each config's
best among the runs whose p99 stayed within 20 ms.

Every cluster is stopped (SIGTERM to its process group, then SIGKILL) and its data dir
removed, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any, TypeVar

HERE = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cluster_cpu_s(root: int) -> tuple[float, float]:
    """User and system CPU seconds of ``root`` and every process under it (apart:
    Python work and the kernel's for syscalls and wake-ups move differently)."""
    user = system = 0
    for pid in _descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / TICK, system / TICK


def machine_busy_s(stat: str | None = None) -> float:
    """CPU seconds this machine spent busy, all CPUs: user, nice, system, irq and
    softirq from /proc/stat's first line (``stat``: its text, for tests). Idle,
    iowait and steal (another guest's) are not counted. Unlike ``cluster_cpu_s`` it
    sees the kernel threads that run fsyncs and the interrupts of the disk, which no
    process of the cluster is charged for, and the load generator too."""
    text = stat if stat is not None else Path("/proc/stat").read_text()
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(x) for x in text.split("\n", 1)[0].split()[1:8])
    return (user + nice + system + irq + softirq) / TICK


#: a storage node's /metrics, as ``zkv cluster up`` prints it on stderr
_NODE_METRICS = re.compile(r"metrics of (s\d+r\d+) on (http://\S+)")
#: the WAL's group-commit counters a node exports: fsyncs, group commits, entries written
WAL_SERIES = ("zkv_node_wal_fsync_seconds_count", "zkv_node_wal_batch_entries_count",
              "zkv_node_wal_batch_entries_sum")


def node_metrics_urls(stderr: str) -> dict[str, str]:
    """Each storage node's /metrics URL from ``zkv cluster up``'s stderr (brokers and
    a gateway left out); empty from a build that prints none."""
    return dict(_NODE_METRICS.findall(stderr))


def wal_counts(exposition: str) -> tuple[float, float, float]:
    """``WAL_SERIES`` in one node's Prometheus text exposition, each summed over its
    labels; 0 for a series it does not export."""
    totals = dict.fromkeys(WAL_SERIES, 0.0)
    for line in exposition.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals[WAL_SERIES[0]], totals[WAL_SERIES[1]], totals[WAL_SERIES[2]]


def cluster_wal_counts(urls: dict[str, str]) -> tuple[float, float, float] | None:
    """``wal_counts`` summed over the nodes; None if one does not answer (its figures
    would be wrong, not merely missing)."""
    if not urls:
        return None
    total = [0.0, 0.0, 0.0]
    for url in urls.values():
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for i, value in enumerate(wal_counts(text)):
            total[i] += value
    return total[0], total[1], total[2]


def group_commit_figures(before: tuple[float, float, float] | None,
                         after: tuple[float, float, float] | None,
                         answered: int) -> dict[str, float]:
    """Fsyncs per write and entries per group commit from ``cluster_wal_counts`` taken
    around a run that answered ``answered`` writes; empty if either scrape failed."""
    if before is None or after is None:
        return {}
    fsyncs, commits, entries = (a - b for a, b in zip(after, before, strict=True))
    return {"fsyncs_per_write": fsyncs / answered,
            "entries_per_commit": entries / commits if commits else 0.0}


def parse_config(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    root, _, assignments = rest.partition(":")
    if not name or not root:
        raise argparse.ArgumentTypeError(f"expected NAME=ROOT[:VAR=VALUE,...], got {text!r}")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, Path(root).resolve(), env


def parse_concurrencies(text: str) -> list[int]:
    """``96`` or ``96,384,1536``: the requests in flight of each run."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N[,N...] with N >= 1, got {text!r}")
    return values


def run_order(rounds: int, concurrencies: list[int], configs: list[T]) -> list[tuple[T, int]]:
    """The runs of an alternating comparison, in order: every round runs each config at
    each concurrency, the configs' order reversed every other round, so that neither
    always runs first (after a quiet spell or right after the other's load)."""
    return [(config, concurrency)
            for r in range(rounds)
            for concurrency in concurrencies
            for config in (configs if r % 2 == 0 else configs[::-1])]


def make_data_dir(name: str, env: dict[str, str]) -> str:
    """A fresh data dir for one run of config ``name``: under its ``DATA_ROOT`` if it
    gives one (e.g. /dev/shm, where an fdatasync costs nothing), else the temp dir."""
    return tempfile.mkdtemp(prefix=f"zkv-ab-{name}-", dir=env.get("DATA_ROOT"))


def run_one(name: str, root: Path, env: dict[str, str], port: int, concurrency: int,
            args: argparse.Namespace) -> dict[str, Any]:
    # the cluster's stderr names each node's /metrics (read for the group commits)
    with tempfile.TemporaryFile(mode="w+") as stderr:
        return _measure(name, root, env, port, concurrency, args, stderr)


def _wait_for_metrics_urls(stderr: IO[str], nodes: int, timeout: float = 10.0) -> dict[str, str]:
    """The nodes' /metrics URLs once ``zkv cluster up`` has printed all ``nodes`` (it
    does once every node is heard); what it printed by ``timeout`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        stderr.seek(0)
        urls = node_metrics_urls(stderr.read())
        if len(urls) >= nodes or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def _measure(name: str, root: Path, env: dict[str, str], port: int, concurrency: int,
             args: argparse.Namespace, stderr: IO[str]) -> dict[str, Any]:
    data = make_data_dir(name, env)
    zkv = str(HERE / ".venv/bin/zkv")
    proc = subprocess.Popen(
        [str(root / ".venv/bin/zkv"), "cluster", "up", "--data-dir", data, "--port", str(port),
         "--shards", str(args.shards), "--replicas", str(args.replicas),
         "--fsync", env.get("FSYNC", args.fsync),
         "--heartbeat-ms", "100", "--election-timeout-ms", "1000"],
        # cwd: a checkout's processes start with `python -m`, which imports from the
        # working directory first
        cwd=root, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
        stderr=stderr, start_new_session=True)  # fmt: skip
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([zkv, "--endpoint", endpoint, "--timeout", "3", "put", "ab", "1"],
                             capture_output=True, timeout=30).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: the cluster did not serve within 90 s")
            time.sleep(0.5)
        time.sleep(1.0)
        urls = _wait_for_metrics_urls(stderr, args.shards * args.replicas)
        wal_before = cluster_wal_counts(urls)
        before, machine_before = cluster_cpu_s(proc.pid), machine_busy_s()
        bench = subprocess.run(
            [zkv, "--endpoint", endpoint, "bench", "--read-ratio", str(args.read_ratio),
             "--concurrency",
             str(concurrency), "--duration", str(args.duration), "--warmup", "2", "--json"],
            capture_output=True, text=True, timeout=args.duration + 120)  # fmt: skip
        after, machine_after = cluster_cpu_s(proc.pid), machine_busy_s()
        wal_after = cluster_wal_counts(urls)
        result = json.loads(bench.stdout)
        # the CPU windows span the generator's warmup too: per request answered in them
        answered = max(result["ops"] + result["warmup_ops"], 1)
        per_op = 1e6 / answered
        user, system = ((a - b) * per_op for a, b in zip(after, before, strict=True))
        # the nodes publish their counters once per heartbeat: ~0.1 s of 10 s late
        return {"name": name, "concurrency": concurrency, "ops_s": result["ops_s"],
                "p99_ms": result["latency_ms"]["all"]["p99"],
                "cpu_us_per_write": user + system, "user_us": user, "sys_us": system,
                "machine_us_per_write": (machine_after - machine_before) * per_op,
                "errors": result.get("errors", {}),
                **group_commit_figures(wal_before, wal_after, answered)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass  # it exited by itself
        shutil.rmtree(data, ignore_errors=True)


def _split(result: dict[str, Any]) -> str:
    return f"{result['user_us']:.0f}+{result['sys_us']:.0f}"


def _best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(runs, key=lambda x: x["ops_s"]) if runs else None


def summarize(results: list[dict[str, Any]], names: list[str],
              p99_max_ms: float | None = None) -> list[str]:
    """The verdict lines: per concurrency (when there are several), each config's best
    round against the first config's at the same concurrency; then each config's best
    at any concurrency (what "at the concurrency that gives the best throughput" asks)
    against the first config's; with ``p99_max_ms``, also the best of the runs whose
    p99 stayed within it. Results without the cluster's CPU (``bench.write_floor``'s)
    report the machine's alone; results with the nodes' group commits report them."""
    lines = []
    base = names[0]
    levels = sorted({x["concurrency"] for x in results})
    if len(levels) > 1:
        for level in levels:
            at = [x for x in results if x["concurrency"] == level]
            ref = _best([x for x in at if x["name"] == base])
            cells = []
            for name in names:
                best = _best([x for x in at if x["name"] == name])
                if best is None or ref is None:
                    continue
                cells.append(f"{name} {best['ops_s']:,.0f}/s p99 {best['p99_ms']:.1f} ms "
                             f"({best['ops_s'] / ref['ops_s']:.2f}x)")
            lines.append(f"{level} in flight: " + "; ".join(cells))
    top = _best([x for x in results if x["name"] == base])
    assert top is not None
    for name in names:
        mine = [x for x in results if x["name"] == name]
        best = _best(mine)
        assert best is not None
        cluster = (f"cluster CPU us/write {[round(x['cpu_us_per_write']) for x in mine]} "
                   f"(user + system {', '.join(_split(x) for x in mine)}); "
                   if all("cpu_us_per_write" in x for x in mine) else "")
        wal = (f"; fsyncs per write {[round(x['fsyncs_per_write'], 3) for x in mine]}, "
               f"entries per group commit {[round(x['entries_per_commit'], 1) for x in mine]}"
               if all("fsyncs_per_write" in x for x in mine) else "")
        lines.append(
            f"{name}: best {best['ops_s']:,.0f} writes/s at {best['concurrency']} in flight "
            f"(p99 {best['p99_ms']:.1f} ms), {best['ops_s'] / top['ops_s']:.2f}x {base}; "
            f"rounds {[round(x['ops_s']) for x in mine]}; {cluster}machine CPU us/write "
            f"{[round(x['machine_us_per_write']) for x in mine]}{wal}")
    if p99_max_ms is not None:
        within = [x for x in results if x["p99_ms"] <= p99_max_ms]
        ref = _best([x for x in within if x["name"] == base])
        for name in names:
            best = _best([x for x in within if x["name"] == name])
            if best is None:
                lines.append(f"{name}: no run kept p99 <= {p99_max_ms:g} ms")
                continue
            ratio = f", {best['ops_s'] / ref['ops_s']:.2f}x {base}" if ref else ""
            lines.append(f"{name} with p99 <= {p99_max_ms:g} ms: best {best['ops_s']:,.0f} "
                         f"writes/s at {best['concurrency']} in flight (p99 "
                         f"{best['p99_ms']:.1f} ms){ratio}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=parse_config, action="append", required=True,
                   help="NAME=ROOT[:VAR=VALUE,...] (repeat; the first is the baseline)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", type=parse_concurrencies, default=[96],
                   help="requests in flight; several (96,384,1536) run each config at each")
    p.add_argument("--p99-ms", type=float, default=None,
                   help="also report each config's best run whose p99 stayed within this")
    p.add_argument("--fsync", default="always")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--read-ratio", type=float, default=0.0,
                   help="share of linearizable gets (then the CPU figure is per request)")
    p.add_argument("--port", type=int, default=17000, help="first broker port")
    args = p.parse_args(argv)
    results: list[dict[str, Any]] = []
    for i, ((name, root, env), concurrency) in enumerate(
            run_order(args.rounds, args.concurrency, args.config)):
        port = args.port + 20 * (i + 1)
        results.append(run_one(name, root, env, port, concurrency, args))
        print(json.dumps(results[-1]), flush=True)
    for line in summarize(results, [name for name, _, _ in args.config], args.p99_ms):
        print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
