"""``zkv expire``, ``zkv persist``, ``zkv ttl`` and ``zkv put --ttl``: the CLI's TTL
commands (``cli.py`` registers them; exit codes as there: 1 for a missing key)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from zkv.client.sdk import KVClient
from zkv.protocol.messages import Consistency

EXIT_OK = 0
EXIT_NEGATIVE = 1


def seconds(text: str) -> float:
    """A TTL argument: seconds > 0 (fractions allowed)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return v


def add_ttl_parsers(sub: Any) -> None:
    s = sub.add_parser("expire", help="make a key expire in SECONDS (exit 1 if missing)")
    s.add_argument("key")
    s.add_argument("seconds", type=seconds)
    s = sub.add_parser("persist", help="remove a key's expiry (exit 1 if missing)")
    s.add_argument("key")
    s = sub.add_parser("ttl", help="seconds a key has left, or 'none' (exit 1 if missing)")
    s.add_argument("key")
    s.add_argument("--consistency", choices=["linearizable", "leader", "stale"],
                   default="linearizable")


def _expire(kv: KVClient, args: argparse.Namespace) -> int:
    if kv.expire(args.key, args.seconds):
        print(f"OK expires in {args.seconds:g}s")
        return EXIT_OK
    print("(not found)", file=sys.stderr)
    return EXIT_NEGATIVE


def _persist(kv: KVClient, args: argparse.Namespace) -> int:
    if kv.persist(args.key):
        print("OK no expiry")
        return EXIT_OK
    print("(not found)", file=sys.stderr)
    return EXIT_NEGATIVE


def _ttl(kv: KVClient, args: argparse.Namespace) -> int:
    left = kv.ttl(args.key, consistency=Consistency[args.consistency.upper()])
    if left is None:
        print("(nil)", file=sys.stderr)
        return EXIT_NEGATIVE
    print("none" if left == math.inf else f"{left:.3f}")
    return EXIT_OK


TTL_COMMANDS = {"expire": _expire, "persist": _persist, "ttl": _ttl}
