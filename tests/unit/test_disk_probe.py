"""The disk-stall probe the rolling-restart test reports with its gaps
(``tests/support/disk_probe.py``): its arithmetic, and that it runs and stops."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.disk_probe import DiskStallProbe, overlap_s


@pytest.mark.parametrize(("start", "end", "expected"), [
    (0.0, 1.0, 0.0),    # before every stall
    (2.0, 3.0, 1.0),    # covers the first stall exactly
    (2.5, 10.0, 2.5),   # half the first, all of the second (5-7)
    (5.5, 6.0, 0.5),    # inside a stall
    (7.0, 9.0, 0.0),    # touches the end of one: nothing
])
def test_overlap_counts_only_the_stalled_part_of_a_gap(start: float, end: float,
                                                       expected: float) -> None:
    assert overlap_s([(2.0, 3.0), (5.0, 7.0)], start, end) == pytest.approx(expected)


def test_the_probe_process_runs_stops_and_leaves_nothing(tmp_path: Path) -> None:
    with DiskStallProbe(tmp_path) as probe:
        time.sleep(0.3)
    assert all(b > a for a, b in probe.stalls)  # a quiet disk may report none
    assert list(tmp_path.iterdir()) == []
    assert probe.stalled_s(0.0, time.monotonic()) == pytest.approx(
        sum(b - a for a, b in probe.stalls))
