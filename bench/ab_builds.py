"""A/B of builds (or settings) on 2 shards x 3 replicas, writes only (``--shards``,
``--replicas``, ``--read-ratio`` for other shapes, e.g. ``make bench``'s 1 x 1 fsync never
with half gets): which is faster on this machine, measured in one run.

Each ``--config NAME=ROOT[:VAR=VALUE,...]`` is a checkout with its own ``.venv`` (e.g.
the previous release in a ``git worktree``) and environment variables for its
processes (``FSYNC=never`` is the ``--fsync`` flag instead). Rounds alternate the order
of the configs; each run starts the config's own ``zkv cluster up`` (2 x 3, heartbeat
100 ms, election timeout 1000 ms) on a fresh data dir, loads it with *this* checkout's
``zkv bench`` (the same generator for all: it speaks protocol version 1, which every
release reads), and measures the cluster's CPU (every process under the supervisor,
from /proc, user and system apart) and the whole machine's (/proc/stat: with the kernel
threads that run fsyncs, the disk's interrupts and the load generator, which no cluster
process is charged for). The best round of each config is compared.

    git worktree add --detach /tmp/zkv-old f8a6183
    (cd /tmp/zkv-old && python3.11 -m venv .venv && .venv/bin/pip install -e .)
    python -m bench.ab_builds --config old=/tmp/zkv-old --config new=. \\
        --config inline=.:ZKV_WAL_SYNC=inline --rounds 4 --duration 8

Every cluster is stopped (SIGTERM to its process group, then SIGKILL) and its data dir
removed, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


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


def parse_config(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    root, _, assignments = rest.partition(":")
    if not name or not root:
        raise argparse.ArgumentTypeError(f"expected NAME=ROOT[:VAR=VALUE,...], got {text!r}")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, Path(root).resolve(), env


def run_one(name: str, root: Path, env: dict[str, str], port: int,
            args: argparse.Namespace) -> dict[str, Any]:
    data = tempfile.mkdtemp(prefix=f"zkv-ab-{name}-")
    zkv = str(HERE / ".venv/bin/zkv")
    proc = subprocess.Popen(
        [str(root / ".venv/bin/zkv"), "cluster", "up", "--data-dir", data, "--port", str(port),
         "--shards", str(args.shards), "--replicas", str(args.replicas),
         "--fsync", env.get("FSYNC", args.fsync),
         "--heartbeat-ms", "100", "--election-timeout-ms", "1000"],
        # cwd: a checkout's processes start with `python -m`, which imports from the
        # working directory first
        cwd=root, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([zkv, "--endpoint", endpoint, "--timeout", "3", "put", "ab", "1"],
                             capture_output=True, timeout=30).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: the cluster did not serve within 90 s")
            time.sleep(0.5)
        time.sleep(1.0)
        before, machine_before = cluster_cpu_s(proc.pid), machine_busy_s()
        bench = subprocess.run(
            [zkv, "--endpoint", endpoint, "bench", "--read-ratio", str(args.read_ratio),
             "--concurrency",
             str(args.concurrency), "--duration", str(args.duration), "--warmup", "2", "--json"],
            capture_output=True, text=True, timeout=args.duration + 120)  # fmt: skip
        after, machine_after = cluster_cpu_s(proc.pid), machine_busy_s()
        result = json.loads(bench.stdout)
        # the CPU windows span the generator's warmup too: per request answered in them
        per_op = 1e6 / max(result["ops"] + result.get("warmup_ops", 0), 1)
        user, system = ((a - b) * per_op for a, b in zip(after, before, strict=True))
        return {"name": name, "ops_s": result["ops_s"],
                "p99_ms": result["latency_ms"]["all"]["p99"],
                "cpu_us_per_write": user + system, "user_us": user, "sys_us": system,
                "machine_us_per_write": (machine_after - machine_before) * per_op,
                "errors": result.get("errors", {})}
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=parse_config, action="append", required=True,
                   help="NAME=ROOT[:VAR=VALUE,...] (repeat; the first is the baseline)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=96)
    p.add_argument("--fsync", default="always")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--read-ratio", type=float, default=0.0,
                   help="share of linearizable gets (then the CPU figure is per request)")
    p.add_argument("--port", type=int, default=17000, help="first broker port")
    args = p.parse_args(argv)
    results: list[dict[str, Any]] = []
    port = args.port
    for r in range(args.rounds):
        order = args.config if r % 2 == 0 else list(reversed(args.config))
        for name, root, env in order:
            port += 20
            results.append(run_one(name, root, env, port, args))
            print(json.dumps(results[-1]), flush=True)
    base = max((x for x in results if x["name"] == args.config[0][0]), key=lambda x: x["ops_s"])
    for name, _, _ in args.config:
        mine = [x for x in results if x["name"] == name]
        best = max(mine, key=lambda x: x["ops_s"])
        print(f"{name}: best {best['ops_s']:,.0f} writes/s (p99 {best['p99_ms']:.1f} ms), "
              f"{best['ops_s'] / base['ops_s']:.2f}x {args.config[0][0]}; rounds "
              f"{[round(x['ops_s']) for x in mine]}; cluster CPU us/write "
              f"{[round(x['cpu_us_per_write']) for x in mine]} (user + system "
              f"{', '.join(_split(x) for x in mine)}); machine CPU us/write "
              f"{[round(x['machine_us_per_write']) for x in mine]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
