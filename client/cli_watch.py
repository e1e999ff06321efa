"""``zkv watch PREFIX``: print events as they commit (``cli.py`` registers it).

One line per event: ``KIND KEY VERSION VALUE`` (a delete or expiry has no value), or a
JSON object per line with ``--json`` (with the resume token). ``--start TOKEN`` resumes
right after the event that carried the token; ``--key`` watches exactly one key;
``--count N`` stops after N events (for scripts). A compacted history exits 1 and
prints the token to restart from (after re-reading the keys). Ctrl-C stops it, after
printing the last token to standard error so a later ``--start`` resumes there.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from zkv.client.sdk import KVClient
from zkv.protocol.watch import WatchCompacted

EXIT_OK = 0
EXIT_NEGATIVE = 1


def add_watch_parser(sub: Any) -> None:
    s = sub.add_parser("watch", help="print puts, deletes and expiries of keys starting "
                       "with PREFIX as they commit")
    s.add_argument("prefix")
    s.add_argument("--start", metavar="TOKEN", default=None,
                   help="resume right after the event that carried this token")
    s.add_argument("--key", action="store_true", help="PREFIX is one exact key")
    s.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")


def _watch(kv: KVClient, args: argparse.Namespace) -> int:
    events = (kv.watch_key(args.prefix, start=args.start) if args.key
              else kv.watch(args.prefix, start=args.start))
    token = args.start or ""
    n = 0
    try:
        for ev in events:
            token = ev.token
            if args.json:
                print(json.dumps({"kind": ev.kind, "key": _text(ev.key),
                                  "value": _text(ev.value), "version": ev.version,
                                  "token": ev.token}), flush=True)
            else:
                value = f" {_text(ev.value)}" if ev.kind == "put" else ""
                print(f"{ev.kind.upper()} {_text(ev.key)} {ev.version}{value}", flush=True)
            n += 1
            if args.count and n >= args.count:
                break
    except WatchCompacted as exc:
        print(f"zkv: error: compacted: {exc}; restart with --start {exc.token}",
              file=sys.stderr)
        return EXIT_NEGATIVE
    except KeyboardInterrupt:
        print(f"last token: {token}", file=sys.stderr)
        raise
    if token:
        print(f"last token: {token}", file=sys.stderr)
    return EXIT_OK


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


WATCH_COMMANDS = {"watch": _watch}
