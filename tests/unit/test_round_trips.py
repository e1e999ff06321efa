"""``bench.round_trips``'s shared-disk fdatasync (informational figure of target 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.round_trips import concurrent_fdatasync_ms


def test_every_writer_times_every_sync_and_leaves_no_file(tmp_path: Path) -> None:
    times = concurrent_fdatasync_ms(tmp_path, writers=3, count=5)
    assert len(times) == 15
    assert all(ms > 0 for ms in times)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_cannot_start_fails_the_measure_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """No file can be made: every writer fails at once, none waits at the barrier."""
    with pytest.raises(FileNotFoundError):
        concurrent_fdatasync_ms(tmp_path / "missing", writers=3, count=5)


def test_a_writer_failing_midway_stops_the_others_and_its_error_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One sync fails (a disk error): the writers waiting for it at the barrier stop,
    and the measure raises the disk's error, not the barrier's."""
    import os
    import threading

    real = os.fdatasync
    calls = []
    lock = threading.Lock()

    def failing_once(fd: int) -> None:
        with lock:
            calls.append(fd)
            if len(calls) == 4:
                raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)
    outcome: list[BaseException | None] = []

    def measure() -> None:
        try:
            concurrent_fdatasync_ms(tmp_path, writers=3, count=5)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    runner = threading.Thread(target=measure, daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "the writers hung at the barrier"
    assert isinstance(outcome[0], OSError) and outcome[0].errno == 5
    assert list(tmp_path.iterdir()) == []
