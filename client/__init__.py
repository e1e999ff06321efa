"""zkv Python SDK: ``KVClient`` (sync), ``AsyncKVClient`` (asyncio), and the errors.

    from zkv.client import KVClient
    with KVClient("tcp://127.0.0.1:5555") as kv:
        version = kv.put("greeting", "hello")
        assert kv.get("greeting") == b"hello"
"""

from zkv.client.aio import AsyncKVClient
from zkv.client.batch import ScanPage
from zkv.client.pipeline import Pipeline
from zkv.client.sdk import ClientClosed, KVClient
from zkv.client.watch import Event
from zkv.protocol.errors import (
    BadRequest,
    DiskFull,
    ErrorCode,
    InternalError,
    KVError,
    LocalProtocolError,
    NoLeader,
    NotLeader,
    PermissionDenied,
    ProtocolError,
    QuotaExceeded,
    RemoteProtocolError,
    RequestError,
    SessionExpired,
    Timeout,
    TooLarge,
    Unavailable,
    UnsupportedVersion,
    WrongShard,
)
from zkv.protocol.messages import Consistency
from zkv.protocol.watch import WatchCompacted

__all__ = [
    "AsyncKVClient",
    "BadRequest",
    "ClientClosed",
    "Consistency",
    "DiskFull",
    "ErrorCode",
    "InternalError",
    "KVClient",
    "KVError",
    "LocalProtocolError",
    "NoLeader",
    "NotLeader",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteProtocolError",
    "RequestError",
    "SessionExpired",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "PermissionDenied",
    "Pipeline",
    "ScanPage",
    "UnsupportedVersion",
    "WrongShard",
    "Event",
    "WatchCompacted",
]
