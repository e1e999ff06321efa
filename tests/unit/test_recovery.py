"""Recovery over every disk state a crash or power loss can leave, per fsync policy.

The table drives the pure ``plan_recovery``; the last tests run the shell half
(``startup.recover``) on real files for issue 10's items 4 and 5.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zkv.protocol.messages import Entry
from zkv.storage_node import durable_state
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.fsync_policy import FsyncPolicy
from zkv.storage_node.recovery import (
    DiskState,
    Plan,
    RecoveryRefused,
    Refusal,
    SnapshotFile,
    plan_recovery,
)
from zkv.storage_node.snapshot import SNAP_DIR, save_snapshot
from zkv.storage_node.startup import recover
from zkv.storage_node.state_machine import KVStateMachine
from zkv.storage_node.wal import WriteAheadLog

POLICIES = [FsyncPolicy.parse(p) for p in ("always", "interval:5000", "never")]
D = Path("/data")
HARD = HardState(7, "n1")


def log(first: int, last: int, term: int = 3, terms: dict[int, int] | None = None) -> tuple[Entry, ...]:
    terms = terms or {}
    return tuple(Entry(terms.get(i, term), i, b"x") for i in range(first, last + 1))


def snap(index: int, term: int = 3, problem: str = "") -> SnapshotFile:
    return SnapshotFile(D / SNAP_DIR / f"{index:020d}.snap", index, term, problem,
                        36 if problem else 0)


TMP = D / SNAP_DIR / "00000000000000000100.snap.tmp"

# name, hard state, snapshots, WAL entries, temp files ->
#   expected: ("plan", snapshot index or None, first replayed, last replayed, reset to)
#          or ("refuse", file name the refusal must name)
CASES = [
    ("empty data dir (first start)", None, (), (), (), ("plan", None, None, None, None)),
    ("WAL only", HARD, (), log(1, 10), (), ("plan", None, 1, 10, None)),
    ("snapshot + WAL beyond it", HARD, (snap(100),), log(1, 150), (),
     ("plan", 100, 101, 150, None)),
    ("WAL ends exactly at the snapshot", HARD, (snap(100),), log(1, 100), (),
     ("plan", 100, None, None, None)),
    ("power loss kept WAL 1..50 behind snapshot 100 (item 4)", HARD, (snap(100),), log(1, 50),
     (), ("plan", 100, None, None, 101)),
    ("installed snapshot, WAL emptied by the install", HARD, (snap(100),), (), (),
     ("plan", 100, None, None, None)),
    ("installed snapshot, entries after it", HARD, (snap(100),), log(101, 130), (),
     ("plan", 100, 101, 130, None)),
    ("crash before the snapshot rename: a .tmp is left", HARD, (snap(50),), log(1, 120),
     (TMP,), ("plan", 50, 51, 120, None)),
    ("crash after the rename, before WAL compaction", HARD, (snap(100), snap(50)), log(1, 120),
     (), ("plan", 100, 101, 120, None)),
    ("crash between installing a snapshot and emptying the WAL (other history)", HARD,
     (snap(100, term=5),), log(1, 120, terms={100: 4}), (), ("plan", 100, None, None, 101)),
    ("damaged newest snapshot covered by the older one and the WAL", HARD,
     (snap(100, problem="checksum mismatch"), snap(50)), log(40, 150), (),
     ("plan", 50, 51, 150, None)),
    ("damaged snapshot covered by the WAL from index 1", HARD,
     (snap(100, problem="checksum mismatch"),), log(1, 120), (), ("plan", None, 1, 120, None)),
    ("damaged installed snapshot, WAL empty (item 5)", HARD,
     (snap(100, problem="checksum mismatch"),), (), (), ("refuse", "00000000000000000100.snap")),
    ("damaged installed snapshot, entries after it (item 5)", HARD,
     (snap(100, problem="checksum mismatch"),), log(101, 120), (),
     ("refuse", "00000000000000000100.snap")),
    ("damaged snapshot, older intact one, WAL starts after the damaged one", HARD,
     (snap(100, problem="bad magic"), snap(50)), log(101, 120), (),
     ("refuse", "00000000000000000100.snap")),
    ("damaged newest snapshot, WAL lost its tail below it", HARD,
     (snap(150, problem="checksum mismatch"), snap(100)), log(1, 50), (),
     ("refuse", "00000000000000000150.snap")),
    ("hole between the snapshot and the WAL", HARD, (snap(50),), log(80, 120), (),
     ("refuse", "wal")),
    ("hard state does not decode", None, (), log(1, 5), (), ("refuse", "hardstate")),
    ("hard state missing while the WAL holds entries", None, (), log(1, 5), (),
     ("refuse", "hardstate")),
    ("hard state older than the log", HardState(2, ""), (), log(1, 5, term=3), (),
     ("refuse", "hardstate")),
]


def _disk(policy: FsyncPolicy, name: str, hard: HardState | None,
          snaps: tuple[SnapshotFile, ...], entries: tuple[Entry, ...],
          temps: tuple[Path, ...]) -> DiskState:
    problem = "does not decode" if "does not decode" in name else ""
    first = D / "wal" / f"{entries[0].index:020d}.seg" if entries else None
    return DiskState(D, policy, hard, problem, snaps, entries, first, temps)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize(("name", "hard", "snaps", "entries", "temps", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_every_disk_state_recovers_or_refuses_by_name(policy, name, hard, snaps, entries,
                                                        temps, expected) -> None:
    got = plan_recovery(_disk(policy, name, hard, snaps, entries, temps))
    if expected[0] == "refuse":
        assert isinstance(got, Refusal), got
        assert expected[1] in str(got.path)
        text = got.message()
        assert str(got.path) in text and "byte offset" in text and "To repair" in text
        return
    assert isinstance(got, Plan), got.message() if isinstance(got, Refusal) else got
    _, snap_index, first, last, reset = expected
    assert (got.snapshot.last_index if got.snapshot else None) == snap_index
    replayed = [e.index for e in got.replay]
    assert (replayed[0] if replayed else None, replayed[-1] if replayed else None) == (first, last)
    assert replayed == list(range(replayed[0], replayed[-1] + 1)) if replayed else True
    assert got.wal_reset_to == reset
    assert got.remove == temps
    # whatever the plan, the replica core gets a log contiguous with the snapshot
    base = got.snapshot.last_index if got.snapshot else 0
    assert not replayed or replayed[0] == base + 1


def test_a_refusal_names_the_offset_of_the_damage() -> None:
    got = plan_recovery(_disk(POLICIES[0], "", HARD, (snap(100, problem="checksum mismatch"),),
                              (), ()))
    assert isinstance(got, Refusal)
    assert got.offset == 36  # the damage is in the data, after the 36-byte header
    assert "snapshot 100 is damaged" in got.reason


# --------------------------------------------------------------------------- on real files


def _write_wal(wal_dir: Path, first: int, last: int, policy: FsyncPolicy) -> None:
    wal, _ = WriteAheadLog.open(wal_dir, policy)
    wal.append(list(log(first, last)))
    wal.sync(0.0, force=True)
    wal.close()


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_wal_behind_snapshot_restarts_after_it_and_appends_continue(tmp_path, policy) -> None:
    """Item 4: a snapshot at 100 and a WAL that kept only 1..50 used to fail every restart
    with ``AssertionError: WAL append of index 101, expected 51``."""
    durable_state.save_hard_state(tmp_path, HARD)
    sm = KVStateMachine()
    save_snapshot(tmp_path, 100, 3, sm.snapshot_bytes())
    _write_wal(tmp_path / "wal", 1, 50, policy)
    found = recover(tmp_path, policy, KVStateMachine())
    assert found.snapshot is not None and found.snapshot[0] == 100
    assert found.entries == []
    found.wal.append([Entry(7, 101, b"y")])  # the append that used to fail
    found.wal.close()
    again = recover(tmp_path, policy, KVStateMachine())
    assert [e.index for e in again.entries] == [101]
    again.wal.close()


def test_damaged_installed_snapshot_refuses_naming_the_file(tmp_path) -> None:
    """Item 5: the snapshot was the only copy (the install emptied the WAL)."""
    durable_state.save_hard_state(tmp_path, HARD)
    path = save_snapshot(tmp_path, 100, 3, KVStateMachine().snapshot_bytes() + b"\0" * 64)
    _write_wal(tmp_path / "wal", 101, 110, POLICIES[0])
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(RecoveryRefused) as err:
        recover(tmp_path, POLICIES[0], KVStateMachine())
    assert str(path) in str(err.value) and "To repair" in str(err.value)


def test_leftover_temp_files_are_removed(tmp_path) -> None:
    durable_state.save_hard_state(tmp_path, HARD)
    (tmp_path / SNAP_DIR).mkdir()
    leftovers = [tmp_path / SNAP_DIR / "00000000000000000100.snap.tmp", tmp_path / "hardstate.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    recover(tmp_path, POLICIES[0], KVStateMachine()).wal.close()
    assert not any(p.exists() for p in leftovers)


def test_snapshot_that_passes_its_checksum_but_does_not_decode_falls_back(tmp_path) -> None:
    durable_state.save_hard_state(tmp_path, HARD)
    save_snapshot(tmp_path, 100, 3, b"not msgpack state")
    _write_wal(tmp_path / "wal", 1, 120, POLICIES[0])
    found = recover(tmp_path, POLICIES[0], KVStateMachine())
    assert found.snapshot is None and len(found.entries) == 120
    found.wal.close()


@pytest.mark.parametrize("module", ["recovery", "disk_full", "quota"])
def test_decisions_are_pure(module: str) -> None:
    """These modules decide; the shell (startup.py, node.py) does the I/O."""
    import ast

    import zkv.storage_node as storage_node

    path = Path(storage_node.__file__).parent / f"{module}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"zmq", "time", "threading", "asyncio", "random", "socket", "loguru", "os"}
    assert not imported & forbidden
