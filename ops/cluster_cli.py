"""``zkv cluster up``: its flags, and the foreground run that starts a ``LocalCluster``,
waits until it serves, starts the HTTP gateway beside it and supervises both until
SIGINT/SIGTERM.

While it runs it follows ``cluster.json`` (``zkv admin ... --data-dir`` edits it: new
nodes start, removed ones stop), reports children that exit (it does not restart them)
and, on the way out, ignores a second Ctrl-C so the cleanup is not cut short.

A stop signal does two things: it raises ``KeyboardInterrupt`` (which cuts a wait short)
and it sets a flag that the supervising loop and the gateway's health wait check. The
flag is what makes the stop certain: Python runs a signal handler at whatever bytecode
the main thread is at, and an exception raised while a finalizer (``__del__``, a GC
callback, e.g. of a closed HTTP response) runs is printed as "Exception ignored" and
dropped, so the exception alone can be lost.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from zkv.ops.cluster import LocalCluster
from zkv.ops.cluster_spec import CLUSTER_FILE, ClusterError
from zkv.protocol.ring import DEFAULT_VNODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=None, help="shards (default 2)")
    p.add_argument("--replicas", type=int, default=None, help="replicas per shard (default 3)")
    p.add_argument("--brokers", type=int, default=1)
    p.add_argument("--vnodes", type=int, default=None,
                   help=f"ring vnodes per shard, fixed at creation (default {DEFAULT_VNODES})")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--port", type=int, default=5555, help="first broker port (0: free)")
    p.add_argument("--fsync", default="always", help="always | interval:<ms> | never")
    p.add_argument("--heartbeat-ms", type=int, default=None)
    p.add_argument("--election-timeout-ms", type=int, default=None)
    p.add_argument("--metrics-port-base", type=int, default=0,
                   help="/metrics of broker b0 on this port, the next processes on the "
                   "ports after it (default 0: free ports, printed)")
    p.add_argument("--no-metrics", action="store_true", help="serve no /metrics")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--secure", action="store_true",
                   help="Curve keys for every process, generated under DATA_DIR/keys")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds to wait for every shard to elect a leader")
    p.add_argument("--http-port", type=int, default=8000,
                   help="port of the HTTP gateway (REST API, /ui, /metrics; default 8000; "
                   "0: no gateway)")
    p.add_argument("--http-workers", type=int, default=1, help="gateway worker processes")


def run_cli(args: argparse.Namespace) -> int:
    """Start, wait until serving, supervise until SIGINT/SIGTERM, stop; 0 on a clean stop."""

    def say(line: str) -> None:
        print(f"zkv cluster up: {line}", file=sys.stderr, flush=True)

    stop_requested = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        stop_requested.set()
        raise KeyboardInterrupt

    def check_stop() -> bool:
        if stop_requested.is_set():
            raise KeyboardInterrupt
        return False

    try:
        cluster = LocalCluster(
            args.data_dir, shards=args.shards, replicas=args.replicas, brokers=args.brokers,
            vnodes=args.vnodes,
            port=args.port, fsync=args.fsync, heartbeat_ms=args.heartbeat_ms,
            election_timeout_ms=args.election_timeout_ms, log_level=args.log_level,
            metrics_port=None if args.no_metrics else args.metrics_port_base,
            secure=args.secure,
        )
    except ClusterError as exc:
        print(f"zkv: error: {exc}", file=sys.stderr)
        return 1
    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    gateway = None
    try:
        say(f"{len(cluster.shard_ids)} shard(s) x {cluster.spec['replicas']} replica(s), "
            f"{cluster.spec['brokers']} broker(s), data in {cluster.data_dir}")
        cluster.start()
        cluster.wait_ready(args.ready_timeout, progress=lambda s: say(f"waiting: {s}"))
        print(f"zkv cluster up: serving on {cluster.endpoint}", flush=True)
        if cluster.keys_dir is not None:
            print(f"zkv cluster up: client key {cluster.client_keys} (zkv --keys DIR, "
                  f"env ZKV_KEYS)\nzkv cluster up: admin key {cluster.admin_keys}", flush=True)
        for name, url in cluster.metrics_urls().items():
            say(f"metrics of {name} on {url}")
        check_stop()
        gateway = _start_gateway(cluster, args, say, check_stop)
        spec_path = cluster.data_dir / CLUSTER_FILE
        spec_mtime = spec_path.stat().st_mtime_ns
        while True:
            time.sleep(0.5)
            check_stop()
            mtime = spec_path.stat().st_mtime_ns
            if mtime != spec_mtime:  # `zkv admin add-shard/add-replica/... --data-dir`
                spec_mtime = mtime
                for line in cluster.sync_spec():
                    say(line)
            for c in cluster.dead_children():
                say(f"{c.name} exited with code {c.proc.returncode if c.proc else '?'} "
                    f"(not restarted; log {c.log_path})")
            if gateway is not None and not gateway.alive:
                say(f"the gateway exited (not restarted; log {gateway.log_path})")
                gateway = None
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except ClusterError as exc:
        print(f"zkv: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        if gateway is not None:
            gateway.stop()
        cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)


def _start_gateway(cluster: LocalCluster, args: argparse.Namespace,
                   say: Callable[[str], None],
                   check_stop: Callable[[], bool] = lambda: False) -> Any:
    """The HTTP gateway as one more child (``--http-port``, 0: none); when it cannot run
    (no http extra, port taken) say why and carry on without it. ``check_stop`` raises
    once a stop was asked for; the gateway is then stopped before this returns."""
    if not args.http_port:
        return None
    from zkv.gateway.process import GatewayProcess

    gw = GatewayProcess(cluster.endpoint, args.http_port, host=cluster.host,
                        workers=args.http_workers,
                        log_path=cluster.data_dir / "logs" / "gateway.log",
                        keys=cluster.gateway_keys, tokens=cluster.gateway_tokens)
    try:
        why = gw.start()
        if why is None and not gw.wait_healthy(cancelled=check_stop):
            gw.stop()
            why = f"it did not answer /health (log {gw.log_path})"
    except BaseException:
        gw.stop()
        raise
    if why is not None:
        say(f"no HTTP gateway: {why}; running without it")
        return None
    print(f"zkv cluster up: HTTP gateway on {gw.url} (docs {gw.url}/docs, live page "
          f"{gw.url}/ui)", flush=True)
    if cluster.gateway_tokens is not None:
        # where the tokens are, never the tokens: this output may end up in a log
        print(f"zkv cluster up: HTTP bearer tokens in {cluster.gateway_tokens} (roles client, "
              f"admin, metrics), e.g. curl -H \"Authorization: Bearer $(awk '$1==\"client\""
              f"{{print $2}}' {cluster.gateway_tokens})\" {gw.url}/kv/foo", flush=True)
    return gw
