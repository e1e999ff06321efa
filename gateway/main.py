"""``zkv gateway``: run the HTTP gateway under uvicorn.

Each worker is a process with its own ``AsyncKVClient`` (``app.app_from_env``), so the
settings travel through the environment: ``ZKV_ENDPOINT``, ``ZKV_GATEWAY_TIMEOUT_S``,
``ZKV_GATEWAY_METRICS``, and ``ZKV_KEYS`` (the global ``--keys``: the client identity
the gateway presents to a secure cluster; without it, it would speak plaintext to Curve
brokers, which drop the connection, and every request would time out). The global
``--timeout`` is the cluster deadline per HTTP request. With ``--workers`` > 1,
prometheus_client's multiprocess mode gets a fresh directory
(``PROMETHEUS_MULTIPROC_DIR``) for the life of the gateway.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
HTTP_PROTOCOL = "zkv.gateway.protocol:KVHttpProtocol"


def http_available() -> str | None:
    """None when the ``http`` extra is installed, else what is missing. Found, not
    imported: importing FastAPI builds its models (a second or more on a busy machine),
    which the supervisor that asks does not need."""
    for name in ("fastapi", "fastapi_offline", "prometheus_client", "uvicorn"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install 'zkv[http]')"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on "
                   f"(default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--no-metrics", action="store_true",
                   help="do not count requests (to measure what counting costs)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")


def run_cli(args: argparse.Namespace, endpoint: str) -> int:
    missing = http_available()
    if missing is not None:
        print(f"zkv: error: the gateway needs the http extra: {missing}", file=sys.stderr)
        return 1
    if args.workers < 1:
        print("zkv: error: --workers must be >= 1", file=sys.stderr)
        return 2
    import uvicorn

    os.environ["ZKV_ENDPOINT"] = endpoint
    os.environ["ZKV_GATEWAY_TIMEOUT_S"] = str(args.timeout)
    os.environ["ZKV_GATEWAY_METRICS"] = "0" if args.no_metrics else "1"
    keys = getattr(args, "keys_dir", None)
    if keys:
        os.environ["ZKV_KEYS"] = str(keys)
    else:
        os.environ.pop("ZKV_KEYS", None)
    prom_dir = None
    if args.workers > 1:
        prom_dir = tempfile.mkdtemp(prefix="zkv-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    print(f"zkv gateway: http://{args.host}:{args.port} -> {endpoint} "
          f"({args.workers} worker(s))", file=sys.stderr, flush=True)
    try:
        # The protocol answers /kv requests itself (gateway/protocol.py); given by name
        # so each worker imports it.
        uvicorn.run("zkv.gateway.app:app_from_env", factory=True, host=args.host,
                    port=args.port, workers=args.workers, log_level=args.log_level.lower(),
                    access_log=False, timeout_graceful_shutdown=3, http=HTTP_PROTOCOL)
    finally:
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0
