#!/opt/zkv/bin/python
"""Container health checks for zkv, exit code based (0 healthy, 1 unhealthy).

    zkv-health broker [--endpoint tcp://127.0.0.1:5555] [--timeout-ms 2000]
        PingRequest to the broker's own frontend; healthy on a PongReply. With
        ZKV_KEYS_DIR set (secure compose): as its client key, to broker ZKV_BROKER_ID.
    zkv-health node [--port 7100]
        The storage node's peer ROUTER is listening (read from /proc/net/tcp*).
        Deliberately local: a node must not turn unhealthy (and, under Swarm, be
        rescheduled away from its volume) just because every broker is down.
    zkv-health http [--url http://127.0.0.1:8000/health] [--timeout-ms 2000]
        The HTTP gateway's /health answers 200 (the process serves; /ready would turn
        the gateway unhealthy whenever a shard is between leaders).
    zkv-health status --endpoint tcp://HOST:5555 --node-id ID
        The broker at ENDPOINT lists node ID as live (for manual checks).

Installed in the image as /opt/zkv/bin/zkv-health by compose/Dockerfile.
"""

from __future__ import annotations

import argparse
import os
import sys

LISTEN_STATE = "0A"


def _request(endpoint: str, msg: object, timeout_ms: int) -> object:
    import zmq

    from zkv.protocol import codec

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys = os.environ.get("ZKV_KEYS_DIR")
    if keys:  # a secure broker: ask as the cluster's client key, of this broker's key
        from pathlib import Path

        from zkv.protocol.security import Curve, load_public

        broker = os.environ.get("ZKV_BROKER_ID", "")
        Curve.for_identity(Path(keys) / "client").client(
            sock, load_public(Path(keys) / "public" / "brokers" / f"{broker}.key"))
    try:
        sock.connect(endpoint)
        sock.send_multipart(codec.encode(msg))  # type: ignore[arg-type]
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"no answer from {endpoint} within {timeout_ms} ms")
        return codec.decode(sock.recv_multipart())
    finally:
        sock.close(0)


def check_broker(endpoint: str, timeout_ms: int) -> str:
    from zkv.protocol.messages import PingRequest, PongReply

    reply = _request(endpoint, PingRequest(client_id=os.urandom(8), request_id=1), timeout_ms)
    if not isinstance(reply, PongReply):
        raise RuntimeError(f"unexpected reply {reply!r}")
    return f"broker {reply.broker_id} answers ping"


def check_listen(port: int) -> str:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == LISTEN_STATE and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        return f"listening on port {port}"
        except FileNotFoundError:
            continue
    raise RuntimeError(f"nothing listens on port {port}")


def check_http(url: str, timeout_ms: int) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_ms / 1000) as r:
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}")
    return f"{url} answers 200"


def check_status(endpoint: str, node_id: str, timeout_ms: int) -> str:
    from zkv.protocol.messages import StatusReply, StatusRequest

    reply = _request(endpoint, StatusRequest(client_id=os.urandom(8), request_id=1), timeout_ms)
    if not isinstance(reply, StatusReply):
        raise RuntimeError(f"unexpected reply {reply!r}")
    if not any(n.get("node_id") == node_id for n in reply.nodes):
        raise RuntimeError(f"broker {reply.broker_id} does not list node {node_id}")
    return f"broker {reply.broker_id} lists node {node_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zkv-health", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("broker")
    b.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    b.add_argument("--timeout-ms", type=int, default=2000)
    n = sub.add_parser("node")
    n.add_argument("--port", type=int, default=7100)
    h = sub.add_parser("http")
    h.add_argument("--url", default="http://127.0.0.1:8000/health")
    h.add_argument("--timeout-ms", type=int, default=2000)
    s = sub.add_parser("status")
    s.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    s.add_argument("--node-id", required=True)
    s.add_argument("--timeout-ms", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        if args.what == "broker":
            print(check_broker(args.endpoint, args.timeout_ms))
        elif args.what == "node":
            print(check_listen(args.port))
        elif args.what == "http":
            print(check_http(args.url, args.timeout_ms))
        else:
            print(check_status(args.endpoint, args.node_id, args.timeout_ms))
    except Exception as exc:  # any failure is "unhealthy", said in one line
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
