"""The simulated clock: time moves only when the simulation says so, never backwards."""

from __future__ import annotations


class SimClockError(RuntimeError):
    """The simulation tried to move time backwards: a bug in the harness."""


class SimClock:
    """Seconds as a float, starting at ``start``. Like trio's MockClock, but explicit."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    @property
    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise SimClockError(f"cannot advance by a negative amount ({seconds})")
        self._now += seconds
        return self._now

    def advance_to(self, when: float) -> float:
        if when < self._now:
            raise SimClockError(f"time would go backwards: {when} < {self._now}")
        self._now = float(when)
        return self._now

    def ns(self) -> int:
        """Integer nanoseconds, for ``History(clock=...)``."""
        return int(self._now * 1e9)
