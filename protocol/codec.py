"""msgpack codec for ``zkv.protocol.messages``.

``encode(msg) -> list[bytes]`` and ``decode(frames) -> message``. Frame 0 is a msgpack
array ``[VERSION, TYPE, *fields]``: VERSION is 1 when the previous release reads the
message the same way, else ``PROTOCOL_VERSION`` (``compat.py``: rolling upgrades).
A message class with a ``BLOB`` field (a
value, a snapshot chunk) sends a large blob as frame 1, so it is never copied through
msgpack, and a small one (<= ``INLINE_BLOB_BYTES_MAX``) as the header's last element:
one frame fewer to send and receive at every hop, which is most of the per-message cost
in pyzmq. ``decode`` accepts either form.

Rule: ``decode`` of *any* input either returns a valid message or raises
``RemoteProtocolError``; nothing else escapes (a hypothesis test holds us to it).
Field checks are compiled once per class from its type hints, so a field of the wrong
type is refused at the boundary and the cores can trust what they receive. Besides
scalars, enums and tuples, a field may be a ``RingConfig`` (``RingConfig.to_wire``,
checked by ``RingConfig.from_wire``), a record (a frozen dataclass without ``TYPE``,
sent as the array of its fields, checked field by field the same way) or ``X | None``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import Any

import msgpack

from zkv.protocol.compat import LEGACY_VERSION, TRANSLATED, V1_FIELD_COUNTS, FromV1, ToV1
from zkv.protocol.errors import LocalProtocolError, RemoteProtocolError
from zkv.protocol.limits import (
    HEADER_ARRAY_LEN_MAX,
    HEADER_BYTES_MAX,
    HEADER_MAP_LEN_MAX,
    HEADER_STR_BYTES_MAX,
    INLINE_BLOB_BYTES_MAX,
    INT_MAX,
)
from zkv.protocol.messages import (
    ADMIN_REQUEST_TYPES,
    ALL_MESSAGE_TYPES,
    DATA_REQUEST_TYPES,
    PROTOCOL_VERSION,
    Entry,
    GetRequest,
    Message,
)
from zkv.protocol.ring import RingConfig
from zkv.protocol.watch import WatchRequest

__all__ = [
    "HEADER_BYTES_MAX", "INLINE_BLOB_BYTES_MAX", "INT_MAX", "admin_shard", "decode", "encode",
    "request_id_of", "route_fields",
]

#: Bounds on what a single header may contain, so a hostile frame cannot make us
#: allocate without limit while decoding (values travel in the BLOB frame).
_UNPACK_LIMITS = dict(
    max_bin_len=HEADER_BYTES_MAX,
    max_str_len=HEADER_STR_BYTES_MAX,
    max_array_len=HEADER_ARRAY_LEN_MAX,
    max_map_len=HEADER_MAP_LEN_MAX,
    max_ext_len=0,
)

#: Requests the broker routes by the shard id at header position 4 (``admin_shard``).
SHARD_ROUTED_TYPES = ADMIN_REQUEST_TYPES | {WatchRequest.TYPE}

_unpack = functools.partial(msgpack.unpackb, raw=False, strict_map_key=True, **_UNPACK_LIMITS)

Check = Callable[[Any], Any]



def _check_int(v: Any) -> int:
    if type(v) is not int:
        raise RemoteProtocolError(f"expected int, got {type(v).__name__}")
    if not 0 <= v <= INT_MAX:
        raise RemoteProtocolError(f"integer {v} out of range")
    return v


def _check_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise RemoteProtocolError(f"expected bool, got {type(v).__name__}")
    return v


def _check_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise RemoteProtocolError(f"expected bytes, got {type(v).__name__}")
    return v


def _check_str(v: Any) -> str:
    if type(v) is not str:
        raise RemoteProtocolError(f"expected str, got {type(v).__name__}")
    return v


def _check_dict(v: Any) -> dict[str, Any]:
    if type(v) is not dict or any(type(k) is not str for k in v):
        raise RemoteProtocolError("expected a map with str keys")
    return v


def _check_entry(v: Any) -> Entry:
    if type(v) is not list or len(v) != 3:
        raise RemoteProtocolError("expected an entry [term, index, data]")
    return Entry(_check_int(v[0]), _check_int(v[1]), _check_bytes(v[2]))


def _check_entries(v: Any) -> tuple[Entry, ...]:
    """``tuple[Entry, ...]``: what a follower checks for every replicated write, so one
    flat loop (the generic tuple check costs a generator and two calls per entry)."""
    if type(v) is not list:
        raise RemoteProtocolError(f"expected array, got {type(v).__name__}")
    out: list[Entry] = []
    append = out.append
    for x in v:
        if type(x) is not list or len(x) != 3:
            raise RemoteProtocolError("expected an entry [term, index, data]")
        term, index, data = x
        if (type(term) is not int or type(index) is not int or type(data) is not bytes
                or not 0 <= term <= INT_MAX or not 0 <= index <= INT_MAX):
            _check_entry(x)  # raises the precise error
        append(Entry(term, index, data))
    return tuple(out)


def _enum_check(cls: type[enum.IntEnum]) -> Check:
    members = {int(m): m for m in cls}  # a dict lookup is much cheaper than cls(v)

    def check(v: Any) -> enum.IntEnum:
        if type(v) is not int or v not in members:  # (bool is refused: True == 1)
            raise RemoteProtocolError(f"bad {cls.__name__} value {v!r}")
        return members[v]

    return check


def _tuple_check(item: Check) -> Check:
    def check(v: Any) -> tuple[Any, ...]:
        if type(v) is not list:
            raise RemoteProtocolError(f"expected array, got {type(v).__name__}")
        return tuple(map(item, v))  # (map: ~45% cheaper than a generator per batch)

    return check


def _optional_check(item: Check) -> Check:
    def check(v: Any) -> Any:
        return None if v is None else item(v)

    return check


def _record_check(cls: type) -> Check:
    """A record: the array of its fields; trailing fields with defaults may be absent."""
    hints = typing.get_type_hints(cls)
    flds = fields(cls)
    checks = tuple(_check_for(hints[f.name]) for f in flds)
    required = sum(
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        for f in flds
    )

    def check(v: Any) -> Any:
        if type(v) is not list or not required <= len(v) <= len(checks):
            raise RemoteProtocolError(f"expected a {cls.__name__} of {len(checks)} fields")
        return cls(*[c(x) for c, x in zip(checks, v, strict=False)])

    return check


_SCALAR_CHECKS: dict[Any, Check] = {
    int: _check_int,
    bool: _check_bool,
    bytes: _check_bytes,
    str: _check_str,
    Entry: _check_entry,
    RingConfig: RingConfig.from_wire,
}


def _check_for(hint: Any) -> Check:
    if hint in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[hint]
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        return _enum_check(hint)
    if dataclasses.is_dataclass(hint) and not hasattr(hint, "TYPE"):
        return _record_check(hint)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is dict:
        return _check_dict
    if origin is tuple:
        if typing.get_args(hint)[0] is Entry:
            return _check_entries
        return _tuple_check(_check_for(typing.get_args(hint)[0]))
    if origin is types.UnionType:
        args = typing.get_args(hint)
        if len(args) == 2 and type(None) in args:
            return _optional_check(_check_for(next(a for a in args if a is not type(None))))
    raise TypeError(f"no wire check for {hint!r}")


def _is_plain(hint: Any) -> bool:
    """Sent as it is (msgpack packs an IntEnum as its int): no per-field conversion."""
    return hint in (int, bool, bytes, str) or typing.get_origin(hint) is dict or (
        isinstance(hint, type) and issubclass(hint, enum.IntEnum))


class _Schema:
    """What the codec needs to know of one message class, computed once."""

    __slots__ = ("cls", "code", "names", "checks", "blob", "min_fields", "values", "plain",
                 "trailing_defaults", "v1_len", "to_v1", "from_v1")

    def __init__(self, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        blob = getattr(cls, "BLOB", None)
        flds = [f for f in fields(cls) if f.name != blob]
        # decode passes fields positionally with the blob last
        assert blob is None or fields(cls)[-1].name == blob, f"{cls}: BLOB must be last"
        self.cls = cls
        self.code: int = cls.TYPE  # type: ignore[attr-defined]
        self.names = tuple(f.name for f in flds)
        self.checks = tuple(_check_for(hints[f.name]) for f in flds)
        self.blob: str | None = blob
        # Trailing fields with defaults may be omitted by an older sender (not when a
        # blob follows them: it travels positionally after the last field).
        required = [
            f for f in flds if f.default is f.default_factory  # both MISSING
        ]
        self.min_fields = len(self.names) if blob else len(required)
        # ... and encode omits trailing fields still at their default, so a field added
        # to a message (AppendReply.voter, VoteRequest.transfer) does not make an older
        # peer refuse it during a rolling upgrade, unless the new field is in use
        trailing: list[Any] = []
        if not blob:
            for f in reversed(flds):
                if f.default is MISSING or type(f.default) not in (bool, str, int):
                    break
                trailing.append(f.default)
        self.trailing_defaults = tuple(reversed(trailing))
        # encode's fast path: one C call fetches every field; messages whose fields are
        # all scalars need no per-field conversion
        getter = operator.attrgetter(*self.names) if self.names else (lambda _m: ())
        self.values: Callable[[Any], Any] = (
            getter if len(self.names) != 1 else (lambda m: (getter(m),))
        )
        self.plain = all(_is_plain(hints[f.name]) for f in flds)
        # version 1 (protocol/compat.py): the longest header (version and type included,
        # blob not) stamped v1 as it is (-1: not as it is), or a translation
        v1_fields = V1_FIELD_COUNTS.get(self.code)
        self.v1_len = -1 if v1_fields is None else 2 + v1_fields - (blob is not None)
        to_v1, from_v1 = TRANSLATED.get(self.code, (None, None))
        self.to_v1: ToV1 | None = to_v1
        self.from_v1: FromV1 | None = from_v1


_SCHEMAS: dict[int, _Schema] = {}
for _cls in ALL_MESSAGE_TYPES:
    _code = _cls.TYPE  # type: ignore[attr-defined]
    assert _code not in _SCHEMAS, f"duplicate message type {_code}"
    _SCHEMAS[_code] = _Schema(_cls)

_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

#: what ``decode`` reads: this release's version and the previous one (``compat.py``)
_VERSIONS = frozenset({LEGACY_VERSION, PROTOCOL_VERSION})


#: Values msgpack packs as they are (an IntEnum packs as its int). Checked by exact type
#: first: a batch of replies is thousands of these per second, and asking
#: ``dataclasses.is_dataclass`` of each cost ~2% of a node's CPU (measured, py-spy).
_WIRE_AS_IS: frozenset[type] = frozenset({bytes, int, str, bool, float, type(None), dict})


_RECORD_WIRE: dict[type, Callable[[Any], Any]] = {}


def _record_wire(cls: type) -> Callable[[Any], Any]:
    """How a record of ``cls`` goes on the wire (the array of its fields), built once
    per class: one C call fetching every field when all are plain (msgpack packs the
    tuple as an array: the same bytes), else field by field. A ``WatchReply`` carries
    up to 1,000 ``WatchEvent``s, encoded once per watcher: asking ``fields()`` of each
    event cost 2.9 us per event against 0.23 now (a 1,000-event reply), and held the
    leader's loop long enough to halve the writes of ``bench/watch_fanout.py`` with 100
    watchers."""
    conv = _RECORD_WIRE.get(cls)
    if conv is not None:
        return conv
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in fields(cls))
    if not names:
        return lambda m: []
    getter = operator.attrgetter(*names)
    if len(names) > 1 and all(_is_plain(hints[n]) for n in names):
        conv = getter
    elif len(names) == 1:
        conv = lambda m: [_wire_value(getter(m))]  # noqa: E731
    else:
        conv = lambda m: [_wire_value(x) for x in getter(m)]  # noqa: E731
    _RECORD_WIRE[cls] = conv
    return conv


def _wire_value(v: Any) -> Any:
    t = type(v)
    if t in _WIRE_AS_IS:
        return v
    if t is tuple:
        # a tuple field is homogeneous (``tuple[X, ...]``): plain items go as they are
        if not v:
            return v
        t0 = type(v[0])
        if t0 in _WIRE_AS_IS:
            return v
        if t0 is not Entry and t0 is not RingConfig and dataclasses.is_dataclass(t0):
            conv = _record_wire(t0)  # a record
            return [conv(x) for x in v]
        return [_wire_value(x) for x in v]
    if t is Entry:
        return [v.term, v.index, v.data]
    if t is RingConfig:
        return v.to_wire()
    if isinstance(v, int):  # an IntEnum
        return v
    if dataclasses.is_dataclass(v):  # a record
        return _record_wire(t)(v)
    return v


def encode(msg: Message) -> list[bytes]:
    """Frames for ``msg``. Raises ``LocalProtocolError`` if it cannot be encoded."""
    try:
        schema = _SCHEMAS[msg.TYPE]
    except (AttributeError, KeyError) as exc:
        raise LocalProtocolError(f"not a zkv message: {msg!r}") from exc
    if schema.plain:
        header = [PROTOCOL_VERSION, schema.code, *schema.values(msg)]
    else:
        header = [PROTOCOL_VERSION, schema.code, *map(_wire_value, schema.values(msg))]
    defaults = schema.trailing_defaults
    if defaults:
        for default in reversed(defaults):
            last = header[-1]
            if type(last) is not type(default) or last != default:
                break
            header.pop()
    # the oldest version that says the same thing (protocol/compat.py)
    if len(header) <= schema.v1_len:
        header[0] = LEGACY_VERSION
    elif schema.to_v1 is not None:
        legacy = schema.to_v1(header[2:])
        if legacy is not None:
            header = [LEGACY_VERSION, schema.code, *legacy]
    try:
        head = _pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    if schema.blob is None:
        return [head]
    blob = getattr(msg, schema.blob)
    if type(blob) is not bytes:
        raise LocalProtocolError(f"{type(msg).__name__}.{schema.blob} must be bytes")
    if len(blob) <= INLINE_BLOB_BYTES_MAX:
        header.append(blob)
        return [_pack(header)]
    return [head, blob]


def _unpack_header(frame: bytes) -> list[Any]:
    if type(frame) is not bytes:
        raise RemoteProtocolError("frame is not bytes")
    try:
        header = _unpack(frame)
    except Exception as exc:  # msgpack raises many types on garbage; all mean "bad input"
        raise RemoteProtocolError(f"undecodable header: {exc.__class__.__name__}") from exc
    if type(header) is not list or len(header) < 2:
        raise RemoteProtocolError("header is not [version, type, ...]")
    if type(header[0]) is not int or header[0] not in _VERSIONS:
        raise RemoteProtocolError(f"unsupported protocol version {header[0]!r}")
    return header


def decode(frames: Sequence[bytes]) -> Message:
    """Parse frames into a message; any defect raises ``RemoteProtocolError``."""
    if not frames:
        raise RemoteProtocolError("no frames")
    header = _unpack_header(frames[0])
    schema = _SCHEMAS.get(header[1]) if type(header[1]) is int else None
    if schema is None:
        raise RemoteProtocolError(f"unknown message type {header[1]!r}")
    values = header[2:]
    if header[0] == LEGACY_VERSION and schema.from_v1 is not None:
        values = schema.from_v1(values)
    inline = schema.blob is not None and len(frames) == 1
    if inline:
        blob = values.pop() if values else None
    if header[0] == LEGACY_VERSION and schema.from_v1 is None and len(values) > schema.v1_len - 2:
        raise RemoteProtocolError(f"{schema.cls.__name__}: not in protocol version 1 "
                                  "with these fields")
    if not schema.min_fields <= len(values) <= len(schema.names):
        raise RemoteProtocolError(f"{schema.cls.__name__}: wrong number of fields")
    if len(frames) != 1 and (schema.blob is None or len(frames) != 2):
        raise RemoteProtocolError(f"{schema.cls.__name__}: wrong number of frames")
    args = [check(v) for check, v in zip(schema.checks, values, strict=False)]
    if schema.blob is not None:
        args.append(_check_bytes(blob if inline else frames[1]))
    try:
        return schema.cls(*args)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:  # pragma: no cover - checks above should catch
        raise RemoteProtocolError(f"{schema.cls.__name__}: {exc}") from exc


def route_fields(header: bytes) -> tuple[int, bytes, int]:
    """The broker's fast path: ``(type, key, consistency)`` from a data request header
    without building the message. Non-data requests return ``(type, b"", 0)``."""
    values = _unpack_header(header)
    kind = values[1]
    if type(kind) is not int:
        raise RemoteProtocolError("message type is not an int")
    if kind not in DATA_REQUEST_TYPES:
        return kind, b"", 0
    if len(values) < 5 or type(values[4]) is not bytes:
        raise RemoteProtocolError("data request without a key")
    consistency = 0
    if kind == GetRequest.TYPE and len(values) > 5:
        consistency = values[5] if type(values[5]) is int else 0
    return kind, values[4], consistency


def admin_shard(header: bytes) -> int:
    """The shard an admin (or watch) request header names (position 4), for the broker."""
    values = _unpack_header(header)
    if type(values[1]) is not int or values[1] not in SHARD_ROUTED_TYPES or len(values) < 5:
        raise RemoteProtocolError("not an admin request")
    return _check_int(values[4])


def request_id_of(header: bytes) -> int:
    """Best-effort request id of a (possibly malformed) request, for an error reply."""
    try:
        values = _unpack(header)
        rid = values[3]
        return rid if type(rid) is int and 0 <= rid <= INT_MAX else 0
    except Exception:
        return 0
