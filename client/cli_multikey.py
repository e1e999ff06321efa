"""``zkv mget``, ``zkv mset``, ``zkv mdel`` and ``zkv scan`` (the CLI's batch and scan verbs).

Output is one line per key, ``KEY<TAB>VALUE`` (``(nil)`` for a missing key); a key or
value that is not UTF-8 is printed with backslash escapes so every line stays one line.
``mget`` exits 1 when a key is missing, like ``get``; ``mset`` and ``mdel`` print each
key's outcome and exit 0. A batch is atomic per shard only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from zkv.client.batch import SCAN_PAGE_DEFAULT
from zkv.client.sdk import KVClient
from zkv.protocol.limits import SCAN_LIMIT_MAX
from zkv.protocol.messages import Consistency

EXIT_OK = 0
EXIT_NEGATIVE = 1
_CONSISTENCY = ["linearizable", "leader", "stale"]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def add_arguments(sub: Any) -> None:
    s = sub.add_parser("mget", help="print the values of several keys in one round trip "
                       "per shard (exit 1 if one is missing)")
    s.add_argument("keys", nargs="+", metavar="KEY")
    s.add_argument("--consistency", choices=_CONSISTENCY, default="linearizable")

    s = sub.add_parser("mset", help="write several keys, one log entry per shard "
                       "(atomic per shard only)")
    s.add_argument("pairs", nargs="+", metavar="KEY VALUE")

    s = sub.add_parser("mdel", help="remove several keys (atomic per shard only)")
    s.add_argument("keys", nargs="+", metavar="KEY")

    s = sub.add_parser("scan", help="list the keys under a prefix, in key order, across "
                       "every shard")
    s.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    s.add_argument("--keys-only", action="store_true", help="print the keys alone")
    s.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="print at most N keys (default: all)")
    s.add_argument("--consistency", choices=_CONSISTENCY, default="linearizable")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\t", "\\t")


def _mget(kv: KVClient, args: argparse.Namespace) -> int:
    found = kv.mget(args.keys, consistency=Consistency[args.consistency.upper()])
    missing = 0
    for key in args.keys:
        value = found[key]
        missing += value is None
        print(f"{key}\t{'(nil)' if value is None else _text(value)}")
    return EXIT_NEGATIVE if missing else EXIT_OK


def _mset(kv: KVClient, args: argparse.Namespace) -> int:
    if len(args.pairs) % 2:
        raise ValueError("mset needs KEY VALUE pairs")
    mapping = dict(zip(args.pairs[0::2], args.pairs[1::2], strict=True))
    for key, version in kv.mset(mapping).items():  # keys as given: str
        print(f"{key!s}\tOK version {version}")
    return EXIT_OK


def _mdel(kv: KVClient, args: argparse.Namespace) -> int:
    for key, existed in kv.mdelete(args.keys).items():  # keys as given: str
        print(f"{key!s}\t{'deleted' if existed else '(not found)'}")
    return EXIT_OK


def _scan(kv: KVClient, args: argparse.Namespace) -> int:
    left = args.limit
    page_size = SCAN_PAGE_DEFAULT if left is None else min(left, SCAN_LIMIT_MAX)
    out = sys.stdout
    for key, value in kv.scan_iter(args.prefix, page_size=page_size, keys_only=args.keys_only,
                                   consistency=Consistency[args.consistency.upper()]):
        out.write(f"{_text(key)}\n" if args.keys_only else f"{_text(key)}\t{_text(value)}\n")
        if left is not None:
            left -= 1
            if left == 0:
                break
    out.flush()
    return EXIT_OK


COMMANDS = {"mget": _mget, "mset": _mset, "mdel": _mdel, "scan": _scan}
