"""Small files a storage node must never lose or half-write: ``hardstate``, ``ring`` and
``member_keys``.

Raft's safety rests on ``hardstate`` (current term and vote): a node that forgot its
vote could vote twice in one term and elect two leaders. So every write here is atomic
and durable: write ``<name>.tmp``, fsync it, ``os.replace`` it over ``<name>``, then fsync
the directory so the rename itself survives a power loss. A reader sees the old file or
the new one, never a mix; these writes ignore the ``--fsync`` policy on purpose.

A file that exists but does not decode is not silently replaced by a default (that
would be the forgotten vote above): ``load_*`` raises ``CorruptStateError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from zkv.protocol.ring import RingConfig

HARD_STATE_FILE = "hardstate"
RING_FILE = "ring"
#: the member keys of the last configuration this node saw committed (node_keys.py): a
#: restarted node knows only its snapshot's configuration as committed until a leader
#: tells it more, and must still trust the members that configuration does not name
MEMBER_KEYS_FILE = "member_keys"
#: Both files are a few dozen bytes; anything much larger is not ours.
STATE_FILE_BYTES_MAX = 1 << 20

_REPAIR = "remove this replica's data directory and let it rebuild from its peers"


class CorruptStateError(RuntimeError):
    """A durable state file exists but cannot be read: refuse to start."""


@dataclass(frozen=True, slots=True)
class HardState:
    """What Raft must remember across restarts before answering a vote or an append."""

    term: int = 0
    voted_for: str = ""


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make creations, renames and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (tmp, fsync, rename, fsync dir)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the old file stands, leave no half copy
        raise
    fsync_directory(target.parent)


def _read_map(path: Path) -> dict[str, Any] | None:
    """The msgpack map in ``path``; ``None`` if the file does not exist."""
    try:
        with open(path, "rb") as f:
            raw = f.read(STATE_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    if len(raw) > STATE_FILE_BYTES_MAX:
        raise CorruptStateError(f"{path} is larger than {STATE_FILE_BYTES_MAX} bytes; {_REPAIR}")
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise CorruptStateError(f"{path} does not decode ({exc}); {_REPAIR}") from exc
    if type(value) is not dict:
        raise CorruptStateError(f"{path} does not hold a map; {_REPAIR}")
    return value


def _field(path: Path, value: dict[str, Any], name: str, kind: type) -> Any:
    v = value.get(name)
    if type(v) is not kind:
        raise CorruptStateError(
            f"{path}: field {name!r} is {v!r}, not a {kind.__name__}; {_REPAIR}"
        )
    return v


def save_hard_state(directory: str | os.PathLike[str], state: HardState) -> None:
    payload = msgpack.packb({"term": state.term, "voted_for": state.voted_for}, use_bin_type=True)
    write_atomic(Path(directory) / HARD_STATE_FILE, payload)


def load_hard_state(directory: str | os.PathLike[str]) -> HardState:
    """The persisted term and vote; a node that never persisted any starts at term 0."""
    path = Path(directory) / HARD_STATE_FILE
    value = _read_map(path)
    if value is None:
        return HardState()
    term = _field(path, value, "term", int)
    if term < 0:
        raise CorruptStateError(f"{path}: negative term {term}; {_REPAIR}")
    return HardState(term, _field(path, value, "voted_for", str))


def save_ring(directory: str | os.PathLike[str], ring: RingConfig) -> None:
    payload = msgpack.packb(ring.as_dict(), use_bin_type=True)
    write_atomic(Path(directory) / RING_FILE, payload)


def load_ring(directory: str | os.PathLike[str]) -> RingConfig | None:
    """The persisted ring, or ``None`` on a first start (the shell then uses ``--shards``)."""
    path = Path(directory) / RING_FILE
    value = _read_map(path)
    if value is None:
        return None
    epoch = _field(path, value, "epoch", int)
    shards = _field(path, value, "shards", list)
    vnodes = _field(path, value, "vnodes", int)
    if epoch < 0 or vnodes < 1 or not shards or any(type(s) is not int or s < 0 for s in shards):
        raise CorruptStateError(f"{path}: implausible ring {value!r}; {_REPAIR}")
    return RingConfig(epoch, tuple(shards), vnodes)


def save_member_keys(directory: str | os.PathLike[str], index: int, keys: dict[str, str]) -> None:
    payload = msgpack.packb({"index": index, "keys": keys}, use_bin_type=True)
    write_atomic(Path(directory) / MEMBER_KEYS_FILE, payload)


def load_member_keys(directory: str | os.PathLike[str]) -> tuple[int, dict[str, str]] | None:
    """(index of the committed configuration, its member keys) as last saved; None if
    never saved. Raises ``CorruptStateError`` on a file that is not ours."""
    path = Path(directory) / MEMBER_KEYS_FILE
    value = _read_map(path)
    if value is None:
        return None
    index = _field(path, value, "index", int)
    keys = _field(path, value, "keys", dict)
    if not all(type(k) is str and type(v) is str for k, v in keys.items()):
        raise CorruptStateError(f"{path}: keys must map str to str; {_REPAIR}")
    return index, keys
