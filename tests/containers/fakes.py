"""Stand-ins for zkv-broker and zkv-node, to test the container harness on its own.

Copied into containers by ``test_harness.py`` and run with the image's Python:

    python /opt/fakes.py broker --broker-id b0 --port 5555
        ROUTER on the frontend port: answers PingRequest with PongReply and
        StatusRequest with an empty StatusReply, anything else BAD_REQUEST.
    python /opt/fakes.py node --node-id s0r0 --port 7100
        ROUTER echo on the peer port.
    python /opt/fakes.py probe tcp://s0r0:7100 [--timeout-ms 1000]
        exit 0 if the echo comes back in time, 1 otherwise.

Each server logs the same "<role> <id> ready" line as the real processes.
"""

from __future__ import annotations

import argparse
import sys

import zmq


def serve_broker(broker_id: str, port: int) -> None:
    from zkv.protocol import codec
    from zkv.protocol.errors import ErrorCode, RemoteProtocolError
    from zkv.protocol.messages import ErrorReply, PingRequest, PongReply, StatusReply, StatusRequest

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(f"tcp://*:{port}")
    print(f"broker {broker_id} ready", flush=True)
    while True:
        ident, *frames = sock.recv_multipart()
        reply: object
        try:
            msg = codec.decode(frames)
        except RemoteProtocolError:
            msg = None
        if isinstance(msg, PingRequest):
            reply = PongReply(request_id=msg.request_id, broker_id=broker_id)
        elif isinstance(msg, StatusRequest):
            reply = StatusReply(request_id=msg.request_id, broker_id=broker_id, nodes=(), ring={})
        else:
            reply = ErrorReply(request_id=0, code=int(ErrorCode.BAD_REQUEST))
        sock.send_multipart([ident, *codec.encode(reply)])  # type: ignore[arg-type]


def serve_node(node_id: str, port: int) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(f"tcp://*:{port}")
    print(f"node {node_id} ready", flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def probe(endpoint: str, timeout_ms: int) -> int:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(b"ping")
    ok = bool(sock.poll(timeout_ms)) and sock.recv() == b"ping"
    sock.close(0)
    print("reachable" if ok else "unreachable")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("broker")
    b.add_argument("--broker-id", required=True)
    b.add_argument("--port", type=int, default=5555)
    n = sub.add_parser("node")
    n.add_argument("--node-id", required=True)
    n.add_argument("--port", type=int, default=7100)
    p = sub.add_parser("probe")
    p.add_argument("endpoint")
    p.add_argument("--timeout-ms", type=int, default=1000)
    args = parser.parse_args()
    if args.what == "broker":
        serve_broker(args.broker_id, args.port)
    elif args.what == "node":
        serve_node(args.node_id, args.port)
    else:
        return probe(args.endpoint, args.timeout_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
