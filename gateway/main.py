"""``zkv gateway``: run the HTTP gateway under uvicorn.

Each worker is a process with its own ``AsyncKVClient`` (``app.app_from_env``), so the
settings travel through the environment: ``ZKV_ENDPOINT``, ``ZKV_GATEWAY_TIMEOUT_S``,
``ZKV_GATEWAY_METRICS``, ``ZKV_GATEWAY_GET_BATCH_MAX``, ``ZKV_GATEWAY_TOKENS``, ``ZKV_GATEWAY_KEYS``. The global
``--timeout`` is the cluster deadline per HTTP request. With ``--workers`` > 1,
prometheus_client's multiprocess mode gets a fresh directory
(``PROMETHEUS_MULTIPROC_DIR``) for the life of the gateway.

Security (``check_security``, before anything starts): ``--tokens FILE`` turns bearer
tokens on (``auth.py``, ``tokens.py``); ``--tls-cert``/``--tls-key`` are handed to
uvicorn (``ssl_certfile``/``ssl_keyfile``); the global ``--keys DIR`` is the Curve
identity the gateway presents to the brokers. Listening on a non-loopback address
without tokens is refused unless ``--insecure``: anyone who reaches the port could read
and write every key. Every file is checked here, in the parent, so a mistake is one
clear line and exit 2, not a traceback per worker.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from zkv.gateway.get_batcher import MAX_BATCH
from zkv.protocol.limits import MULTI_KEYS_MAX

EXIT_USAGE = 2
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
    p.add_argument("--get-batch-max", type=int, default=MAX_BATCH, metavar="N",
                   help=f"GETs arriving in one event-loop turn go to the cluster as one "
                   f"batch of at most N keys (default {MAX_BATCH}; 1: each GET alone)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.add_argument("--tokens", type=Path, default=os.environ.get("ZKV_GATEWAY_TOKENS") or None,
                   help="(env ZKV_GATEWAY_TOKENS) bearer tokens file, lines '<role> <token>' "
                   "(roles client, admin, metrics; mode 0600); without it nothing is checked")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="serve HTTPS with this certificate (PEM, chain included)")
    p.add_argument("--tls-key", type=Path, default=None,
                   help="the certificate's private key (PEM, mode 0600)")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without --tokens")
    p.epilog = ("Its own Curve key toward a secure cluster's brokers is the global --keys: "
                "zkv --keys DIR/gateway gateway ... (env ZKV_KEYS).")


def check_security(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(why the gateway must not start, or None; warnings to print). Loads the tokens
    file and the Curve pair once here so a bad one stops the gateway with its reason."""
    from zkv.gateway.auth import describe, is_loopback_host
    from zkv.gateway.tokens import TokenFileError, check_permissions, load

    warnings: list[str] = []
    local = is_loopback_host(args.host)
    if args.tokens is None and not local and not args.insecure:
        return (f"refusing to listen on {args.host} (not a loopback address) without bearer "
                "tokens: anyone who reaches the port could read and write every key. Give "
                "--tokens FILE (and --tls-cert/--tls-key), or --insecure to serve it open "
                "anyway"), warnings
    if args.tokens is not None:
        try:
            table = load(args.tokens)
        except TokenFileError as exc:
            return str(exc), warnings
        warnings.append(f"bearer tokens from {args.tokens}: {describe(table)}")
        if not local and args.tls_cert is None:
            warnings.append(f"tokens on {args.host} without --tls-cert travel in plaintext: "
                            "terminate TLS here or in front of the gateway")
    elif args.insecure and not local:
        warnings.append(f"--insecure: serving {args.host} with no bearer tokens: anyone who "
                        "reaches the port may read and write every key")
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together", warnings
    if args.tls_key is not None:
        for path in (args.tls_cert, args.tls_key):
            if not Path(path).is_file():
                return f"TLS file {path} not found", warnings
        try:
            check_permissions(args.tls_key)
        except TokenFileError as exc:
            return str(exc).replace("the tokens file", "the TLS key"), warnings
    if args.keys_dir is not None:
        from zkv.protocol.errors import KVError
        from zkv.protocol.security import Curve

        try:
            Curve.for_identity(Path(args.keys_dir))
        except KVError as exc:
            return f"the gateway's Curve key: {exc}", warnings
    return None, warnings


def run_cli(args: argparse.Namespace, endpoint: str) -> int:
    missing = http_available()
    if missing is not None:
        print(f"zkv: error: the gateway needs the http extra: {missing}", file=sys.stderr)
        return 1
    if args.workers < 1:
        print("zkv: error: --workers must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.get_batch_max <= MULTI_KEYS_MAX:
        print(f"zkv: error: --get-batch-max must be 1..{MULTI_KEYS_MAX}", file=sys.stderr)
        return EXIT_USAGE
    why, warnings = check_security(args)
    if why is not None:
        print(f"zkv gateway: error: {why}", file=sys.stderr)
        return EXIT_USAGE
    for line in warnings:
        print(f"zkv gateway: {line}", file=sys.stderr, flush=True)
    import uvicorn

    os.environ["ZKV_ENDPOINT"] = endpoint
    os.environ["ZKV_GATEWAY_TIMEOUT_S"] = str(args.timeout)
    os.environ["ZKV_GATEWAY_METRICS"] = "0" if args.no_metrics else "1"
    os.environ["ZKV_GATEWAY_GET_BATCH_MAX"] = str(args.get_batch_max)
    for name, value in (("ZKV_GATEWAY_TOKENS", args.tokens), ("ZKV_GATEWAY_KEYS", args.keys_dir)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(Path(value).absolute())
    tls: dict[str, str] = {}
    if args.tls_cert is not None:
        tls = {"ssl_certfile": str(args.tls_cert), "ssl_keyfile": str(args.tls_key)}
    prom_dir = None
    if args.workers > 1:
        prom_dir = tempfile.mkdtemp(prefix="zkv-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    scheme = "https" if tls else "http"
    print(f"zkv gateway: {scheme}://{args.host}:{args.port} -> {endpoint} "
          f"({args.workers} worker(s))", file=sys.stderr, flush=True)
    try:
        # The protocol answers /kv requests itself (gateway/protocol.py); given by name
        # so each worker imports it.
        uvicorn.run("zkv.gateway.app:app_from_env", factory=True, host=args.host,
                    port=args.port, workers=args.workers, log_level=args.log_level.lower(),
                    access_log=False, timeout_graceful_shutdown=3, http=HTTP_PROTOCOL,
                    **tls)  # type: ignore[arg-type]
    finally:
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0
