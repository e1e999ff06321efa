"""``zkv-broker``: the command line entry point of the stateless broker tier.

Ports: ``--port P`` gives frontend P, backend P+1, heartbeats P+2 on ``--host``; each can
be overridden with a full endpoint (``--frontend/--backend/--heartbeat-endpoint``; port
``*`` lets the OS choose, the ready line shows the result). SIGTERM and SIGINT close the
sockets and exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from zkv.broker.server import CLIENT_QUEUE_MAX, BrokerConfig, BrokerServer
from zkv.protocol.errors import KVError
from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.metrics import serve_metrics
from zkv.protocol.runtime import configure_logging, tune_gc
from zkv.protocol.security import is_loopback
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zkv-broker", description="zkv stateless broker")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="base port P: frontend P, backend P+1, heartbeats P+2")
    p.add_argument("--frontend", help="frontend endpoint, overrides --host/--port")
    p.add_argument("--backend", help="backend endpoint, overrides --host/--port")
    p.add_argument("--heartbeat-endpoint", help="heartbeat endpoint, overrides --host/--port")
    p.add_argument("--broker-id", help="name reported in Pong/Status/Campaign (default host:port)")
    p.add_argument("--heartbeat-ms", type=int, default=HEARTBEAT_MS)
    p.add_argument("--election-timeout-ms", type=int, default=ELECTION_TIMEOUT_MS, help="must be >= 3 x heartbeat")
    p.add_argument("--key-bytes-max", type=int, default=KEY_BYTES_MAX)
    p.add_argument("--value-bytes-max", type=int, default=VALUE_BYTES_MAX)
    p.add_argument(
        "--client-queue-max", type=int, default=CLIENT_QUEUE_MAX,
        help="replies queued per client before further ones are dropped (a client that "
        "stops reading cannot grow the broker)",
    )  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free one; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="interface for /metrics")
    p.add_argument("--keys", type=Path, default=os.environ.get("ZKV_KEYS_DIR") or None,
                   help="(env ZKV_KEYS_DIR) a `zkv keys generate` dir: Curve on every socket, keys checked "
                   "against its public/ allow-lists (this broker's pair: brokers/<broker-id>/)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback address (anyone who can reach "
                   "the ports is trusted)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    host = "*" if args.host in ("*", "0.0.0.0") else args.host
    base = f"tcp://{host}"
    return BrokerConfig(
        broker_id=args.broker_id or f"{socket.gethostname()}:{args.port}",
        frontend=args.frontend or f"{base}:{args.port}",
        backend=args.backend or f"{base}:{args.port + 1}",
        heartbeats=args.heartbeat_endpoint or f"{base}:{args.port + 2}",
        heartbeat_ms=args.heartbeat_ms,
        election_timeout_ms=args.election_timeout_ms,
        key_bytes_max=args.key_bytes_max,
        value_bytes_max=args.value_bytes_max,
        client_queue_max=args.client_queue_max,
        keys_dir=args.keys,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    log = logger.bind(component="broker")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("bad configuration: {}", exc)
        return 2
    exposed = [e for e in (config.frontend, config.backend, config.heartbeats)
               if not is_loopback(e)]
    if exposed and config.keys_dir is None and not args.insecure:
        log.error("refusing to bind {} without keys: anyone who can reach it could read, "
                  "write and administer the cluster. Give --keys DIR (zkv keys generate), "
                  "or --insecure to run plaintext anyway", ", ".join(exposed))
        return 2
    try:
        server = BrokerServer(config)
    except KVError as exc:  # KeyFileError: missing, bad or too open key files
        log.error("refusing to start: {}", exc)
        return 2
    try:
        endpoints = server.bind()
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint
        log.error("cannot bind: {}", exc)
        server.close()
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        server.stop()

    if args.metrics_port is not None:
        server.stats.collector = serve_metrics(args.metrics_host, args.metrics_port,
                                               f"broker {config.broker_id}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "broker {} ready frontend={} backend={} heartbeats={}",
        config.broker_id, endpoints["frontend"], endpoints["backend"], endpoints["heartbeats"],
    )  # fmt: skip
    try:
        tune_gc()
        server.run()
    finally:
        server.close()
    log.info("broker {} stopped", config.broker_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
