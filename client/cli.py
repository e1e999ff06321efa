"""The ``zkv`` command line: data operations, status, bench and the local cluster.

Exit codes: 0 success; 1 a negative answer (key missing, CAS not swapped) or an error
answered by the cluster; 2 usage; 3 timeout (no answer: for a write the outcome is
unknown); 130 interrupted. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import zmq

from zkv.client import cli_multikey
from zkv.client.cli_ttl import TTL_COMMANDS, add_ttl_parsers, seconds
from zkv.client.cli_watch import WATCH_COMMANDS, add_watch_parser
from zkv.client.sdk import DEFAULT_ENDPOINT, KVClient
from zkv.client.status_view import annotate_status, format_status, role_name
from zkv.protocol.errors import KVError, PermissionDenied, RequestError, Timeout
from zkv.protocol.messages import Consistency

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130
#: A failpoint, as etcd's gofail: with ``ZKV_FAILPOINT_ADMIN_EXIT`` set to a progress line's
#: beginning, ``zkv admin`` exits with ``EXIT_FAILPOINT`` right after printing that line,
#: without cleanup, as a coordinator SIGKILLed at that exact step would. Tests use it
#: (``zkv admin resume`` must finish the change); a signal sent on seeing the line races
#: the coordinator, which may finish a small change first.
FAILPOINT_ADMIN_EXIT = "ZKV_FAILPOINT_ADMIN_EXIT"
EXIT_FAILPOINT = 137


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like argparse but terser
        self.print_usage(sys.stderr)
        print(f"zkv: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zkv", description="zkv: a sharded, replicated key-value store.")
    p.add_argument("--endpoint", default=os.environ.get("ZKV_ENDPOINT") or DEFAULT_ENDPOINT,
                   help="broker endpoint(s), comma-separated (env ZKV_ENDPOINT)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per command")
    p.add_argument("--keys", dest="keys_dir", default=os.environ.get("ZKV_KEYS") or None,
                   help="Curve identity dir (a client/ or admin/ dir of `zkv keys generate`; "
                   "env ZKV_KEYS); before the command: `bench --keys` is its key count")
    # The global options are accepted after the subcommand too (`zkv get k --timeout 1`).
    common = _Parser(add_help=False)
    common.add_argument("--endpoint", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> _Parser:
        return add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    s = sub.add_parser("put", help="store a value")
    s.add_argument("key")
    s.add_argument("value", help="the value; - reads it from standard input (as bytes)")
    s.add_argument("--ttl", type=seconds, default=None, metavar="SECONDS",
                   help="the key expires SECONDS after the put")

    s = sub.add_parser("get", help="print a value (exit 1 if missing)")
    s.add_argument("key")
    s.add_argument("--consistency", choices=["linearizable", "leader", "stale"],
                   default="linearizable")
    s.add_argument("--show-version", action="store_true", help="print the version too")

    s = sub.add_parser("delete", help="remove a key")
    s.add_argument("key")
    s.add_argument("--if-version", type=int, default=None, metavar="N",
                   help="only if the key's version is N (atomic; exit 1 when it is not)")

    s = sub.add_parser("cas", help="write only if the version matches (0: key absent)")
    s.add_argument("key")
    s.add_argument("expected_version", type=int)
    s.add_argument("value")

    cli_multikey.add_arguments(sub)  # mget, mset, mdel, scan
    add_ttl_parsers(sub)
    add_watch_parser(sub)

    s = sub.add_parser("status", help="cluster status per shard and node")
    s.add_argument("--json", action="store_true")

    sub.add_parser("ping", help="round trip to the broker")

    from zkv.ops import bench

    s = sub.add_parser("bench", help="pipelined load generator")
    bench.add_arguments(s)

    s = sub.add_parser("admin", help="ring and membership changes, online")
    asub = s.add_subparsers(dest="admin_command", required=True, parser_class=_Parser)
    a = asub.add_parser("add-shard", parents=[common],
                        help="add a shard group and move its share of the keys to it")
    a.add_argument("--data-dir", help="the `zkv cluster up` data dir: its supervisor "
                   "starts the new shard's nodes")
    a.add_argument("--shard-id", type=int, help="instead: the id of a shard group you "
                   "already started (not yet in the ring)")
    a = asub.add_parser("remove-shard", parents=[common],
                        help="move a shard's keys to the others, then retire it")
    a.add_argument("shard_id", type=int)
    a.add_argument("--data-dir", help="the `zkv cluster up` data dir: its supervisor "
                   "stops the shard's nodes afterwards")
    a = asub.add_parser("resume", parents=[common],
                        help="finish a ring change whose coordinator died")
    ring_parsers = list(asub.choices.values())
    from zkv.ops import membership

    membership.add_arguments(asub, common)
    a = asub.add_parser("snapshot", parents=[common],
                        help="save a snapshot of every shard (restore: zkv cluster restore)")
    a.add_argument("action", choices=["save"])
    a.add_argument("dir", metavar="DIR")
    for a in ring_parsers:
        a.add_argument("--max-rate", type=_non_negative, default=0.0, metavar="MB/S",
                       help="bound the key streams to this many MB/s in all, so live "
                       "traffic keeps more of the CPU (default: 0, no bound)")

    from zkv.gateway import main as gateway

    gateway.add_arguments(sub.add_parser("gateway", help="HTTP gateway: REST API, /ui, "
                                         "/metrics (needs zkv[http])"))

    from zkv.ops import cluster_cli, keys

    s = sub.add_parser("keys", help="Curve key pairs for a secure cluster")
    ksub = s.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    keys.add_arguments(ksub.add_parser("generate", help="write every identity's key pair"))
    keys.add_rotate_arguments(ksub.add_parser(
        "rotate", help="replace a storage node's key pair (then restart that node)"))

    s = sub.add_parser("cluster", help="run a local cluster")
    csub = s.add_subparsers(dest="cluster_command", required=True, parser_class=_Parser)
    cluster_cli.add_arguments(csub.add_parser("up", help="start (or restart) a local cluster"))
    from zkv.ops import backup

    backup.add_restore_arguments(csub.add_parser(
        "restore", help="build a new cluster's data dirs from `zkv admin snapshot save`"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except Timeout as exc:
        _fail(f"timeout: {exc}")
        return EXIT_TIMEOUT
    except PermissionDenied as exc:
        _fail(f"PERMISSION_DENIED: {exc.message} (use an admin key: zkv --keys DIR/admin)")
        return EXIT_NEGATIVE
    except RequestError as exc:
        _fail(f"{exc.code.name}: {exc.message or exc.code.name}")
        return EXIT_NEGATIVE
    except KVError as exc:
        _fail(str(exc))
        return EXIT_NEGATIVE
    except (ValueError, TypeError, OSError, zmq.ZMQError) as exc:
        _fail(str(exc))
        return EXIT_NEGATIVE
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED


def _fail(message: str) -> None:
    print(f"zkv: error: {message}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        from zkv.ops import bench

        return bench.run_cli(args, args.endpoint)
    if args.command == "cluster":
        from zkv.ops import backup, cluster_cli

        if args.cluster_command == "restore":
            return backup.run_restore(args)
        return cluster_cli.run_cli(args)
    if args.command == "keys":
        from zkv.ops import keys

        if args.keys_command == "rotate":
            return keys.run_rotate_cli(args)
        return keys.run_cli(args)
    if args.command == "admin":
        return _admin(args)
    if args.command == "gateway":
        from zkv.gateway import main as gateway

        return gateway.run_cli(args, args.endpoint)
    with KVClient(args.endpoint, timeout_s=args.timeout, keys=args.keys_dir) as kv:
        return _COMMANDS[args.command](kv, args)


def _put(kv: KVClient, args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read() if args.value == "-" else args.value
    if args.ttl is not None:
        print(f"OK version {kv.put(args.key, value, ttl=args.ttl)}")
        return EXIT_OK
    print(f"OK version {kv.put(args.key, value)}")
    return EXIT_OK


def _get(kv: KVClient, args: argparse.Namespace) -> int:
    found = kv.get_versioned(args.key, consistency=Consistency[args.consistency.upper()])
    if found is None:
        print("(nil)", file=sys.stderr)
        return EXIT_NEGATIVE
    value, version = found
    _print_value(value)
    if args.show_version:
        print(f"version {version}")
    return EXIT_OK


def _print_value(value: bytes) -> None:
    try:
        print(value.decode("utf-8"))
    except UnicodeDecodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(value + b"\n")
        sys.stdout.buffer.flush()


def _delete(kv: KVClient, args: argparse.Namespace) -> int:
    deleted, version = kv.delete_versioned(args.key, expected_version=args.if_version)
    if not deleted and version:  # only a conditional delete leaves a key behind
        print(f"not deleted: current version {version}, expected {args.if_version}",
              file=sys.stderr)
        return EXIT_NEGATIVE
    # Deleting an absent key is not a failure: the key is absent either way.
    print("deleted" if deleted else "(not found)")
    return EXIT_OK


def _cas(kv: KVClient, args: argparse.Namespace) -> int:
    swapped, version = kv.cas_versioned(args.key, args.expected_version, args.value)
    if swapped:
        print(f"OK version {version}")
        return EXIT_OK
    print(f"not swapped: current version {version}, expected {args.expected_version}",
          file=sys.stderr)
    return EXIT_NEGATIVE


def _ping(kv: KVClient, args: argparse.Namespace) -> int:
    print(f"pong from {kv.ping()} at {kv.endpoint}")
    return EXIT_OK


def _admin(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zkv.ops import cluster
    from zkv.ops.rebalance import Rebalancer

    exit_after = os.environ.get(FAILPOINT_ADMIN_EXIT, "")

    def say(line: str) -> None:
        print(f"zkv admin: {line}", file=sys.stderr, flush=True)
        if exit_after and line.startswith(exit_after):
            os._exit(EXIT_FAILPOINT)  # no cleanup, as if SIGKILLed at this very step

    with KVClient(args.endpoint, timeout_s=max(args.timeout, 30.0), keys=args.keys_dir) as kv:
        if args.admin_command == "snapshot":
            from zkv.ops import backup

            backup.save(kv, Path(args.dir), say)
            say(f"saved to {args.dir}")
            return EXIT_OK
        if args.admin_command not in ("add-shard", "remove-shard", "resume"):
            from zkv.ops import membership

            return membership.run(kv, args, say)
        r = Rebalancer(kv, say, rate_bytes_s=int(args.max_rate * 1e6))
        if args.admin_command == "resume":
            r.resume()
            return EXIT_OK
        if args.admin_command == "remove-shard":
            r.remove_shard(args.shard_id)
            if args.data_dir:
                cluster.spec_remove_shard(Path(args.data_dir), args.shard_id)
                say(f"shard {args.shard_id} removed from {args.data_dir}; the supervisor "
                    "stops its nodes")
            return EXIT_OK
        if (args.data_dir is None) == (args.shard_id is None):
            raise ValueError("add-shard needs --data-dir (a `zkv cluster up` dir) or "
                             "--shard-id (a shard group you started)")
        shard = args.shard_id
        if args.data_dir:
            r.current_ring()  # refuse early if there is no cluster to add to
            if r.pending() is not None:
                raise ValueError("a ring change is unfinished: run `zkv admin resume` first")
            shard = cluster.spec_add_shard(Path(args.data_dir))
            say(f"shard {shard} added to {args.data_dir}; waiting for its leader")
        _wait_leader(kv, shard, 60.0)
        r.add_shard(shard)
        return EXIT_OK


def _wait_leader(kv: KVClient, shard: int, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = kv.status()["nodes"]
        if any(n["shard_id"] == shard and role_name(n["role"]) == "leader" and n["live"]
               for n in nodes):
            return
        time.sleep(0.2)
    raise ValueError(f"shard {shard} has no leader after {timeout_s:g}s (is it running?)")


def _status(kv: KVClient, args: argparse.Namespace) -> int:
    status = annotate_status(kv.status())
    if args.json:
        print(json.dumps(status, default=_json_default, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


_COMMANDS = {"put": _put, "get": _get, "delete": _delete, "cas": _cas, "ping": _ping,
             "status": _status, **TTL_COMMANDS, **WATCH_COMMANDS}
_COMMANDS.update(cli_multikey.COMMANDS)


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
