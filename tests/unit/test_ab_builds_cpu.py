"""``bench.ab_builds``'s machine-wide CPU: busy time from /proc/stat's first line."""

from __future__ import annotations

import pytest

from bench.ab_builds import TICK, machine_busy_s

# cpu  user nice system idle iowait irq softirq steal guest guest_nice
STAT = ("cpu  1000 20 300 5000 40 6 70 9 0 0\n"
        "cpu0 500 10 150 2500 20 3 35 4 0 0\n")


def test_busy_time_counts_user_system_and_interrupts_not_idle_iowait_or_steal() -> None:
    assert machine_busy_s(STAT) == pytest.approx((1000 + 20 + 300 + 6 + 70) / TICK)


def test_busy_time_reads_this_machine() -> None:
    assert machine_busy_s() > 0
