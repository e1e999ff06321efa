"""``zkv-node``: run one replica of one shard. Flags are documented in docs/internals.md."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from loguru import logger

from zkv.protocol.limits import KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.metrics import serve_metrics
from zkv.protocol.ring import DEFAULT_VNODES, RingConfig
from zkv.protocol.runtime import configure_logging, tune_gc
from zkv.protocol.security import KeyFileError, TrustStore, is_loopback, load_pair
from zkv.protocol.timing import ELECTION_TIMEOUT_MS, HEARTBEAT_MS
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.identity import DEFAULT_CLUSTER_ID
from zkv.storage_node.node import NodeConfig, StorageNode
from zkv.storage_node.snapshot_child import CAN_FORK
from zkv.storage_node.wal_sync import WAL_SYNC_CHOICES, WAL_SYNC_DEFAULT


def _peers(text: str) -> dict[str, str]:
    peers: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, endpoint = item.partition("=")
        if not sep or not name or not endpoint:
            raise argparse.ArgumentTypeError(f"peer {item!r} is not NAME=ENDPOINT")
        peers[name] = endpoint
    return peers


def _endpoints(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (e.strip() for e in text.split(","))))


def _shards(text: str) -> tuple[int, ...]:
    try:
        shards = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad shard list {text!r}") from exc
    if not shards:
        raise argparse.ArgumentTypeError("the ring needs at least one shard")
    return shards


def _fsync(text: str) -> FsyncPolicy:
    try:
        return FsyncPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _heartbeat_port(endpoint: str) -> str:
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + 1}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zkv-node", description=__doc__)
    p.add_argument("--node-id", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--listen", required=True, help="peer ROUTER endpoint to bind")
    p.add_argument("--advertise", default="", help="peer address others use (default: --listen)")
    p.add_argument("--peers", type=_peers, default={}, help="NAME=ENDPOINT,... of the group")
    p.add_argument("--brokers", type=_endpoints, required=True, help="broker backend endpoints")
    p.add_argument("--heartbeat-endpoints", type=_endpoints, default=(),
                   help="broker heartbeat endpoints (default: each broker's port + 1)")
    p.add_argument("--shards", type=_shards, default=None,
                   help="initial ring shard ids, e.g. 0,1 (default: this shard only)")
    p.add_argument("--vnodes", type=int, default=DEFAULT_VNODES)
    p.add_argument("--fsync", type=_fsync, default=FsyncPolicy.parse("always"))
    p.add_argument("--snapshot-entries", type=_positive, default=50_000,
                   help="snapshot (and compact the log) after this many entries")
    p.add_argument("--wal-sync", choices=WAL_SYNC_CHOICES,
                   default=os.environ.get("ZKV_WAL_SYNC") or WAL_SYNC_DEFAULT,
                   help="(env ZKV_WAL_SYNC) with --fsync always, where the WAL's fsync runs: "
                   "aio (default: Linux native AIO, the kernel syncs and signals the loop; "
                   "the thread where that is unavailable) or thread (a helper thread): a "
                   "disk that stalls for a moment stops neither heartbeats nor acks, so it "
                   "costs no election; inline: in the node's loop, for a disk that never "
                   "stalls")
    p.add_argument("--snapshot-mode", choices=("fork", "inline"),
                   default="fork" if CAN_FORK else "inline",
                   help="fork: a forked child writes snapshots, the loop never waits "
                   "(pages written meanwhile are copied: up to 2x the state's memory for "
                   "a few seconds); inline: the loop writes them (stops for ~1 s per "
                   "million keys)")
    p.add_argument("--snapshot-bytes", type=_positive, default=64 * 1024 * 1024,
                   help="... or once the log since the last snapshot holds this many bytes")
    p.add_argument("--max-data-bytes", type=_non_negative, default=0,
                   help="quota: bytes of keys + values this shard may hold (0: unlimited)")
    p.add_argument("--heartbeat-ms", type=int, default=HEARTBEAT_MS)
    p.add_argument("--election-timeout-ms", type=int, default=ELECTION_TIMEOUT_MS)
    p.add_argument("--key-bytes-max", type=int, default=KEY_BYTES_MAX)
    p.add_argument("--value-bytes-max", type=int, default=VALUE_BYTES_MAX)
    p.add_argument("--metrics-port", type=_non_negative, default=None,
                   help="serve Prometheus /metrics on this port (0: any free one; "
                   "default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="interface for /metrics")
    p.add_argument("--bootstrap", action="store_true",
                   help="found a new shard with --peers as its initial configuration; "
                        "counts only on an empty data dir (recorded there)")
    p.add_argument("--force-new-cluster", action="store_true",
                   help="disaster recovery: this node's log becomes the shard, with this "
                        "node as its only voter (its majority is gone for good); once only")
    p.add_argument("--cluster-id", default=DEFAULT_CLUSTER_ID,
                   help="recorded in the data dir; a dir of another cluster is refused")
    p.add_argument("--keys", type=Path, default=os.environ.get("ZKV_KEYS_DIR") or None,
                   help="(env ZKV_KEYS_DIR) a `zkv keys generate` dir: Curve on every socket (this node's pair: "
                   "nodes/<node-id>/; peers and brokers checked against public/)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a plaintext peer port on a non-loopback address")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    if args.wal_sync not in WAL_SYNC_CHOICES:
        logger.error("--wal-sync (or ZKV_WAL_SYNC) must be one of {}, not {!r}",
                     ", ".join(WAL_SYNC_CHOICES), args.wal_sync)
        return 2
    if args.election_timeout_ms < 3 * args.heartbeat_ms:
        logger.error("--election-timeout-ms must be at least 3 x --heartbeat-ms")
        return 2
    config = NodeConfig(
        node_id=args.node_id,
        shard_id=args.shard,
        data_dir=args.data_dir,
        listen=args.listen,
        advertise=args.advertise or args.listen,
        peers={k: v for k, v in args.peers.items() if k != args.node_id},
        brokers=args.brokers,
        heartbeat_endpoints=args.heartbeat_endpoints or tuple(map(_heartbeat_port, args.brokers)),
        ring=RingConfig(1, args.shards or (args.shard,), args.vnodes),
        fsync=args.fsync,
        snapshot_entries=args.snapshot_entries,
        background_snapshots=args.snapshot_mode == "fork",
        wal_sync=args.wal_sync,
        snapshot_bytes=args.snapshot_bytes,
        max_data_bytes=args.max_data_bytes,
        heartbeat_ms=args.heartbeat_ms,
        election_timeout_ms=args.election_timeout_ms,
        key_bytes_max=args.key_bytes_max,
        value_bytes_max=args.value_bytes_max,
        cluster_id=args.cluster_id,
        bootstrap=args.bootstrap,
        force_new_cluster=args.force_new_cluster,
        keys_dir=args.keys,
    )
    if args.keys is None and not is_loopback(args.listen) and not args.insecure:
        logger.error("refusing to bind {} without keys: anyone who can reach it could vote "
                     "and write as a member. Give --keys DIR (zkv keys generate), or "
                     "--insecure to run plaintext anyway", args.listen)
        return 2
    try:
        if args.keys is not None:  # check the key files now, not at the first socket
            TrustStore(args.keys)
            load_pair(args.keys / "nodes" / args.node_id)
        node = StorageNode(config)
    except KeyFileError as exc:
        logger.error("refusing to start: {}", exc)
        return 2
    except RuntimeError as exc:  # corrupt WAL or state, state lost: refuse, say why
        logger.error("refusing to start: {}", exc)
        return 3
    except OSError as exc:  # e.g. no space for the first ring file: say so, no traceback
        logger.error("cannot start: {}", exc)
        return 4
    if args.metrics_port is not None:
        node.node.stats.collector = serve_metrics(args.metrics_host, args.metrics_port,
                                             f"node {args.node_id}")
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    signal.signal(signal.SIGINT, lambda *_: node.stop())
    tune_gc()
    node.run()
    logger.info("node {} stopped", args.node_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
