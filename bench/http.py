"""``make bench-http``: the HTTP gateway against a dict server and against the SDK.

One run on this machine, everything on the same cores:

- ``gateway``: ``zkv gateway`` (1 worker) in front of 2 shards x 3 replicas, fsync
  always, 1 broker (``LocalCluster``);
- ``gateway-nometrics``: the same gateway with ``--no-metrics`` (what counting costs);
- ``gateway-nobatch`` (GET only): the same gateway with ``--get-batch-max 1``, each GET
  sent alone (what batching one loop turn's GETs into one MultiGetRequest gains);
- ``dict``: ``bench/dict_server.py``, FastAPI + uvicorn over a Python dict, 1 worker,
  no replication, no disk (the shape of the service zkv grew out of);
- ``sdk``: ``ops.bench.run_bench`` (what ``zkv bench`` runs) on the same cluster,
  50 requests in flight.

HTTP load is ``wrk`` (Debian's package; ``make bench-tools`` installs it) with 50
connections and one thread, GET then PUT of 64-byte values over ``--keys`` keys loaded
first. Every target (the SDK too) is measured in each of ``--rounds`` rounds, in an order
rotated per round, so a noisy neighbour favours no side; each keeps its best round. Also measured: the
CPU cost of counting a /kv request, in-process (``kv_tally_cost_us``; the ASGI
middleware that counts the other routes: ``metrics_cost_us``), and
for every run the CPU the server and the cluster spent per answered request (from
/proc: far steadier than requests/s when other work shares the cores).

    python -m bench.http [--duration 8] [--rounds 2] [--json]

Prints a Markdown table and the ratios (targets: gateway >= 0.5x dict, >= 0.6x SDK;
metrics < 5%). Every process started is stopped, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from zkv.gateway.process import GatewayProcess
from zkv.ops.bench import run_bench
from zkv.ops.cluster import LocalCluster, free_port

CONNECTIONS = 50
VALUE = "v" * 64

_LUA = """
local keys = {keys}
local value = "{value}"
math.randomseed(os.time())
local op = "{op}"
request = function()
  local k = "k" .. math.random(0, keys - 1)
  if op == "GET" then
    return wrk.format("GET", "/kv/" .. k)
  end
  return wrk.format("PUT", "/kv/" .. k, {{["Content-Type"] = "application/json"}},
                    '{{"key": "' .. k .. '", "value": "' .. value .. '"}}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('JSON {{"requests": %d, "duration_us": %d, "non2xx": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p99_us": %d}}\\n', summary.requests,
    summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _say(line: str) -> None:
    print(f"bench-http: {line}", file=sys.stderr, flush=True)


def wrk(url: str, op: str, keys: int, duration_s: float, workdir: Path) -> dict[str, Any]:
    script = workdir / f"{op.lower()}.lua"
    script.write_text(_LUA.format(keys=keys, value=VALUE, op=op))
    done = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration_s:g}s", "--timeout",
                           "10s", "-s", str(script), url], capture_output=True, text=True,
                          timeout=duration_s + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {done.stdout}\n{done.stderr}")
    r = json.loads(line[5:])
    ok = r["requests"] - r["non2xx"] - r["socket_errors"]
    r["ok_s"] = round(ok / (r["duration_us"] / 1e6), 1)
    return r


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def measured(url: str, op: str, keys: int, duration_s: float, workdir: Path,
             server: list[int], cluster: list[int]) -> dict[str, Any]:
    """A wrk run plus the CPU the server and the cluster spent per answered request:
    a figure a noisy neighbour moves much less than requests/s."""
    before = cpu_s(server), cpu_s(cluster)
    r = wrk(url, op, keys, duration_s, workdir)
    ok = max(1, r["requests"] - r["non2xx"] - r["socket_errors"])
    r["server_cpu_us"] = round((cpu_s(server) - before[0]) / ok * 1e6, 1)
    r["cluster_cpu_us"] = round((cpu_s(cluster) - before[1]) / ok * 1e6, 1)
    return r


def sdk_run(endpoint: str, op: str, args: argparse.Namespace,
            cluster: list[int]) -> dict[str, Any]:
    """What ``zkv bench`` runs, at the same 50 in flight, GET-only or PUT-only."""
    before = cpu_s(cluster)
    sdk = run_bench(endpoint, concurrency=CONNECTIONS, duration_s=args.duration,
                    keys=args.keys, value_size=len(VALUE),
                    read_ratio=1.0 if op == "GET" else 0.0, warmup_s=1.0)
    lat = sdk.latency_ms.get("all", {})
    return {"ok_s": round(sdk.ops_s, 1), "p50_us": (lat.get("p50") or 0) * 1000,
            "p99_us": (lat.get("p99") or 0) * 1000, "non2xx": sum(sdk.errors.values()),
            "server_cpu_us": 0.0,
            "cluster_cpu_us": round((cpu_s(cluster) - before) / max(1, sdk.ops) * 1e6, 1)}


def preload(url: str, keys: int) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
            sem = asyncio.Semaphore(CONNECTIONS)

            async def put(i: int) -> None:
                async with sem:
                    r = await c.put(f"/kv/k{i}", json={"key": f"k{i}", "value": VALUE})
                    r.raise_for_status()

            await asyncio.gather(*(put(i) for i in range(keys)))

    asyncio.run(main())


@contextlib.contextmanager
def dict_server(log: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.dict_server:app",
                                 "--port", str(port), "--workers", "1", "--log-level",
                                 "warning", "--no-access-log"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the dict server did not start (log {log})")
                time.sleep(0.1)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kv_tally_cost_us(n: int = 500_000) -> float:
    """CPU microseconds counting adds to one /kv request answered by the gateway's HTTP
    protocol (``GatewayMetrics.begin`` and ``end_kv``, what ``KVCycle`` runs), in-process,
    against an empty loop."""
    from zkv.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()

    def bare() -> float:
        start = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - start

    def counted() -> float:
        begin, end = metrics.begin, metrics.end_kv
        start = time.perf_counter()
        for _ in range(n):
            end("get", 200, begin())
        return time.perf_counter() - start

    return round((min(counted() for _ in range(3)) - min(bare() for _ in range(3))) / n * 1e6, 2)


def metrics_cost_us(n: int = 200_000) -> float:
    """CPU microseconds the metrics middleware adds to one request that goes through ASGI
    (every route but the /kv requests the protocol answers), in-process: a bare ASGI app
    called directly vs through ``MetricsMiddleware``."""
    from zkv.gateway.metrics import GatewayMetrics, MetricsMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request"}

    wrapped = MetricsMiddleware(app, GatewayMetrics())
    scope = {"type": "http", "path": "/kv/k1", "method": "GET"}

    async def loop(target: Any) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await target(scope, receive, send)
        return time.perf_counter() - start

    bare = min(asyncio.run(loop(app)) for _ in range(3))
    counted = min(asyncio.run(loop(wrapped)) for _ in range(3))
    return round((counted - bare) / n * 1e6, 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("bench-http: wrk is not installed (make bench-tools)")
    work = Path(tempfile.mkdtemp(prefix="zkv-bench-http-"))
    results: dict[str, Any] = {"connections": CONNECTIONS, "duration_s": args.duration,
                               "rounds": args.rounds, "value_bytes": len(VALUE), "keys": args.keys}
    best: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        with LocalCluster(work / "data", shards=2, replicas=3, port=0, fsync="always") as cluster:
            cluster.wait_ready(60)
            gws = {"gateway": GatewayProcess(cluster.endpoint, free_port(),
                                             log_path=work / "gateway.log"),
                   "gateway-nometrics": GatewayProcess(cluster.endpoint, free_port(),
                                                       log_path=work / "gateway-nm.log",
                                                       extra_args=("--no-metrics",)),
                   "gateway-nobatch": GatewayProcess(cluster.endpoint, free_port(),
                                                     log_path=work / "gateway-nb.log",
                                                     extra_args=("--get-batch-max", "1"))}
            cluster_pids = [c.proc.pid for c in [*cluster.brokers, *cluster.nodes.values()]
                            if c.proc is not None]
            with contextlib.ExitStack() as stack, dict_server(work / "dict.log") as (dict_url,
                                                                                    dict_pid):
                urls = {"dict": dict_url}
                pids = {"dict": dict_pid}
                for name, gw in gws.items():
                    why = gw.start()
                    stack.callback(gw.stop)
                    if why is not None or not gw.wait_healthy(30):
                        raise RuntimeError(f"{name} did not start: {why}")
                    urls[name] = gw.url
                    assert gw.proc is not None
                    pids[name] = gw.proc.pid
                for url in urls.values():
                    preload(url, args.keys)
                _say(f"loaded {args.keys} keys into {', '.join(urls)}")
                names = [*urls, "sdk"]
                for rnd in range(args.rounds):
                    order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate
                    for op in ("GET", "PUT"):
                        for name in order:
                            if op == "PUT" and name == "gateway-nobatch":
                                continue  # batching is for GETs only
                            if name == "sdk":
                                r = sdk_run(cluster.endpoint, op, args, cluster_pids)
                            else:
                                r = measured(urls[name], op, args.keys, args.duration, work,
                                             [pids[name]], [] if name == "dict" else cluster_pids)
                            _say(f"round {rnd + 1} {op} {name}: {r['ok_s']:.0f}/s "
                                 f"(p50 {r['p50_us'] / 1000:.1f} ms, p99 "
                                 f"{r['p99_us'] / 1000:.1f} ms, errors {r['non2xx']}, "
                                 f"server {r['server_cpu_us']} us CPU/req, cluster "
                                 f"{r['cluster_cpu_us']})")
                            if (op, name) not in best or r["ok_s"] > best[(op, name)]["ok_s"]:
                                best[(op, name)] = r
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["results"] = {f"{op} {name}": r for (op, name), r in sorted(best.items())}
    ratios = {}
    for op in ("GET", "PUT"):
        gw = best[(op, "gateway")]["ok_s"]
        ratios[f"{op} gateway/dict"] = round(gw / best[(op, "dict")]["ok_s"], 3)
        ratios[f"{op} gateway/sdk"] = round(gw / best[(op, "sdk")]["ok_s"], 3)
        ratios[f"{op} metrics cost"] = round(1 - gw / best[(op, "gateway-nometrics")]["ok_s"], 3)
    ratios["GET gateway-nobatch/sdk"] = round(
        best[("GET", "gateway-nobatch")]["ok_s"] / best[("GET", "sdk")]["ok_s"], 3)
    results["ratios"] = ratios
    cost = kv_tally_cost_us()
    results["metrics_cost_us_per_request"] = cost
    results["metrics_cost_share"] = {  # of the gateway's own CPU per request
        op: round(cost / max(1.0, best[(op, "gateway")]["server_cpu_us"]), 4)
        for op in ("GET", "PUT")}
    results["metrics_middleware_us_per_request"] = metrics_cost_us()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| op | target | req/s | p50 ms | p99 ms | server CPU us/req | cluster CPU us/req |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results["results"].items():
        op, target = name.split(" ", 1)
        lines.append(f"| {op} | {target} | {r['ok_s']:.0f} | {r['p50_us'] / 1000:.1f} | "
                     f"{r['p99_us'] / 1000:.1f} | {r['server_cpu_us']} | {r['cluster_cpu_us']} |")
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in results["ratios"].items()]
    lines.append(f"- metrics, /kv tally: {results['metrics_cost_us_per_request']} us CPU per "
                 f"request in-process = {results['metrics_cost_share']} of the gateway's CPU "
                 f"per request; the ASGI middleware (other routes): "
                 f"{results['metrics_middleware_us_per_request']} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
