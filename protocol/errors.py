"""Error codes and the one exception tree of zkv.

Every exception zkv raises derives from ``KVError``::

    KVError
    ├── ProtocolError              bytes that are not a valid zkv message
    │   ├── LocalProtocolError     we tried to encode something invalid (our bug)
    │   └── RemoteProtocolError    a peer sent something invalid (their bad input)
    ├── RequestError               the cluster answered with an error code
    │   ├── BadRequest             BAD_REQUEST: malformed request
    │   ├── TooLarge               TOO_LARGE: key or value over its limit
    │   ├── NotLeader              NOT_LEADER: this replica does not lead (leader_hint)
    │   ├── NoLeader               NO_LEADER: the shard has no known leader right now
    │   ├── WrongShard             WRONG_SHARD: the key is not owned here at this epoch
    │   ├── Unavailable            UNAVAILABLE: no quorum / node cannot serve now
    │   ├── SessionExpired         SESSION_EXPIRED: retry of a forgotten write
    │   ├── UnsupportedVersion     UNSUPPORTED_VERSION: protocol version mismatch
    │   ├── InternalError          INTERNAL: a bug on the server side
    │   ├── QuotaExceeded          QUOTA_EXCEEDED: the write would put the shard over its
    │   │                          data quota (--max-data-bytes); deletes and reads work
    │   ├── DiskFull               DISK_FULL: the leader cannot write its log (no space);
    │   │                          it resumes by itself once space returns
    │   └── PermissionDenied       PERMISSION_DENIED: the key's role may not do this
    ├── Timeout                    no answer within the caller's deadline (outcome unknown)
    ├── WatchCompacted             (watch.py) a watch token older than the kept history
    └── KeyFileError               (security.py) a Curve key file missing, bad or too open

Operating errors travel on the wire as an ``ErrorCode``; the SDK maps a code to its
exception with ``error_for_code`` (one table, below), so codes and classes never drift.
A ``Timeout`` on a write means *unknown outcome*: the write may or may not have applied.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by ``ErrorReply``. Values are wire format: never renumber."""

    BAD_REQUEST = 1
    TOO_LARGE = 2
    NOT_LEADER = 3
    NO_LEADER = 4
    WRONG_SHARD = 5
    UNAVAILABLE = 6
    SESSION_EXPIRED = 7
    UNSUPPORTED_VERSION = 8
    INTERNAL = 9
    TIMEOUT = 10
    QUOTA_EXCEEDED = 11
    DISK_FULL = 12
    PERMISSION_DENIED = 13


class KVError(Exception):
    """Root of every zkv exception."""


class ProtocolError(KVError):
    """Bytes that do not form a valid message of this protocol version."""


class LocalProtocolError(ProtocolError):
    """We built an invalid message: a bug on our side, never caused by a peer."""


class RemoteProtocolError(ProtocolError):
    """A peer sent bytes that do not decode: log, answer BAD_REQUEST or drop, never crash."""


class RequestError(KVError):
    """The cluster answered a request with an error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", leader_hint: str = "", epoch: int = 0) -> None:
        super().__init__(message or self.code.name)
        self.message = message
        self.leader_hint = leader_hint
        self.epoch = epoch


class BadRequest(RequestError):
    code = ErrorCode.BAD_REQUEST


class TooLarge(RequestError):
    code = ErrorCode.TOO_LARGE


class NotLeader(RequestError):
    code = ErrorCode.NOT_LEADER


class NoLeader(RequestError):
    code = ErrorCode.NO_LEADER


class WrongShard(RequestError):
    code = ErrorCode.WRONG_SHARD


class Unavailable(RequestError):
    code = ErrorCode.UNAVAILABLE


class SessionExpired(RequestError):
    code = ErrorCode.SESSION_EXPIRED


class UnsupportedVersion(RequestError):
    code = ErrorCode.UNSUPPORTED_VERSION


class PermissionDenied(RequestError):
    code = ErrorCode.PERMISSION_DENIED


class InternalError(RequestError):
    code = ErrorCode.INTERNAL


class QuotaExceeded(RequestError):
    code = ErrorCode.QUOTA_EXCEEDED


class DiskFull(RequestError):
    code = ErrorCode.DISK_FULL


class Timeout(KVError):
    """No reply within the deadline. For a write, the outcome is unknown."""


_ERROR_TYPES: dict[ErrorCode, type[RequestError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        TooLarge,
        NotLeader,
        NoLeader,
        WrongShard,
        Unavailable,
        SessionExpired,
        UnsupportedVersion,
        PermissionDenied,
        InternalError,
        QuotaExceeded,
        DiskFull,
    )
}

#: Codes after which a client may safely retry the same request elsewhere or later.
RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {ErrorCode.NOT_LEADER, ErrorCode.NO_LEADER, ErrorCode.WRONG_SHARD, ErrorCode.UNAVAILABLE,
     ErrorCode.TIMEOUT}
)


def error_for_code(
    code: ErrorCode | int, message: str = "", leader_hint: str = "", epoch: int = 0
) -> KVError:
    """Build the exception for a wire error code (unknown codes become InternalError)."""
    if code == ErrorCode.TIMEOUT:
        return Timeout(message or "the server timed out")
    try:
        cls = _ERROR_TYPES[ErrorCode(code)]
    except ValueError:
        return InternalError(f"unknown error code {code}: {message}")
    return cls(message, leader_hint, epoch)
