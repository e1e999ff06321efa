"""Atomic, durable small files: hardstate and ring."""

from __future__ import annotations

import os

import msgpack
import pytest

from zkv.protocol.ring import DEFAULT_VNODES, RingConfig
from zkv.storage_node.durable_state import (
    HARD_STATE_FILE,
    RING_FILE,
    CorruptStateError,
    HardState,
    load_hard_state,
    load_ring,
    save_hard_state,
    save_ring,
    write_atomic,
)


def test_hard_state_defaults_when_absent(tmp_path):
    assert load_hard_state(tmp_path) == HardState(0, "")


def test_hard_state_round_trip_and_overwrite(tmp_path):
    save_hard_state(tmp_path, HardState(3, "s0r1"))
    assert load_hard_state(tmp_path) == HardState(3, "s0r1")
    save_hard_state(tmp_path, HardState(4, ""))
    assert load_hard_state(tmp_path) == HardState(4, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [HARD_STATE_FILE]  # no tmp left


def test_hard_state_is_frozen():
    with pytest.raises(AttributeError):
        HardState(1, "a").term = 2  # type: ignore[misc]


def test_ring_round_trip(tmp_path):
    assert load_ring(tmp_path) is None
    ring = RingConfig(epoch=7, shards=(0, 1, 2), vnodes=128)
    save_ring(tmp_path, ring)
    assert load_ring(tmp_path) == ring


def test_a_ring_persisted_before_the_1024_default_keeps_256_vnodes(tmp_path):
    """A data dir from a cluster created at the old default (256 vnodes) loads as it
    was written: the node uses the persisted ring, never the new default."""
    (tmp_path / RING_FILE).write_bytes(
        msgpack.packb({"epoch": 4, "shards": [0, 1], "vnodes": 256}, use_bin_type=True))
    assert DEFAULT_VNODES == 1024
    assert load_ring(tmp_path) == RingConfig(epoch=4, shards=(0, 1), vnodes=256)


def test_write_is_fsynced_and_renamed(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    write_atomic(tmp_path / "f", b"hello")
    assert calls == ["fsync", "replace", "fsync"]  # file, rename, directory
    assert (tmp_path / "f").read_bytes() == b"hello"


def test_a_stale_tmp_file_does_not_matter(tmp_path):
    (tmp_path / (HARD_STATE_FILE + ".tmp")).write_bytes(b"half written")
    assert load_hard_state(tmp_path) == HardState()
    save_hard_state(tmp_path, HardState(1, "x"))
    assert load_hard_state(tmp_path) == HardState(1, "x")


@pytest.mark.parametrize(
    "content",
    [
        b"\xc1garbage",
        msgpack.packb([1, "x"]),
        msgpack.packb({"term": "1", "voted_for": "x"}),
        msgpack.packb({"term": -1, "voted_for": "x"}),
        msgpack.packb({"term": 1}),
        msgpack.packb({"term": True, "voted_for": ""}),
    ],
)
def test_a_damaged_hard_state_refuses_to_start(tmp_path, content):
    (tmp_path / HARD_STATE_FILE).write_bytes(content)
    with pytest.raises(CorruptStateError, match="rebuild from its peers"):
        load_hard_state(tmp_path)


@pytest.mark.parametrize(
    "value",
    [
        {"epoch": 1, "shards": [], "vnodes": 8},
        {"epoch": 1, "shards": [0, "1"], "vnodes": 8},
        {"epoch": 1, "shards": [0], "vnodes": 0},
        {"epoch": -1, "shards": [0], "vnodes": 8},
        {"epoch": 1, "shards": [0]},
    ],
)
def test_a_damaged_ring_refuses_to_start(tmp_path, value):
    (tmp_path / RING_FILE).write_bytes(msgpack.packb(value))
    with pytest.raises(CorruptStateError):
        load_ring(tmp_path)
